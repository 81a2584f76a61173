"""An open VHD file as a block device: fixed, dynamic or differencing.

A fixed disk is its data followed by the footer. Dynamic and differencing disks map blocks through the
BAT; a block missing from the file reads as zeros (dynamic) or from the parent (differencing), and
inside a block the sector bitmap decides the same per sector.

The size is the footer's current size, as Hyper-V and libvhdi read it. qemu 7.2 reads the CHS
geometry instead for the creators "vpc ", "qemu" and any it does not know (unless the geometry is the
maximum). ``create_vhd`` makes the two agree; where old files differ (Virtual PC rounds the
geometry down from the size) hvbackup shows a few more trailing sectors than qemu does.

VHD has no log, so writes are ordered such that a crash at any instant leaves a valid file in which
every flushed write is present:

* the footer is first written where the new blocks will end, then the blocks (bitmap, then data)
  go where the old footer was, then the file is flushed, and only then do BAT entries point at the
  blocks. A crash leaves either the old entries (the space at the end is unused and is reused) or
  complete blocks, and the file always ends in a footer hvbackup wrote, never in guest data;
* bits set in the bitmap of a block already in the file are written at ``flush()``, after the data
  they reveal is durable.
"""

from __future__ import annotations

import os
import uuid
from typing import Iterator

import numpy as np

from hvbackup.disks import parents
from hvbackup.disks.device import Extent, ExtentState
from hvbackup.disks.filedisk import FileDisk
from hvbackup.disks.fileio import (
    punch_hole,
    readinto_at,
    round_up,
    sync_data,
    write_at,
    write_zeros,
    zero_fill,
)
from hvbackup.disks.vhd import dynamic_header
from hvbackup.disks.vhd import footer as footermod
from hvbackup.disks.vhd.bat import UNALLOCATED, Bat
from hvbackup.disks.vhd.bitmap import SectorBitmaps
from hvbackup.disks.vhd.dynamic_header import DynamicHeader
from hvbackup.disks.vhd.footer import DIFFERENCING, DYNAMIC, FIXED, read_footer
from hvbackup.disks.vhd.locator import read_locator_paths
from hvbackup.errors import DiskError, DiskFormatError

SECTOR = 512


