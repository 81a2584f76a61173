"""VHD spec "Dynamic Disk Header Format": the 1024-byte "cxsparse" header of dynamic and differencing
disks, at the footer's Data Offset. It places the BAT, sizes the blocks and, for a differencing disk,
identifies the parent (unique id, time stamp, name, locators)."""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from hvbackup.disks.fileio import read_exact, round_up
from hvbackup.disks.vhd.checksum import vhd_checksum
from hvbackup.disks.vhd.footer import NO_DATA_OFFSET
from hvbackup.disks.vhd.locator import COUNT, ENTRY, LocatorEntry
from hvbackup.errors import DiskError, DiskFormatError
from hvbackup.units import MiB

COOKIE = b"cxsparse"
SIZE = 1024
VERSION = 0x00010000
DEFAULT_BLOCK_SIZE = 2 * MiB
# Below 4 KiB qemu computes a zero-length sector bitmap; above 256 MiB nothing writes VHDs.
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 256 * MiB
PARENT_NAME_BYTES = 512
NULL_ID = uuid.UUID(int=0)

# Cookie, Data Offset, Table Offset, Header Version, Max Table Entries, Block Size, Checksum,
# Parent Unique ID, Parent Time Stamp, Reserved, Parent Unicode Name; then the parent locator entries
# and 256 reserved bytes.
_LAYOUT = struct.Struct(">8sQQIIII16sI4s512s")
_CHECKSUM_OFFSET = 36


def bitmap_size(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit per sector, padded to a whole sector."""
    return round_up(-(-block_size // 512 // 8), 512)


@dataclass(frozen=True)
class DynamicHeader:
    table_offset: int
    max_table_entries: int
    block_size: int = DEFAULT_BLOCK_SIZE
    parent_unique_id: uuid.UUID = NULL_ID
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: tuple[LocatorEntry, ...] = ()
    version: int = VERSION

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.block_size)

    @property
    def table_length(self) -> int:
        return self.max_table_entries * 4

    def pack(self) -> bytes:
        buf = bytearray(SIZE)
        name = self.parent_name.encode("utf-16-be")
        if len(name) > PARENT_NAME_BYTES:
            raise DiskError(f"parent name {self.parent_name!r} is longer than 256 UTF-16 code units")
        _LAYOUT.pack_into(
            buf, 0, COOKIE, NO_DATA_OFFSET, self.table_offset, self.version, self.max_table_entries,
            self.block_size, 0, self.parent_unique_id.bytes, self.parent_timestamp, bytes(4), name,
        )
        for i, entry in enumerate(self.locators):
            buf[_LAYOUT.size + i * ENTRY.size:_LAYOUT.size + (i + 1) * ENTRY.size] = entry.pack()
        struct.pack_into(">I", buf, _CHECKSUM_OFFSET, vhd_checksum(buf, _CHECKSUM_OFFSET))
        return bytes(buf)

    @classmethod
    def unpack(cls, data: bytes) -> DynamicHeader:
        (cookie, _data_offset, table_offset, version, entries, block_size, checksum, parent_id,
         parent_timestamp, _reserved, name) = _LAYOUT.unpack_from(data)
        if cookie != COOKIE:
            raise DiskFormatError("the dynamic disk header has no 'cxsparse' cookie",
                                  reason="vhd.dynamic-header.cookie")
        expected = vhd_checksum(data[:SIZE], _CHECKSUM_OFFSET)
        if checksum != expected:
            raise DiskFormatError(
                f"the dynamic disk header checksum is {checksum:#010x}, the content sums to {expected:#010x}",
                reason="vhd.dynamic-header.checksum",
            )
        locators = tuple(
            LocatorEntry.unpack(data[_LAYOUT.size + i * ENTRY.size:_LAYOUT.size + (i + 1) * ENTRY.size])
            for i in range(COUNT)
        )
        header = cls(
            table_offset=table_offset, max_table_entries=entries, block_size=block_size,
            parent_unique_id=uuid.UUID(bytes=parent_id), parent_timestamp=parent_timestamp,
            parent_name=_decode_name(name), locators=locators, version=version,
        )
        header.validate()
        return header

    @classmethod
    def read(cls, fd: int, offset: int, file_size: int) -> DynamicHeader:
        if offset + SIZE > file_size:
            raise DiskFormatError(f"the dynamic disk header at {offset:#x} lies past the end of the file",
                                  reason="vhd.dynamic-header.beyond-file")
        return cls.unpack(read_exact(fd, SIZE, offset, "dynamic disk header"))

    def validate(self) -> None:
        bs = self.block_size
        if self.version >> 16 != 1:
            raise DiskFormatError(f"unsupported dynamic header version {self.version:#010x} (major version 1 only)",
                                  reason="vhd.dynamic-header.version")
        if not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE or bs & (bs - 1):
            raise DiskFormatError(f"block size {bs} is not a power of two between 4 KiB and 256 MiB",
                                  reason="vhd.dynamic-header.block-size")

    def check_fits(self, disk_size: int, file_size: int) -> None:
        """The BAT covers the disk and lies inside the file: bounds its count before it is read."""
        if self.max_table_entries * self.block_size < disk_size:
            raise DiskFormatError(
                f"the BAT has {self.max_table_entries} entries of {self.block_size} bytes, "
                f"too few for a {disk_size}-byte disk",
                reason="vhd.dynamic-header.max-table-entries",
            )
        if self.table_offset + self.table_length > file_size:
            raise DiskFormatError(
                f"the BAT ({self.max_table_entries} entries at {self.table_offset:#x}) lies past the end "
                f"of the {file_size}-byte file",
                reason="vhd.bat.beyond-file",
            )


def _decode_name(raw: bytes) -> str:
    """The parent name is informational only: undecodable units become U+FFFD."""
    units = raw.decode("utf-16-be", errors="replace")
    return units.split("\0", 1)[0]
