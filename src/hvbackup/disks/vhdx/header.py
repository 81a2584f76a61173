"""[MS-VHDX] 2.2.2 Headers and 2.2.2.1 Updating the Headers.

Two 4 KiB headers at 64 KiB and 128 KiB; the valid one with the greater sequence number is current.
Headers never go through the log: an update overwrites the non-current slot and flushes, then does
the same to the other slot so both hold the newest state.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
from dataclasses import dataclass

from hvbackup.disks.fileio import read_exact, readinto_at, sync_data, write_at
from hvbackup.disks.vhdx.checksum import crc32c_with_zeroed_field
from hvbackup.errors import DiskError, DiskFormatError
from hvbackup.units import KiB, MiB

SIGNATURE = b"head"
SIZE = 4096
OFFSETS = (64 * KiB, 128 * KiB)
NULL_GUID = uuid.UUID(int=0)

# Signature, Checksum, SequenceNumber, FileWriteGuid, DataWriteGuid, LogGuid, LogVersion, Version,
# LogLength, LogOffset; then 4016 reserved bytes.
_LAYOUT = struct.Struct("<4sIQ16s16s16sHHIQ")


@dataclass(frozen=True)
class Header:
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_length: int
    log_offset: int
    log_version: int = 0
    version: int = 1

    def pack(self) -> bytes:
        buf = bytearray(SIZE)
        _LAYOUT.pack_into(
            buf, 0, SIGNATURE, 0, self.sequence_number,
            self.file_write_guid.bytes_le, self.data_write_guid.bytes_le, self.log_guid.bytes_le,
            self.log_version, self.version, self.log_length, self.log_offset,
        )
        struct.pack_into("<I", buf, 4, crc32c_with_zeroed_field(buf, 4))
        return bytes(buf)

    @classmethod
    def unpack(cls, data: bytes) -> Header | None:
        """The header in ``data``, or None if its signature or checksum is wrong (not valid)."""
        fields = _LAYOUT.unpack_from(data)
        if fields[0] != SIGNATURE or fields[1] != crc32c_with_zeroed_field(data[:SIZE], 4):
            return None
        return cls(
            sequence_number=fields[2],
            file_write_guid=uuid.UUID(bytes_le=fields[3]),
            data_write_guid=uuid.UUID(bytes_le=fields[4]),
            log_guid=uuid.UUID(bytes_le=fields[5]),
            log_version=fields[6],
            version=fields[7],
            log_length=fields[8],
            log_offset=fields[9],
        )

    @property
    def log_pending(self) -> bool:
        return self.log_guid != NULL_GUID


def any_valid(fd: int) -> bool:
    """True if either slot holds a header with a valid signature and checksum: a VHDX file, even if
    its file type identifier was overwritten (a raw image practically never has one there)."""
    slot = memoryview(bytearray(SIZE))
    for offset in OFFSETS:
        readinto_at(fd, slot, offset)
        if Header.unpack(bytes(slot)) is not None:
            return True
    return False


def choose_current(slots: list[Header | None], raw: list[bytes]) -> int:
    """Index of the current header. Identical headers with equal sequence numbers (Disk2VHD) are
    accepted as header 1, as other readers do, although [MS-VHDX] 2.2.2 calls that corrupt."""
    first, second = slots
    if first is None and second is None:
        raise DiskFormatError("no valid VHDX header: both header checksums or signatures are wrong",
                              reason="vhdx.header.checksum")
    if second is None:
        return 0
    if first is None:
        return 1
    if first.sequence_number == second.sequence_number and raw[0][:SIZE] != raw[1][:SIZE]:
        raise DiskFormatError("the two VHDX headers differ but carry the same sequence number",
                              reason="vhdx.header.sequence")
    return 0 if first.sequence_number >= second.sequence_number else 1


def validate(header: Header) -> None:
    """The rules a current header must meet before anything else in the file is trusted."""
    if header.version != 1:
        raise DiskFormatError(f"unsupported VHDX version {header.version} (only 1 is defined)",
                              reason="vhdx.header.version")
    if header.log_version != 0 and header.log_pending:
        raise DiskFormatError(f"unsupported VHDX log version {header.log_version} with a log to replay",
                              reason="vhdx.header.log-version")
    if header.log_offset % MiB or header.log_length % MiB:
        raise DiskFormatError("VHDX log offset and length must be multiples of 1 MiB",
                              reason="vhdx.header.log-alignment")
    if header.log_length and header.log_offset < MiB:
        raise DiskFormatError("the VHDX log overlaps the header section", reason="vhdx.header.log-overlap")
    if header.log_pending and not header.log_length:
        raise DiskFormatError("the VHDX header has a log to replay but no log space", reason="vhdx.header.no-log-space")


class HeaderSet:
    """The two header slots of an open file and the 2.2.2.1 update procedure."""

    def __init__(self, fd: int, current: Header, index: int, both_valid: bool):
        self._fd = fd
        self.current = current
        self._index = index
        self.both_valid = both_valid
        self._session_guid: uuid.UUID | None = None

    @classmethod
    def read(cls, fd: int) -> HeaderSet:
        raw = [read_exact(fd, SIZE, off, "VHDX header") for off in OFFSETS]
        slots = [Header.unpack(r) for r in raw]
        index = choose_current(slots, raw)
        current = slots[index]
        validate(current)
        return cls(fd, current, index, both_valid=all(s is not None for s in slots))

    @property
    def first_update_done(self) -> bool:
        return self._session_guid is not None

    def update(self, **changes) -> None:
        """Write new header contents to both slots, non-current first, flushing after each.

        The first update of a session also takes a new FileWriteGuid, as 2.2.2 requires before any
        other modification of the file.
        """
        if self._session_guid is None:
            self._session_guid = uuid.uuid4()
        if self.current.sequence_number >= 2**64 - 2:
            raise DiskError("the VHDX header sequence number is exhausted")
        for _ in range(2):
            new = dataclasses.replace(
                self.current,
                sequence_number=self.current.sequence_number + 1,
                file_write_guid=self._session_guid,
                **changes,
            )
            target = 1 - self._index
            write_at(self._fd, new.pack(), OFFSETS[target])
            sync_data(self._fd)
            self.current, self._index = new, target
        self.both_valid = True


def initial_headers(log_offset: int, log_length: int, data_write_guid: uuid.UUID) -> list[bytes]:
    """Both header slots of a new file; sequence numbers 1 and 2, so slot 2 is current."""
    first = Header(
        sequence_number=1,
        file_write_guid=uuid.uuid4(),
        data_write_guid=data_write_guid,
        log_guid=NULL_GUID,
        log_length=log_length,
        log_offset=log_offset,
    )
    second = dataclasses.replace(first, sequence_number=2)
    return [first.pack(), second.pack()]
