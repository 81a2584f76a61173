"""A raw image: the virtual disk byte for byte. Holes (SEEK_HOLE) are reported as zero extents."""

from __future__ import annotations

import os
from typing import Iterator

from hvbackup.disks.device import Extent, ExtentState
from hvbackup.disks.filedisk import FileDisk
from hvbackup.disks.fileio import data_ranges, new_file, punch_hole, readinto_at, sync_data, write_at
from hvbackup.errors import DiskFormatError

SECTOR = 512


class RawDisk(FileDisk):
    format = "raw"
    disk_type = "fixed"

    def _load(self, chain: tuple[str, ...]) -> None:
        self.size = os.fstat(self._fd).st_size
        if not self.size or self.size % SECTOR:
            # Any file could be read as raw; one that is not whole sectors was never a disk image.
            raise DiskFormatError(f"{self.path}: not a disk image: {self.size} bytes is not a whole, non-zero "
                                  f"number of {SECTOR}-byte sectors", reason="raw.file.size")
        self._unflushed = False

    def info(self) -> dict:
        return super().info() | {"file_size": os.fstat(self._fd).st_size, "log_pending": False}

    def readinto(self, offset: int, buffer) -> None:
        view = memoryview(buffer).cast("B")
        self._check_range(offset, len(view))
        readinto_at(self._fd, view, offset)

    def _write(self, offset: int, data: memoryview) -> None:
        write_at(self._fd, data, offset)
        self._unflushed = True

    def _trim(self, offset: int, length: int) -> None:
        punch_hole(self._fd, offset, length)
        self._unflushed = True

    def flush(self) -> None:
        if self._unflushed:
            sync_data(self._fd)
            self._unflushed = False

    def _extents(self, pos: int, end: int) -> Iterator[Extent]:
        for data, hole in data_ranges(self._fd, pos, end):
            if data > pos:
                yield Extent(pos, data - pos, ExtentState.ZERO)
            yield Extent(data, hole - data, ExtentState.DATA)
            pos = hole
        if pos < end:
            yield Extent(pos, end - pos, ExtentState.ZERO)


def create_raw(path: str, size: int) -> None:
    with new_file(path) as fd:
        os.ftruncate(fd, size)
