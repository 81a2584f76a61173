"""The block device interface every layer of the I/O stack implements.

A format (VHDX, VHD, raw) sits at the bottom; filters (change tracking, the host's attachment) wrap
a device and expose the same interface, the way nbdkit stacks filters on a plugin.
"""

from __future__ import annotations

import abc
import enum
import uuid
from dataclasses import dataclass
from typing import Iterator

from hvbackup.disks.fileio import zero_fill
from hvbackup.errors import DiskError


class ExtentState(enum.StrEnum):
    DATA = "data"                # stored in a file of the chain
    ZERO = "zero"                # defined to read as zeros (a ZERO or UNMAPPED block, a hole)
    UNALLOCATED = "unallocated"  # no file of the chain holds it; reads as zeros


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the virtual disk; ``depth`` is the chain layer that decided it (0 = this file)."""

    offset: int
    length: int
    state: ExtentState
    depth: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


class BlockDevice(abc.ABC):
    """size, readinto/read, write, trim, flush, close and extents over a virtual disk."""

    format: str = ""
    disk_type: str = ""
    path: str | None = None
    size: int = 0
    block_size: int = 0
    logical_sector_size: int = 512
    physical_sector_size: int = 512
    disk_id: uuid.UUID | None = None
    parent: BlockDevice | None = None
    read_only: bool = True
    closed: bool = False

    # -- the interface -------------------------------------------------------------------------

    @abc.abstractmethod
    def readinto(self, offset: int, buffer) -> None:
        """Fill ``buffer`` with the virtual disk bytes at ``offset``."""

    @abc.abstractmethod
    def _write(self, offset: int, data: memoryview) -> None:
        """Write sector-aligned ``data``; the caller has checked range and writability."""

    @abc.abstractmethod
    def _trim(self, offset: int, length: int) -> None:
        """Make a sector-aligned range read as zeros, releasing space where the format can."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    def start_flush(self) -> None:  # noqa: B027 - a hint; a device may have nothing to start
        """Begin making completed writes durable without waiting; long copies call it as they go so
        the final ``flush()`` does not wait for everything at once."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Flush and release the file; called once."""

    @abc.abstractmethod
    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        """Extents covering [start, end) in order; neighbours may repeat a state."""

    # -- shared behaviour ----------------------------------------------------------------------

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Contiguous, coalesced extents covering [offset, offset+length) (to the end by default)."""
        length = self.size - offset if length is None else length
        self._check_range(offset, length)
        return coalesce(self._extents(offset, offset + length))

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        buffer = bytearray(length)
        self.readinto(offset, buffer)
        return bytes(buffer)

    @property
    def write_alignment(self) -> int:
        """Writes and trims reach the format in whole units of this many bytes (or end at the end of
        the disk); the logical sector unless a format needs coarser units."""
        return self.logical_sector_size

    def write(self, offset: int, data) -> None:
        """Write ``data`` at any byte offset and length inside the disk."""
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
        """Discard a range: afterwards it reads as zeros."""
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

    def close(self) -> None:
        if not self.closed:
            try:
                self._close()
            finally:
                self.closed = True

    def info(self) -> dict:
        """What ``hvbackup disk info`` shows; formats add their own fields."""
        return {
            "path": self.path,
            "format": self.format,
            "type": self.disk_type,
            "virtual_size": self.size,
            "block_size": self.block_size,
            "logical_sector_size": self.logical_sector_size,
            "physical_sector_size": self.physical_sector_size,
            "disk_id": str(self.disk_id) if self.disk_id else None,
            "parent": self.parent.path if self.parent else None,
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} {self.disk_type} {self.size} bytes>"

    # -- helpers for subclasses ----------------------------------------------------------------

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

    def _check_range(self, offset: int, length: int) -> None:
        if self.closed:
            raise DiskError(f"{self.path}: disk is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(
                f"{self.path}: range {offset:#x}+{length:#x} lies outside the disk ({self.size} bytes)"
            )

    def _check_writable(self) -> None:
        if self.read_only:
            raise DiskError(f"{self.path}: disk is open read-only")

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

def coalesce(extents: Iterator[Extent]) -> Iterator[Extent]:
    """Merge neighbours with the same state and depth."""
    pending: Extent | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if pending and pending.end == ext.offset and pending.state == ext.state and pending.depth == ext.depth:
            pending = Extent(pending.offset, pending.length + ext.length, ext.state, ext.depth)
            continue
        if pending:
            yield pending
        pending = ext
    if pending:
        yield pending
