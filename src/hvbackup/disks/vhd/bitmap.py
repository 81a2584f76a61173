"""VHD spec "Block Allocation Table and Data Blocks", Sector Bitmap: one bit per sector of a block,
most significant bit of byte 0 first (VHDX uses the opposite order). In a differencing disk 1 means
the sector is in this file and 0 that it comes from the parent; in a dynamic disk 0 means the sector
reads as zeros.

Bitmaps load on first use and stay cached (a 2 MiB block has a 512-byte bitmap). Bits set in a
block already in the file are written back at ``write_dirty``, after the data they reveal is durable.
"""

from __future__ import annotations

import numpy as np

from hvbackup.disks import bitruns
from hvbackup.disks.fileio import read_exact, write_at

SECTOR = 512


class SectorBitmaps:
    def __init__(self, fd: int, bitmap_size: int):
        self._fd = fd
        self._size = bitmap_size
        self._bits: dict[int, np.ndarray] = {}            # block file offset -> packed bitmap
        self._dirty: dict[int, tuple[int, int]] = {}      # block file offset -> changed sector span

    def _load(self, location: int) -> np.ndarray:
        bits = self._bits.get(location)
        if bits is None:
            raw = read_exact(self._fd, self._size, location, "sector bitmap")
            bits = self._bits[location] = np.frombuffer(raw, dtype=np.uint8).copy()
        return bits

    def runs(self, location: int, first: int, count: int) -> list[tuple[bool, int, int]]:
        """(present, first sector, sector count) runs covering sectors [first, first+count)."""
        return bitruns.runs(self._load(location), first, count, "big")

    def mark(self, location: int, first: int, count: int) -> None:
        """Set the bits of sectors [first, first+count) of a block already in the file."""
        bits = self._load(location)
        if bitruns.set_range(bits, first, count, "big"):
            lo, hi = first // (8 * SECTOR), -(-(first + count) // (8 * SECTOR))
            lo_old, hi_old = self._dirty.get(location, (lo, hi))
            self._dirty[location] = (min(lo, lo_old), max(hi, hi_old))

    def new_block(self, location: int, first: int, count: int, all_present: bool) -> bytes:
        """The bitmap of a block about to be appended at ``location``: every bit set, or only those of
        sectors [first, first+count)."""
        if all_present:
            bits = np.full(self._size, 0xFF, dtype=np.uint8)
        else:
            bits = np.zeros(self._size, dtype=np.uint8)
            bitruns.set_range(bits, first, count, "big")
        self._bits[location] = bits
        self._dirty.pop(location, None)
        return bits.tobytes()

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def write_dirty(self) -> None:
        for location, (lo, hi) in sorted(self._dirty.items()):
            write_at(self._fd, self._bits[location][lo * SECTOR:hi * SECTOR], location + lo * SECTOR)
        self._dirty.clear()