class VhdDisk(FileDisk):
    format = "vhd"
    header: DynamicHeader | None = None
    bat: Bat | None = None
    _bitmaps: SectorBitmaps | None = None

    # -- opening -------------------------------------------------------------------------------

    def _load(self, chain: tuple[str, ...]) -> None:
        fd = self._fd
        self._unflushed = False
        file_size = os.fstat(fd).st_size
        self.footer, trailing, self.footer_problems = read_footer(fd, file_size)
        self._footer_trailing = trailing
        self._footer_bytes = self.footer.pack()
        self.size = self.footer.current_size
        self.disk_id = self.footer.unique_id
        self.disk_type = self.footer.type_name
        self.block_size = 0
        data_end = file_size - trailing
        if self.footer.disk_type == FIXED:
            if data_end < self.size:
                raise DiskFormatError(
                    f"file is truncated: a fixed disk of {self.size} bytes needs {self.size + trailing} "
                    f"bytes, the file has {file_size}",
                    reason="disk.file.truncated",
                )
            return
        self._load_dynamic(file_size, data_end, trailing)
        if self.footer.disk_type == DIFFERENCING:
            self._open_parent(chain)

    def _load_dynamic(self, file_size: int, data_end: int, trailing: int) -> None:
        header = DynamicHeader.read(self._fd, self.footer.data_offset, file_size)
        header.check_fits(self.size, file_size)
        self.header = header
        self.block_size = header.block_size
        self.bat = Bat.read(self._fd, header, self.size)
        structures = [
            (0, footermod.SIZE, "footer copy"),
            (self.footer.data_offset, dynamic_header.SIZE, "dynamic disk header"),
            (header.table_offset, header.table_length, "BAT"),
        ]
        self.parent_paths: dict[str, str] = {}
        if self.footer.disk_type == DIFFERENCING:
            self.parent_paths = read_locator_paths(self._fd, header.locators, file_size)
        # Every locator's data occupies the file, read or not (other platforms' paths included), so
        # new blocks never go over it.
        structures += [
            (e.data_offset, e.data_length, "parent locator data") for e in header.locators
            if e.platform_code != bytes(4) and e.data_length and e.data_offset + e.data_length <= file_size
        ]
        metadata_end = max(offset + length for offset, length, _ in structures)
        if trailing:
            structures.append((data_end, trailing, "footer"))
        self.bat.check_layout(structures, data_end)
        self._next_free = max(round_up(metadata_end, SECTOR), self.bat.end_of_blocks())
        self._bitmaps = SectorBitmaps(self._fd, header.bitmap_size)

    def _open_parent(self, chain: tuple[str, ...]) -> None:
        tried = parents.candidates(self.path, self.parent_paths.get("relative_path"),
                                   self.parent_paths.get("absolute_win32_path"), self.header.parent_name)
        self.parent, _ = parents.open_parent(
            self.path, tried, chain,
            lambda path, above: VhdDisk.open(path, read_only=True, _chain=above),
            lambda parent: parent.disk_id, [self.header.parent_unique_id], "unique id",
        )

    def problems(self) -> list[str]:
        return list(self.footer_problems)

    def repair(self) -> list[str]:
        """Restore a damaged, missing or different footer copy from the one the disk opened by."""
        if not self.footer_problems:
            return []
        if self._footer_trailing:
            write_at(self._fd, self._footer_bytes, 0)
            done = "rewrote the footer copy at offset 0 from the footer at the end of the file"
        else:
            # The footer goes where the data ends; what followed it there is referenced by nothing.
            write_at(self._fd, self._footer_bytes, self._next_free)
            try:
                os.ftruncate(self._fd, self._next_free + footermod.SIZE)
            except OSError as exc:
                raise DiskError(f"{self.path}: cannot resize the file: {exc.strerror}") from exc
            self._footer_trailing = footermod.SIZE
            done = "rewrote the footer at the end of the file from the copy at offset 0"
        sync_data(self._fd)
        self.footer_problems = []
        return [done]

    @property
    def linkage_id(self) -> uuid.UUID:
        """A child records its parent's footer UniqueId in its dynamic header."""
        return self.footer.unique_id

    @property
    def write_alignment(self) -> int:
        """A differencing disk takes writes in 4 KiB units, so every sector bitmap byte it sets is
        whole: libvhdi (20210425 and its current source) shifts bitmap bytes without masking and
        treats the sectors after a present one in the same byte as present too."""
        return 4096 if self.parent is not None else super().write_alignment

    def info(self) -> dict:
        info = super().info()
        info.update(
            file_size=os.fstat(self._fd).st_size,
            log_pending=False,
            creator_app=self.footer.creator_app.decode("latin-1").rstrip("\0 "),
            geometry=list(self.footer.geometry),
        )
        if self.footer.disk_type == DIFFERENCING:
            info["parent_unique_id"] = str(self.header.parent_unique_id)
        return info

    # -- reads ---------------------------------------------------------------------------------

    def readinto(self, offset: int, buffer) -> None:
        view = memoryview(buffer).cast("B")
        self._check_range(offset, len(view))
        if self.bat is None:
            readinto_at(self._fd, view, offset)
            return
        for block, within, pos, take in self._blocks(offset, len(view)):
            piece = view[pos:pos + take]
            location = self.bat.location(block)
            if location is None:
                self._read_parent(offset + pos, piece)
            else:
                self._read_block(location, offset + pos - within, within, piece)

    def _blocks(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(block, offset within it, offset within the request, length) for each block touched."""
        pos = 0
        while pos < length:
            block, within = divmod(offset + pos, self.block_size)
            take = min(self.block_size - within, length - pos)
            yield block, within, pos, take
            pos += take

    def _read_block(self, location: int, block_start: int, within: int, piece: memoryview) -> None:
        """Any byte range of a block in this file: present sectors from the file, the rest absent."""
        end = within + len(piece)
        first = within // SECTOR
        for present, sector, count in self._bitmaps.runs(location, first, -(-end // SECTOR) - first):
            lo, hi = max(sector * SECTOR, within), min((sector + count) * SECTOR, end)
            part = piece[lo - within:hi - within]
            if present:
                readinto_at(self._fd, part, location + self.bat.bitmap_size + lo)
            elif self.footer.disk_type == DYNAMIC:
                zero_fill(part)
            else:
                self._read_parent(block_start + lo, part)

    # -- writes and trims ----------------------------------------------------------------------

    def _write(self, offset: int, data: memoryview) -> None:
        if self.bat is None:
            write_at(self._fd, data, offset)
        else:
            self._store(offset, len(data), data)
        self._unflushed = True

    def _trim(self, offset: int, length: int) -> None:
        """Fixed: zeroed in place. Dynamic: holes punched inside allocated blocks, which stay allocated.
        Differencing: zeros stored in this file, so the parent's data no longer shows."""
        if self.bat is None:
            write_zeros(self._fd, offset, length)
        else:
            self._store(offset, length, None)
        self._unflushed = True

    def _store(self, offset: int, length: int, data: memoryview | None) -> None:
        """Put ``data`` (None: zeros) at a sector-aligned range, appending the blocks that need to be
        in this file and are not."""
        new = []
        for block, within, pos, take in self._blocks(offset, length):
            piece = None if data is None else data[pos:pos + take]
            location = self.bat.location(block)
            if location is not None:
                data_at = location + self.bat.bitmap_size + within
                if piece is None:
                    punch_hole(self._fd, data_at, take)
                else:
                    write_at(self._fd, piece, data_at)
                if piece is not None or self.footer.disk_type == DIFFERENCING:
                    # A clear bit of a dynamic disk already reads as zeros; a trim leaves it so.
                    self._bitmaps.mark(location, within // SECTOR, take // SECTOR)
            elif piece is not None or self.footer.disk_type == DIFFERENCING:
                new.append((block, within, take, piece))
        if new:
            self._append_blocks(new)

    def _append_blocks(self, new: list[tuple[int, int, int, memoryview | None]]) -> None:
        """Add blocks at the end of the file in the crash-safe order of the module docstring. A dynamic
        block gets every bitmap bit set (as qemu does); a differencing one only those written."""
        stride = self.bat.block_stride
        start = self._next_free
        end = start + len(new) * stride
        if (end - stride) // SECTOR >= UNALLOCATED:
            raise DiskError(f"{self.path}: the file would outgrow the 2 TiB a VHD BAT can address")
        try:
            if os.fstat(self._fd).st_size != start + footermod.SIZE:
                # Drop what follows the last block (a damaged or short footer, an orphan of a crash),
                # so the new blocks read as zeros wherever they are not written.
                os.ftruncate(self._fd, start)
        except OSError as exc:
            raise DiskError(f"{self.path}: cannot resize the file: {exc.strerror}") from exc
        # The footer first: until the blocks are complete the file must still end in a real footer,
        # not in guest data that could pass for one.
        write_at(self._fd, self._footer_bytes, end)
        locations = []
        for i, (_block, within, take, piece) in enumerate(new):
            location = start + i * stride
            bits = self._bitmaps.new_block(
                location, within // SECTOR, take // SECTOR, all_present=self.footer.disk_type == DYNAMIC
            )
            write_at(self._fd, bits, location)
            if piece is not None:
                write_at(self._fd, piece, location + self.bat.bitmap_size + within)
            locations.append(location)
        sync_data(self._fd)
        self._next_free = end
        table_offset, table = self.bat.assign([entry[0] for entry in new], locations)
        write_at(self._fd, table, table_offset)

    def flush(self) -> None:
        if self.read_only or self.closed:
            return
        if self._bitmaps is not None and self._bitmaps.dirty:
            sync_data(self._fd)  # the data first: a bit must never reveal a sector not yet durable
            self._bitmaps.write_dirty()
            sync_data(self._fd)
        elif self._unflushed:
            sync_data(self._fd)
        self._unflushed = False

    # -- extents -------------------------------------------------------------------------------

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        if start >= end:
            return
        if self.bat is None:
            yield Extent(start, end - start, ExtentState.DATA)
            return
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        allocated = self.bat.entries[first:last + 1] != UNALLOCATED
        edges = np.flatnonzero(np.diff(allocated)) + 1
        for lo, hi in zip(np.concatenate(([0], edges)), np.concatenate((edges, [allocated.size]))):
            run_start, run_end = max(start, (first + int(lo)) * bs), min(end, (first + int(hi)) * bs)
            if not allocated[lo]:
                yield from self._parent_extents(run_start, run_end)
                continue
            for block in range(first + int(lo), first + int(hi)):
                yield from self._block_extents(block, max(run_start, block * bs), min(run_end, (block + 1) * bs))

    def _block_extents(self, block: int, start: int, end: int) -> Iterator[Extent]:
        block_start = block * self.block_size
        first = (start - block_start) // SECTOR
        count = -(-(end - block_start) // SECTOR) - first
        for present, sector, n in self._bitmaps.runs(self.bat.location(block), first, count):
            lo = max(start, block_start + sector * SECTOR)
            hi = min(end, block_start + (sector + n) * SECTOR)
            if present:
                yield Extent(lo, hi - lo, ExtentState.DATA)
            elif self.footer.disk_type == DYNAMIC:
                yield Extent(lo, hi - lo, ExtentState.ZERO)
            else:
                yield from self._parent_extents(lo, hi)
