"""[MS-VHDX] 2.2.3 Region Table: where the BAT, the metadata region and any other regions live.

Two copies, at 192 KiB and 256 KiB, each a 64 KiB table with a CRC-32C over the whole table.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from hvbackup.disks.vhdx.checksum import crc32c_with_zeroed_field
from hvbackup.errors import DiskFormatError
from hvbackup.units import KiB, MiB

SIGNATURE = b"regi"
SIZE = 64 * KiB
OFFSETS = (192 * KiB, 256 * KiB)
MAX_ENTRIES = 2047

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
KNOWN_REGIONS = {BAT_GUID: "BAT", METADATA_GUID: "metadata"}

_HEADER = struct.Struct("<4sIII")      # 2.2.3.1: Signature, Checksum, EntryCount, Reserved
_ENTRY = struct.Struct("<16sQII")      # 2.2.3.2: Guid, FileOffset, Length, Required


@dataclass(frozen=True)
class RegionEntry:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool

    @property
    def end(self) -> int:
        return self.file_offset + self.length


@dataclass(frozen=True)
class RegionTable:
    entries: tuple[RegionEntry, ...]

    def find(self, guid: uuid.UUID) -> RegionEntry:
        for entry in self.entries:
            if entry.guid == guid:
                return entry
        raise DiskFormatError(f"the region table has no {KNOWN_REGIONS.get(guid, guid)} region",
                              reason="vhdx.region.missing")

    def pack(self) -> bytes:
        buf = bytearray(SIZE)
        _HEADER.pack_into(buf, 0, SIGNATURE, 0, len(self.entries), 0)
        for i, entry in enumerate(self.entries):
            _ENTRY.pack_into(
                buf, _HEADER.size + i * _ENTRY.size,
                entry.guid.bytes_le, entry.file_offset, entry.length, int(entry.required),
            )
        struct.pack_into("<I", buf, 4, crc32c_with_zeroed_field(buf, 4))
        return bytes(buf)

    @classmethod
    def unpack(cls, data: bytes) -> RegionTable:
        signature, checksum, count, _reserved = _HEADER.unpack_from(data)
        if signature != SIGNATURE:
            raise DiskFormatError("region table signature is wrong", reason="vhdx.region.signature")
        if checksum != crc32c_with_zeroed_field(data[:SIZE], 4):
            raise DiskFormatError("region table checksum is wrong", reason="vhdx.region.checksum")
        if count > MAX_ENTRIES:
            raise DiskFormatError(f"region table has {count} entries (at most {MAX_ENTRIES} allowed)",
                                  reason="vhdx.region.entry-count")
        entries = []
        for i in range(count):
            raw_guid, offset, length, required = _ENTRY.unpack_from(data, _HEADER.size + i * _ENTRY.size)
            entries.append(RegionEntry(uuid.UUID(bytes_le=raw_guid), offset, length, bool(required & 1)))
        table = cls(tuple(entries))
        table._validate()
        return table

    def _validate(self) -> None:
        seen = set()
        for entry in self.entries:
            name = KNOWN_REGIONS.get(entry.guid, str(entry.guid))
            if entry.guid in seen:
                raise DiskFormatError(f"region {name} appears twice in the region table",
                                      reason="vhdx.region.duplicate")
            seen.add(entry.guid)
            if entry.file_offset % MiB or entry.file_offset < MiB:
                raise DiskFormatError(
                    f"region {name} offset {entry.file_offset:#x} is not 1 MiB aligned past the header",
                    reason="vhdx.region.offset")
            if entry.length % MiB or entry.length == 0:
                raise DiskFormatError(f"region {name} length {entry.length:#x} is not a positive multiple of 1 MiB",
                                      reason="vhdx.region.length")
        ordered = sorted(self.entries, key=lambda e: e.file_offset)
        for a, b in zip(ordered, ordered[1:]):
            if a.end > b.file_offset:
                raise DiskFormatError(
                    f"regions {KNOWN_REGIONS.get(a.guid, a.guid)} and {KNOWN_REGIONS.get(b.guid, b.guid)} overlap",
                    reason="vhdx.region.overlap",
                )

    def unknown_required(self) -> list[RegionEntry]:
        return [e for e in self.entries if e.required and e.guid not in KNOWN_REGIONS]
