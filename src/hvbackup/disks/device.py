"""The block device interface every layer of the I/O stack implements.

A format (VHDX, VHD, raw; ``filedisk.py``) sits at the bottom; filters (``filter.py``: change
tracking, the host's attachment) wrap a device and expose the same interface, the way nbdkit stacks
filters on a plugin. Callers ask a device what it can do rather than what class it is.
"""

from __future__ import annotations

import abc
import enum
import uuid
from dataclasses import dataclass
from typing import Iterator

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
    """What the disk is (size and geometry), readinto/read, write, trim, flush, extents, close, and
    what the device can do."""

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

    # -- I/O -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def readinto(self, offset: int, buffer) -> None:
        """Fill ``buffer`` with the virtual disk bytes at ``offset``."""

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        buffer = bytearray(length)
        self.readinto(offset, buffer)
        return bytes(buffer)

    @abc.abstractmethod
    def write(self, offset: int, data) -> None:
        """Write ``data`` at any byte offset and length inside the disk."""

    @abc.abstractmethod
    def trim(self, offset: int, length: int) -> None:
        """Discard a range: afterwards it reads as zeros."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    def start_flush(self) -> None:  # noqa: B027 - a hint; a device may have nothing to start
        """Begin making completed writes durable without waiting; long copies call it as they go so
        the final ``flush()`` does not wait for everything at once."""

    @abc.abstractmethod
    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Contiguous, coalesced extents covering [offset, offset+length) (to the end by default)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release the disk; closing again does nothing."""

    # -- what the device is and can do ---------------------------------------------------------

    @property
    def write_alignment(self) -> int:
        """Writes and trims reach the format in whole units of this many bytes (or end at the end of
        the disk); the logical sector unless a format needs coarser units."""
        return self.logical_sector_size

    @property
    def linkage_id(self) -> uuid.UUID | None:
        """What a differencing child records to know this disk as its parent; None for a format that
        has no children."""
        return None

    def change_tracker(self):
        """The layer of this stack that records every write and can say what changed since a point
        it sealed, or None if no layer does (a filter that tracks changes answers itself)."""
        return None

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

    # -- checks every layer that takes a call makes --------------------------------------------

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
