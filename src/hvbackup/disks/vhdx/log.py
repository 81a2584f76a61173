"""[MS-VHDX] 2.3.1 Log Entry and its parts: entry header, zero and data descriptors, data sectors.

An entry is a run of 4 KiB sectors: descriptor sectors (the first opens with the 64-byte entry
header and holds 126 descriptors, later ones 128), then one data sector per data descriptor. Every
piece repeats the entry's sequence number, and a CRC-32C covers the whole entry, so torn or stale
writes fail validation.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from typing import Callable

from hvbackup.disks.vhdx.checksum import crc32c_with_zeroed_field
from hvbackup.units import KiB, MiB

SECTOR = 4096
ENTRY_SIGNATURE = b"loge"
ZERO_SIGNATURE = b"zero"
DATA_DESCRIPTOR_SIGNATURE = b"desc"
DATA_SECTOR_SIGNATURE = b"data"

# 2.3.1.1: Signature, Checksum, EntryLength, Tail, SequenceNumber, DescriptorCount, Reserved,
# LogGuid, FlushedFileOffset, LastFileOffset.
_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
# 2.3.1.2 zero descriptor: ZeroSignature, Reserved, ZeroLength, FileOffset, SequenceNumber.
_ZERO_DESCRIPTOR = struct.Struct("<4sIQQQ")
# 2.3.1.3 data descriptor: DataSignature, TrailingBytes, LeadingBytes, FileOffset, SequenceNumber.
_DATA_DESCRIPTOR = struct.Struct("<4s4s8sQQ")
_DESCRIPTOR_SIZE = 32
_FIRST_SECTOR_DESCRIPTORS = (SECTOR - _ENTRY_HEADER.size) // _DESCRIPTOR_SIZE  # 126
_LATER_SECTOR_DESCRIPTORS = SECTOR // _DESCRIPTOR_SIZE                          # 128

# No log field may reach past this file offset: 64 TiB of payload plus generous metadata.
MAX_FILE_OFFSET = 1 << 47
# An entry may be longer than its descriptor and data sectors (2.3.1 allows larger alignment); at
# most by this much, so a forged length cannot make every candidate in a search a huge read.
MAX_ENTRY_PADDING = 64 * KiB


def descriptor_sectors(count: int) -> int:
    if count <= _FIRST_SECTOR_DESCRIPTORS:
        return 1
    return 1 + -(-(count - _FIRST_SECTOR_DESCRIPTORS) // _LATER_SECTOR_DESCRIPTORS)


def entry_length(data_sectors: int) -> int:
    """Bytes of an entry carrying ``data_sectors`` pages and no zero descriptors."""
    return (descriptor_sectors(data_sectors) + data_sectors) * SECTOR


@dataclass
class LogEntry:
    """A validated entry; ``updates`` keeps descriptor order as (file offset, 4 KiB page or None,
    length) — None meaning a zeroed range."""

    position: int
    length: int
    tail: int
    sequence: int
    flushed_file_offset: int
    last_file_offset: int
    updates: list[tuple[int, bytes | None, int]] = field(default_factory=list)


def build_entry(
    *,
    sequence: int,
    tail: int,
    log_guid: uuid.UUID,
    pages: list[tuple[int, bytes]],
    flushed_file_offset: int,
    last_file_offset: int,
) -> bytes:
    """One log entry writing each (file offset, 4 KiB page) of ``pages``."""
    count = len(pages)
    desc_sectors = descriptor_sectors(count)
    buf = bytearray((desc_sectors + count) * SECTOR)
    _ENTRY_HEADER.pack_into(
        buf, 0, ENTRY_SIGNATURE, 0, len(buf), tail, sequence, count, 0,
        log_guid.bytes_le, flushed_file_offset, last_file_offset,
    )
    high, low = _sequence_halves(sequence)
    for i, (file_offset, page) in enumerate(pages):
        _DATA_DESCRIPTOR.pack_into(
            buf, _descriptor_offset(i), DATA_DESCRIPTOR_SIGNATURE,
            page[4092:4096], page[0:8], file_offset, sequence,
        )
        start = (desc_sectors + i) * SECTOR
        buf[start:start + 4] = DATA_SECTOR_SIGNATURE
        buf[start + 4:start + 8] = high
        buf[start + 8:start + 4092] = page[8:4092]
        buf[start + 4092:start + 4096] = low
    struct.pack_into("<I", buf, 4, crc32c_with_zeroed_field(buf, 4))
    return bytes(buf)


def _sequence_halves(sequence: int) -> tuple[bytes, bytes]:
    """2.3.1.4: SequenceHigh and SequenceLow, the upper and lower four bytes of the number."""
    packed = struct.pack("<Q", sequence)
    return packed[4:], packed[:4]


def _descriptor_offset(index: int) -> int:
    if index < _FIRST_SECTOR_DESCRIPTORS:
        return _ENTRY_HEADER.size + index * _DESCRIPTOR_SIZE
    index -= _FIRST_SECTOR_DESCRIPTORS
    return SECTOR * (1 + index // _LATER_SECTOR_DESCRIPTORS) + (index % _LATER_SECTOR_DESCRIPTORS) * _DESCRIPTOR_SIZE


def parse_entry(
    read: Callable[[int, int], bytes], position: int, log_length: int, log_guid: uuid.UUID
) -> LogEntry | None:
    """The valid entry at ``position`` of the ring, or None. ``read(pos, n)`` reads the ring,
    wrapping at its end. Every field is checked before it is used as a length or offset, and the
    cheap checks (header, then descriptors) come before reading and checksumming the whole entry,
    so a log full of plausible headers costs little to search."""
    head = read(position, SECTOR)
    (signature, checksum, length, tail, sequence, count, reserved, guid, flushed, last) = (
        _ENTRY_HEADER.unpack_from(head)
    )
    if signature != ENTRY_SIGNATURE or reserved != 0 or guid != log_guid.bytes_le or sequence == 0:
        return None
    if length % SECTOR or not SECTOR <= length <= log_length or tail % SECTOR or tail >= log_length:
        return None
    if flushed % MiB or last % MiB or flushed > MAX_FILE_OFFSET or last > MAX_FILE_OFFSET:
        return None
    desc_sectors = descriptor_sectors(count)
    if desc_sectors * SECTOR > length:
        return None
    descriptors = _read_descriptors(read(position, desc_sectors * SECTOR), count, sequence)
    if descriptors is None:
        return None
    needed = (desc_sectors + sum(1 for kind, *_ in descriptors if kind == DATA_DESCRIPTOR_SIGNATURE)) * SECTOR
    if not needed <= length <= needed + MAX_ENTRY_PADDING:
        return None
    data = read(position, length)
    if checksum != crc32c_with_zeroed_field(data, 4):
        return None
    entry = LogEntry(position, length, tail, sequence, flushed, last)
    high, low = _sequence_halves(sequence)
    start = desc_sectors * SECTOR
    for kind, file_offset, extra in descriptors:
        if kind == ZERO_SIGNATURE:
            entry.updates.append((file_offset, None, extra))
            continue
        sector = data[start:start + SECTOR]
        if sector[:4] != DATA_SECTOR_SIGNATURE or sector[4:8] != high or sector[4092:] != low:
            return None
        leading, trailing = extra
        entry.updates.append((file_offset, leading + sector[8:4092] + trailing, SECTOR))
        start += SECTOR
    return entry


def _read_descriptors(sectors: bytes, count: int, sequence: int) -> list[tuple] | None:
    """2.3.1.2 and 2.3.1.3: (kind, file offset, zero length | (leading, trailing bytes)) for each
    descriptor, or None if any is malformed or belongs to another entry."""
    found = []
    for i in range(count):
        off = _descriptor_offset(i)
        kind = sectors[off:off + 4]
        if kind == ZERO_SIGNATURE:
            _sig, reserved, zero_length, file_offset, seq = _ZERO_DESCRIPTOR.unpack_from(sectors, off)
            if reserved or seq != sequence or zero_length % SECTOR or file_offset % SECTOR:
                return None
            if file_offset + zero_length > MAX_FILE_OFFSET:
                return None
            found.append((kind, file_offset, zero_length))
        elif kind == DATA_DESCRIPTOR_SIGNATURE:
            _sig, trailing, leading, file_offset, seq = _DATA_DESCRIPTOR.unpack_from(sectors, off)
            if seq != sequence or file_offset % SECTOR or file_offset > MAX_FILE_OFFSET:
                return None
            found.append((kind, file_offset, (leading, trailing)))
        else:
            return None
    return found
