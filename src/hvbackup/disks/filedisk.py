"""What every format stored in one host file shares: opening (with the writer's lock), naming the
file in format errors, the checks and read-modify-write every format's I/O goes through, reading
through to the parent, and releasing the file and its parent chain.

A format implements ``_load``, ``readinto``, ``_write`` and ``_trim`` (sector-aligned, already
checked), ``flush`` and ``_extents``.
"""

from __future__ import annotations

import abc
import os
from typing import Iterator

from hvbackup.disks.device import BlockDevice, Extent, ExtentState, coalesce
from hvbackup.disks.fileio import open_disk_file, start_writeback, zero_fill
from hvbackup.errors import DiskFormatError, ParentError


class FileDisk(BlockDevice):
    _fd: int = -1

    @classmethod
    def open(cls, path: str, *, read_only: bool = False, _chain: tuple[str, ...] = ()):
        """Open ``path``; ``_chain`` holds the real paths of the children above, to catch loops."""
        disk = cls.__new__(cls)
        disk.path, disk.read_only, disk.closed, disk.parent = path, read_only, False, None
        disk._fd = open_disk_file(path, read_only)
        try:
            disk._load(_chain + (os.path.realpath(path),))
            return disk
        except ParentError:
            disk._release()
            raise
        except DiskFormatError as exc:
            disk._release()
            raise DiskFormatError(f"{path}: {exc}", reason=exc.reason) from None
        except BaseException:
            disk._release()
            raise

    @abc.abstractmethod
    def _load(self, chain: tuple[str, ...]) -> None:
        """Read and validate the format's structures from ``self._fd``; open the parent if any."""

    @abc.abstractmethod
    def _write(self, offset: int, data: memoryview) -> None:
        """Write sector-aligned ``data``; the caller has checked range and writability."""

    @abc.abstractmethod
    def _trim(self, offset: int, length: int) -> None:
        """Make a sector-aligned range read as zeros, releasing space where the format can."""

    @abc.abstractmethod
    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        """Extents covering [start, end) in order; neighbours may repeat a state."""

    def problems(self) -> list[str]:
        """Damage the file survives (a damaged redundant copy, say), found when it was opened."""
        return []

    def repair(self) -> list[str]:
        """Fix what ``problems`` names where no data is lost; what was done, one line each. Needs a
        writable open."""
        return []

    # -- the interface, in terms of the format's methods ---------------------------------------

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(view))
        if not view:
            return
        unit, end = self.write_alignment, offset + len(view)
        if offset % unit or (end % unit and end != self.size):
            offset, view = self._widen(offset, view, unit)
        self._write(offset, view)

    def trim(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        unit = self.write_alignment
        start = -(-offset // unit) * unit
        end = self.size if offset + length == self.size else (offset + length) // unit * unit
        if start >= end:
            if length:
                self.write(offset, bytes(length))
            return
        if offset < start:
            self.write(offset, bytes(start - offset))
        if end < offset + length:
            self.write(end, bytes(offset + length - end))
        self._trim(start, end - start)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        length = self.size - offset if length is None else length
        self._check_range(offset, length)
        return coalesce(self._extents(offset, offset + length))

    def start_flush(self) -> None:
        if not self.read_only and not self.closed:
            start_writeback(self._fd)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self.read_only:
                self._finish_writes()
        finally:
            self.closed = True
            self._release()

    # -- helpers for the formats ---------------------------------------------------------------

    def _finish_writes(self) -> None:
        """Before a writer's file is released: make everything durable."""
        self.flush()

    def _release(self) -> None:
        os.close(self._fd)
        if self.parent is not None:
            self.parent.close()

    def _read_parent(self, offset: int, piece: memoryview) -> None:
        """Bytes this file does not hold: the parent's, and zeros past its end or without one."""
        inside = 0 if self.parent is None else max(0, min(len(piece), self.parent.size - offset))
        if inside:
            self.parent.readinto(offset, piece[:inside])
        zero_fill(piece[inside:])

    def _parent_extents(self, start: int, end: int) -> Iterator[Extent]:
        """[start, end) as the layers below see it, one level deeper; past the parent's end (or
        with no parent) it is unallocated."""
        if self.parent is None:
            yield Extent(start, end - start, ExtentState.UNALLOCATED)
            return
        inside = min(end, self.parent.size)
        if start < inside:
            for ext in self.parent.extents(start, inside - start):
                yield Extent(ext.offset, ext.length, ext.state, ext.depth + 1)
        if inside < end:
            yield Extent(max(start, inside), end - max(start, inside), ExtentState.UNALLOCATED, 1)

    def _widen(self, offset: int, view: memoryview, unit: int) -> tuple[int, memoryview]:
        """Read-modify-write: extend a write to whole units with the bytes the disk holds around it."""
        end = offset + len(view)
        start = offset // unit * unit
        stop = min(self.size, -(-end // unit) * unit)
        merged = memoryview(bytearray(stop - start))
        if start < offset:
            self.readinto(start, merged[:offset - start])
        if end < stop:
            self.readinto(end, merged[end - start:])
        merged[offset - start:end - start] = view
        return start, merged
