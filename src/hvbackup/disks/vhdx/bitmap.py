"""[MS-VHDX] 2.4 sector bitmap blocks of a differencing file.

One bit per logical sector, bit 0 of byte 0 first; 1 means the sector's data is in this file, 0 that
it comes from the parent. Each 1 MiB block covers one chunk (2^23 sectors). Blocks are loaded on
first use and up to ``MAX_CACHED`` of them kept; changed 4 KiB pages are remembered until the next
commit.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from hvbackup.disks import bitruns
from hvbackup.disks.vhdx.bat import PAGE
from hvbackup.units import MiB

BITMAP_BLOCK = MiB
MAX_CACHED = 16  # bitmap blocks kept in memory beyond those with uncommitted changes


class SectorBitmaps:
    def __init__(self, read_block: Callable[[int], bytes]):
        """``read_block(file_offset)`` returns the 1 MiB block stored at that offset."""
        self._read_block = read_block
        self._blocks: dict[int, tuple[int, np.ndarray]] = {}
        self.dirty_pages: set[tuple[int, int]] = set()

    def attach(self, chunk: int, file_offset: int, fresh: bool = False) -> None:
        """Make the bitmap block of ``chunk`` known; a fresh block is all zeros."""
        if fresh:
            bits = np.zeros(BITMAP_BLOCK, dtype=np.uint8)
        else:
            bits = np.frombuffer(self._read_block(file_offset), dtype=np.uint8).copy()
        self._blocks[chunk] = (file_offset, bits)

    def _bits(self, chunk: int, file_offset: int) -> np.ndarray:
        known = self._blocks.get(chunk)
        if known is None or known[0] != file_offset:
            self._forget_clean()
            self.attach(chunk, file_offset)
            known = self._blocks[chunk]
        return known[1]

    def _forget_clean(self) -> None:
        """Keep memory bounded when a walk visits many chunks: blocks without uncommitted changes
        can be read again."""
        if len(self._blocks) >= MAX_CACHED:
            dirty = {chunk for chunk, _ in self.dirty_pages}
            self._blocks = {c: b for c, b in self._blocks.items() if c in dirty}

    def runs(self, chunk: int, file_offset: int, first: int, count: int) -> list[tuple[bool, int, int]]:
        """(present, first sector, sector count) runs covering sectors [first, first+count) of the
        chunk, in order."""
        return bitruns.runs(self._bits(chunk, file_offset), first, count, "little")

    def mark_present(self, chunk: int, file_offset: int, first: int, count: int) -> None:
        """Set the bits of sectors [first, first+count)."""
        if bitruns.set_range(self._bits(chunk, file_offset), first, count, "little"):
            first_byte, last_byte = first // 8, (first + count - 1) // 8
            for page in range(first_byte // PAGE, last_byte // PAGE + 1):
                self.dirty_pages.add((chunk, page))

    def pages_to_commit(self) -> list[tuple[int, bytes]]:
        pages = []
        for chunk, page in sorted(self.dirty_pages):
            file_offset, bits = self._blocks[chunk]
            pages.append((file_offset + page * PAGE, bits[page * PAGE:(page + 1) * PAGE].tobytes()))
        return pages
