"""The write side of [MS-VHDX] 2.3: every metadata update goes through the log.

A commit is one log entry holding the new contents of every dirty 4 KiB metadata page:

1. flush payload data (and file growth), so nothing the new metadata points at can be lost;
2. write the entry and flush it — from here a crash replays it;
3. write each page to its final place and flush.

Each entry's tail points at itself: an entry is applied before the next is written, so the newest
valid entry alone describes everything not yet known to be in place — as long as it survives.
Entries go one after another round the ring; when the next one would overwrite the newest (a large
entry after a wrap), the log is first marked empty (LogGuid zero: everything is applied) and a new
LogGuid begins, because a torn overwrite would otherwise leave an older, long-applied entry of the
same GUID as the newest valid one, and replaying it would undo later updates. A GUID's first entry
is written before the header names it, so a header never points at a log without a valid sequence;
a clean close sets LogGuid back to zero.
"""

from __future__ import annotations

import os
import uuid

from hvbackup.disks.fileio import sync_data, write_at
from hvbackup.disks.vhdx.header import NULL_GUID, HeaderSet
from hvbackup.disks.vhdx.log import SECTOR, build_entry, entry_length
from hvbackup.errors import DiskError
from hvbackup.units import MiB


def pages_per_entry(log_length: int) -> int:
    """The most 4 KiB pages one entry can carry in a log of ``log_length`` bytes."""
    count = log_length // SECTOR
    while count and entry_length(count) > log_length:
        count -= 1
    return count


class Journal:
    def __init__(self, fd: int, headers: HeaderSet):
        self._fd = fd
        self._headers = headers
        self._offset = headers.current.log_offset
        self._length = headers.current.log_length
        self.capacity = pages_per_entry(self._length)
        self._position = 0
        self._sequence = 0
        self._guid = uuid.uuid4()
        self._newest: tuple[int, int] | None = None  # (position, length) of the entry a crash replays

    def commit(self, pages: list[tuple[int, bytes]], last_file_offset: int) -> None:
        """Make ``pages`` (file offset, 4 KiB contents) durable at their final places, atomically."""
        if not pages:
            return
        if len(pages) > self.capacity:
            raise DiskError(f"a metadata update of {len(pages)} pages exceeds the log ({self.capacity} pages)")
        sync_data(self._fd)
        size = os.fstat(self._fd).st_size
        length = entry_length(len(pages))
        if self._position + length > self._length:
            self._position = 0
        if self._newest and self._position < sum(self._newest) and self._newest[0] < self._position + length:
            self._start_new_guid()
        self._sequence += 1
        entry = build_entry(
            sequence=self._sequence,
            tail=self._position,
            log_guid=self._guid,
            pages=pages,
            flushed_file_offset=size // MiB * MiB,
            last_file_offset=last_file_offset,
        )
        write_at(self._fd, entry, self._offset + self._position)
        sync_data(self._fd)
        if self._headers.current.log_guid != self._guid:
            self._headers.update(log_guid=self._guid)
        self._newest = (self._position, length)
        self._position += length
        self._apply(pages)

    def _start_new_guid(self) -> None:
        """Retire every entry written so far (all are applied and flushed) before overwriting one."""
        self._headers.update(log_guid=NULL_GUID)
        self._guid = uuid.uuid4()
        self._sequence = 0
        self._newest = None

    def _apply(self, pages: list[tuple[int, bytes]]) -> None:
        for offset, page in sorted(pages):
            write_at(self._fd, page, offset)
        sync_data(self._fd)

    def close(self) -> None:
        """Mark the log empty: everything in it has been applied."""
        if self._headers.current.log_guid != NULL_GUID:
            self._headers.update(log_guid=NULL_GUID)
