"""[MS-VHDX] 2.6 Metadata Region: the 64 KiB table (2.6.1) and the known items (2.6.2).

Items this engine does not interpret are kept byte for byte and written back unchanged; an unknown
item marked IsRequired makes the file unopenable, as 2.6.1.2 requires.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable

from hvbackup.disks.vhdx.locator import ParentLocator
from hvbackup.errors import DiskError, DiskFormatError
from hvbackup.units import KiB, MiB

SIGNATURE = b"metadata"
TABLE_SIZE = 64 * KiB
MAX_ENTRIES = 2047
MAX_USER_ENTRIES = 1024
MAX_ITEM_LENGTH = MiB

FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

_ITEM_NAMES = {
    FILE_PARAMETERS: "File Parameters",
    VIRTUAL_DISK_SIZE: "Virtual Disk Size",
    VIRTUAL_DISK_ID: "Virtual Disk ID",
    LOGICAL_SECTOR_SIZE: "Logical Sector Size",
    PHYSICAL_SECTOR_SIZE: "Physical Sector Size",
    PARENT_LOCATOR: "Parent Locator",
}
# 2.6.2: the IsVirtualDisk flag of each known system item (all are IsRequired).
_VIRTUAL_DISK_ITEMS = {VIRTUAL_DISK_SIZE, VIRTUAL_DISK_ID, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE}

_TABLE_HEADER = struct.Struct("<8sHH20s")   # 2.6.1.1: Signature, Reserved, EntryCount, Reserved2
_TABLE_ENTRY = struct.Struct("<16sIIII")    # 2.6.1.2: ItemID, Offset, Length, flags, Reserved2
_IS_USER, _IS_VIRTUAL_DISK, _IS_REQUIRED = 1, 2, 4


@dataclass(frozen=True)
class MetadataEntry:
    """2.6.1.2 Metadata Table Entry."""

    item_id: uuid.UUID
    offset: int
    length: int
    is_user: bool = False
    is_virtual_disk: bool = False
    is_required: bool = False

    @property
    def name(self) -> str:
        return _ITEM_NAMES.get(self.item_id, str(self.item_id)) if not self.is_user else f"user item {self.item_id}"

    def pack(self) -> bytes:
        flags = self.is_user * _IS_USER | self.is_virtual_disk * _IS_VIRTUAL_DISK | self.is_required * _IS_REQUIRED
        return _TABLE_ENTRY.pack(self.item_id.bytes_le, self.offset, self.length, flags, 0)

    @classmethod
    def unpack(cls, data: bytes, at: int) -> MetadataEntry:
        raw_id, offset, length, flags, _reserved2 = _TABLE_ENTRY.unpack_from(data, at)
        return cls(
            uuid.UUID(bytes_le=raw_id), offset, length,
            bool(flags & _IS_USER), bool(flags & _IS_VIRTUAL_DISK), bool(flags & _IS_REQUIRED),
        )


def unpack_table(data: bytes, region_length: int) -> list[MetadataEntry]:
    """2.6.1 Metadata Table: validated entries, items inside the region and not overlapping."""
    signature, _reserved, count, _reserved2 = _TABLE_HEADER.unpack_from(data)
    if signature != SIGNATURE:
        raise DiskFormatError("metadata table signature is wrong", reason="vhdx.metadata.signature")
    if count > MAX_ENTRIES:
        raise DiskFormatError(f"metadata table has {count} entries (at most {MAX_ENTRIES} allowed)",
                              reason="vhdx.metadata.entry-count")
    entries = [MetadataEntry.unpack(data, _TABLE_HEADER.size + i * _TABLE_ENTRY.size) for i in range(count)]
    if sum(e.is_user for e in entries) > MAX_USER_ENTRIES:
        raise DiskFormatError(f"metadata table has more than {MAX_USER_ENTRIES} user items",
                              reason="vhdx.metadata.user-entry-count")
    if len({(e.item_id, e.is_user) for e in entries}) != len(entries):
        raise DiskFormatError("metadata table lists an item twice", reason="vhdx.metadata.duplicate")
    for e in entries:
        if e.length > MAX_ITEM_LENGTH:
            raise DiskFormatError(f"metadata item {e.name} is {e.length} bytes (at most 1 MiB allowed)",
                                  reason="vhdx.metadata.item-length")
        if e.length == 0 and e.offset != 0:
            raise DiskFormatError(f"empty metadata item {e.name} has a non-zero offset",
                                  reason="vhdx.metadata.item-offset")
        if e.length and (e.offset < TABLE_SIZE or e.offset + e.length > region_length):
            raise DiskFormatError(f"metadata item {e.name} lies outside the metadata region",
                                  reason="vhdx.metadata.item-outside")
    placed = sorted((e for e in entries if e.length), key=lambda e: e.offset)
    for a, b in zip(placed, placed[1:]):
        if a.offset + a.length > b.offset:
            raise DiskFormatError(f"metadata items {a.name} and {b.name} overlap", reason="vhdx.metadata.overlap")
    return entries


@dataclass(frozen=True)
class FileParameters:
    """2.6.2.1 File Parameters."""

    block_size: int
    leave_block_allocated: bool = False
    has_parent: bool = False

    def pack(self) -> bytes:
        return struct.pack("<II", self.block_size, self.leave_block_allocated | self.has_parent << 1)

    @classmethod
    def unpack(cls, data: bytes) -> FileParameters:
        block_size, flags = struct.unpack_from("<II", data)
        if flags & ~3:
            raise DiskFormatError("File Parameters has reserved bits set", reason="vhdx.metadata.reserved-bits")
        return cls(block_size, bool(flags & 1), bool(flags & 2))


def _u32(data: bytes) -> int:
    return struct.unpack_from("<I", data)[0]


_MIN_LENGTH = {
    FILE_PARAMETERS: 8, VIRTUAL_DISK_SIZE: 8, VIRTUAL_DISK_ID: 16, LOGICAL_SECTOR_SIZE: 4,
    PHYSICAL_SECTOR_SIZE: 4, PARENT_LOCATOR: 20,
}


@dataclass(frozen=True)
class Metadata:
    """The decoded metadata region: the known items (2.6.2.1-2.6.2.6) and every other item kept raw."""

    file_parameters: FileParameters
    virtual_size: int                      # 2.6.2.2
    disk_id: uuid.UUID                     # 2.6.2.3
    logical_sector_size: int               # 2.6.2.4
    physical_sector_size: int              # 2.6.2.5
    parent_locator: ParentLocator | None = None
    other_items: tuple[tuple[MetadataEntry, bytes], ...] = field(default_factory=tuple)

    @classmethod
    def read(cls, read: Callable[[int, int], bytes], region_length: int) -> Metadata:
        """``read(offset, length)`` reads the metadata region."""
        entries = unpack_table(read(0, TABLE_SIZE), region_length)
        known: dict[uuid.UUID, bytes] = {}
        entry_of: dict[uuid.UUID, MetadataEntry] = {}
        others = []
        for e in entries:
            data = read(e.offset, e.length) if e.length else b""
            if not e.is_user and e.item_id in _ITEM_NAMES:
                if len(data) < _MIN_LENGTH[e.item_id]:
                    raise DiskFormatError(f"metadata item {e.name} is too short ({len(data)} bytes)",
                                          reason="vhdx.metadata.item-too-short")
                known[e.item_id], entry_of[e.item_id] = data, e
            elif e.is_required:
                raise DiskFormatError(f"the file needs metadata item {e.item_id}, which this engine does not know",
                                      reason="vhdx.metadata.unknown-required")
            else:
                others.append((e, data))
        for item in (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, VIRTUAL_DISK_ID, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE):
            if item not in known:
                raise DiskFormatError(f"required metadata item {_ITEM_NAMES[item]} is missing",
                                      reason="vhdx.metadata.missing-item")
        params = FileParameters.unpack(known[FILE_PARAMETERS])
        locator = None
        if params.has_parent:
            if PARENT_LOCATOR not in known:
                raise DiskFormatError("a differencing VHDX must have a parent locator",
                                      reason="vhdx.metadata.missing-parent-locator")
            locator = ParentLocator.unpack(known[PARENT_LOCATOR])
        elif PARENT_LOCATOR in known:  # not used without HasParent, but kept as it was
            others.append((entry_of[PARENT_LOCATOR], known[PARENT_LOCATOR]))
        physical = _u32(known[PHYSICAL_SECTOR_SIZE])
        if physical not in (512, 4096):
            raise DiskFormatError(f"physical sector size {physical} is neither 512 nor 4096",
                                  reason="vhdx.metadata.physical-sector-size")
        return cls(
            file_parameters=params,
            virtual_size=struct.unpack_from("<Q", known[VIRTUAL_DISK_SIZE])[0],
            disk_id=uuid.UUID(bytes_le=known[VIRTUAL_DISK_ID][:16]),
            logical_sector_size=_u32(known[LOGICAL_SECTOR_SIZE]),
            physical_sector_size=physical,
            parent_locator=locator,
            other_items=tuple(others),
        )

    def items(self) -> list[tuple[MetadataEntry, bytes]]:
        """Every item with its flags, known ones first."""
        known = [
            (FILE_PARAMETERS, self.file_parameters.pack()),
            (VIRTUAL_DISK_SIZE, struct.pack("<Q", self.virtual_size)),
            (VIRTUAL_DISK_ID, self.disk_id.bytes_le),
            (LOGICAL_SECTOR_SIZE, struct.pack("<I", self.logical_sector_size)),
            (PHYSICAL_SECTOR_SIZE, struct.pack("<I", self.physical_sector_size)),
        ]
        if self.parent_locator is not None:
            known.append((PARENT_LOCATOR, self.parent_locator.pack()))
        entries = [
            (MetadataEntry(item, 0, len(data), is_virtual_disk=item in _VIRTUAL_DISK_ITEMS, is_required=True), data)
            for item, data in known
        ]
        return entries + list(self.other_items)

    def pack(self, region_length: int) -> bytes:
        """The whole region: table, then the items one after another from 64 KiB."""
        items = self.items()
        if len(items) > MAX_ENTRIES:
            raise DiskError("too many metadata items")
        region = bytearray(TABLE_SIZE)
        _TABLE_HEADER.pack_into(region, 0, SIGNATURE, 0, len(items), bytes(20))
        for i, (entry, data) in enumerate(items):
            offset = len(region) if data else 0
            region += data
            placed = replace(entry, offset=offset, length=len(data))
            at = _TABLE_HEADER.size + i * _TABLE_ENTRY.size
            region[at:at + _TABLE_ENTRY.size] = placed.pack()
        if len(region) > region_length:
            raise DiskError(f"metadata items need {len(region)} bytes; the region holds {region_length}")
        return bytes(region.ljust(region_length, b"\0"))
