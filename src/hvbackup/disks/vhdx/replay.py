"""[MS-VHDX] 2.3.2 Log Sequence and 2.3.3 Log Replay.

A file whose header carries a non-zero LogGuid may hold metadata updates that never reached their
final place. Opening it finds the newest valid, complete sequence of entries (the active sequence)
and replays it: in place for a read-write open, into an in-memory overlay for a read-only open
(footnote <5>), so that a read-only open never modifies the file.
"""

from __future__ import annotations

import os
import uuid

from hvbackup.disks.fileio import io_error, sync_data, write_at, write_zeros
from hvbackup.disks.vhdx import region
from hvbackup.disks.vhdx.log import SECTOR, LogEntry, parse_entry
from hvbackup.errors import DiskFormatError
from hvbackup.units import MiB

# Hyper-V, qemu and hvbackup make 1 MiB logs; a pending log larger than this is refused rather
# than read into memory and searched.
MAX_LOG_LENGTH = 64 * MiB


def find_active_sequence(ring: bytes, log_guid: uuid.UUID) -> list[LogEntry]:
    """The entries to replay, tail first, found by the search 2.3.3 describes."""
    length = len(ring)

    def read(position: int, count: int) -> bytes:
        end = position + count
        if end <= length:
            return ring[position:end]
        return ring[position:] + ring[:end - length]

    best: list[LogEntry] = []
    current_tail = old_tail = 0
    while True:
        sequence: list[LogEntry] = []
        head = current_tail
        while len(sequence) <= length // SECTOR:
            entry = parse_entry(read, head, length, log_guid)
            if entry is None or (sequence and entry.sequence != sequence[-1].sequence + 1):
                break
            sequence.append(entry)
            head = (head + entry.length) % length
        starts = [e.position for e in sequence]
        valid = bool(sequence) and sequence[-1].tail in starts
        if valid and sequence[-1].sequence > (best[-1].sequence if best else 0):
            best = sequence[starts.index(sequence[-1].tail):]
        current_tail = head if valid else (current_tail + SECTOR) % length
        if current_tail <= old_tail:
            break
        old_tail = current_tail
    if not best:
        raise DiskFormatError("the VHDX log must be replayed but holds no valid log sequence",
                              reason="vhdx.log.sequence")
    return best


def read_active_sequence(
    fd: int, log_offset: int, log_length: int, log_guid: uuid.UUID, file_size: int
) -> list[LogEntry]:
    if log_length > MAX_LOG_LENGTH:
        raise DiskFormatError(f"the VHDX log is {log_length} bytes; more than {MAX_LOG_LENGTH} is refused",
                              reason="vhdx.log.too-large")
    if log_offset + log_length > file_size:
        raise DiskFormatError("file is truncated: the VHDX log lies past the end of the file",
                              reason="vhdx.log.beyond-file")
    ring = os.pread(fd, log_length, log_offset)
    entries = find_active_sequence(ring, log_guid)
    if file_size < entries[-1].flushed_file_offset:
        raise DiskFormatError(
            f"file is truncated: the log says it was at least {entries[-1].flushed_file_offset} bytes, "
            f"it is {file_size}",
            reason="vhdx.log.flushed-file-offset",
        )
    log_end = log_offset + log_length
    for entry in entries:
        for offset, _data, count in entry.updates:
            if offset < region.OFFSETS[0] or (offset < log_end and offset + count > log_offset):
                raise DiskFormatError(
                    f"the VHDX log would overwrite the header section or the log itself at {offset:#x}",
                    reason="vhdx.log.protected-target",
                )
    return entries


def replay_in_place(fd: int, entries: list[LogEntry]) -> None:
    """Write every update of the sequence to its final place and flush (2.3.3)."""
    try:
        for entry in entries:
            for offset, data, count in entry.updates:
                if data is None:
                    if os.fstat(fd).st_size < offset + count:
                        os.ftruncate(fd, offset + count)
                    write_zeros(fd, offset, count)
                else:
                    write_at(fd, data, offset)
        last = entries[-1].last_file_offset
        if os.fstat(fd).st_size < last:
            os.ftruncate(fd, last)
    except OSError as exc:
        raise io_error(fd, "replaying the log", exc) from exc
    sync_data(fd)


class Overlay:
    """The active sequence held in memory for a read-only open; patches reads of the file."""

    def __init__(self, entries: list[LogEntry] | None = None):
        self._updates: list[tuple[int, bytes | None, int]] = []
        self.last_file_offset = 0
        for entry in entries or ():
            self._updates.extend(entry.updates)
            self.last_file_offset = max(self.last_file_offset, entry.last_file_offset)
        self._low = min((u[0] for u in self._updates), default=0)
        self._high = max((u[0] + u[2] for u in self._updates), default=0)

    def __bool__(self) -> bool:
        return bool(self._updates)

    def spans(self, start: int, end: int) -> list[tuple[int, int]]:
        """The [low, high) parts of [start, end) that updates cover."""
        return [(max(start, at), min(end, at + count)) for at, _data, count in self._updates
                if at < end and at + count > start]

    def patch(self, offset: int, buffer: memoryview) -> None:
        """Apply the updates, oldest first, to ``buffer`` holding file bytes read at ``offset``."""
        end = offset + len(buffer)
        if end <= self._low or offset >= self._high:
            return
        for start, data, count in self._updates:
            lo, hi = max(start, offset), min(start + count, end)
            if lo >= hi:
                continue
            if data is None:
                buffer[lo - offset:hi - offset] = bytes(hi - lo)
            else:
                buffer[lo - offset:hi - offset] = data[lo - start:hi - start]

