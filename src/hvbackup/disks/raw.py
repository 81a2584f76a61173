"""A raw image: the virtual disk byte for byte. Holes (SEEK_HOLE) are reported as zero extents."""

from __future__ import annotations

import errno
import os
from typing import Iterator

from hvbackup.disks.device import Extent, ExtentState
from hvbackup.disks.filedisk import FileDisk
from hvbackup.disks.fileio import new_file, punch_hole, readinto_at, sync_data, write_at
from hvbackup.errors import DiskError


class RawDisk(FileDisk):
    format = "raw"
    disk_type = "fixed"

    def _load(self, chain: tuple[str, ...]) -> None:
        self.size = os.fstat(self._fd).st_size
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
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise DiskError(f"{self.path}: cannot map: {exc.strerror}") from exc
                data = end
            data = min(data, end)
            if data > pos:
                yield Extent(pos, data - pos, ExtentState.ZERO)
            if data >= end:
                return
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            yield Extent(data, hole - data, ExtentState.DATA)
            pos = hole


def create_raw(path: str, size: int) -> None:
    with new_file(path) as fd:
        os.ftruncate(fd, size)
