"""``NAME.vhdx.mrt``: the regions written since the last save of the .rct file.

Before hvbackup writes into a region the map does not yet cover on disk, it marks the region here
and makes the mark durable; only then does the data write start. After a crash, every granule of a
marked region counts as changed, so a query can over-report (within marked regions) but never miss
a write. Regions are coarse (256 MiB at least), so marking costs one fdatasync per region per save.

The file is rewritten in place, whole, at every commit. A damaged file cannot tell which marks it
lost, so it makes the tracking lost (a full backup), never a guess. Layout (little-endian)::

    0   8  magic "HVBKMRT\\0"       48  8  virtual size
    8   4  format version (1)      56 16  DataWriteGuid the disk takes at its first write (or zero)
    12  4  file size               72  4  region count
    16  8  reserved, zero          76  4  reserved, zero
    24 16  lineage GUID            80     region bitmap, bit i = region i marked (LSB first)
    40  4  base: the .rct's last sealed sequence these marks extend
    44  4  region size (bytes)     80+n   CRC-32C of bytes 0..80+n; zeros up to the file size
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field

import numpy as np
from crc32c import crc32c

from hvbackup.disks.fileio import replace_file, round_up, sync_data, write_at
from hvbackup.errors import DiskError, TrackingFormatError
from hvbackup.units import MiB

MAGIC = b"HVBKMRT\0"
VERSION = 1
MIN_REGION = 256 * MiB
MAX_REGIONS = 1 << 20
_HEADER = struct.Struct("<8sIIQ16sIIQ16sII")


def region_size_for(size: int, granularity: int) -> int:
    region = max(MIN_REGION, granularity)
    while -(-size // region) > MAX_REGIONS:
        region *= 2
    return region


def file_size(size: int, region: int) -> int:
    regions = -(-size // region)
    return round_up(_HEADER.size + -(-regions // 8) + 4, 4096)


@dataclass
class MrtState:
    lineage: uuid.UUID
    base: int
    size: int
    region: int
    pending_dwg: uuid.UUID | None = None
    marked: bytearray = field(default_factory=bytearray)  # one byte per region, 0 or 1

    def __post_init__(self):
        if not self.marked:
            self.marked = bytearray(-(-self.size // self.region))

    def pack(self) -> bytes:
        bits = np.packbits(np.frombuffer(self.marked, dtype=np.uint8), bitorder="little").tobytes()
        total = file_size(self.size, self.region)
        header = _HEADER.pack(MAGIC, VERSION, total, 0, self.lineage.bytes_le, self.base, self.region, self.size,
                              (self.pending_dwg or uuid.UUID(int=0)).bytes_le, len(self.marked), 0)
        body = header + bits
        return (body + struct.pack("<I", crc32c(body))).ljust(total, b"\0")

    @classmethod
    def unpack(cls, data: bytes, virtual_size: int) -> MrtState:
        if len(data) < _HEADER.size:
            raise TrackingFormatError("the file is truncated", reason="mrt.file.truncated")
        (magic, version, total, _reserved, lineage, base, region, size, pending, count,
         _reserved2) = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise TrackingFormatError("it is not an hvbackup modified-region file", reason="mrt.header.magic")
        if version != VERSION:
            raise TrackingFormatError(f"format version {version} is not supported", reason="mrt.header.version")
        if size != virtual_size or region < MIN_REGION or region & (region - 1) or count != -(-size // region):
            raise TrackingFormatError("its geometry does not match the disk", reason="mrt.header.geometry")
        end = _HEADER.size + -(-count // 8)
        if total != len(data) or total != file_size(size, region):
            raise TrackingFormatError("its length is wrong", reason="mrt.file.length")
        if struct.unpack_from("<I", data, end)[0] != crc32c(data[:end]) or any(data[end + 4:]):
            raise TrackingFormatError("its checksum does not match", reason="mrt.file.checksum")
        bits = np.frombuffer(data, dtype=np.uint8, count=end - _HEADER.size, offset=_HEADER.size)
        marked = bytearray(np.unpackbits(bits, bitorder="little")[:count].tobytes())
        pending_dwg = uuid.UUID(bytes_le=pending)
        return cls(uuid.UUID(bytes_le=lineage), base, size, region, pending_dwg if pending_dwg.int else None, marked)

    def marked_regions(self) -> list[int]:
        return np.flatnonzero(np.frombuffer(self.marked, dtype=np.uint8)).tolist()


def create(path: str, state: MrtState) -> None:
    """A fresh file, put in place atomically."""
    replace_file(path, state.pack())


def read(path: str, virtual_size: int) -> MrtState:
    """Raises FileNotFoundError or TrackingFormatError."""
    with open(path, "rb") as f:
        data = f.read(MAX_REGIONS // 8 + 8192)
    return MrtState.unpack(data, virtual_size)


class MrtWriter:
    """The open file a tracked writer marks regions in, one durable whole-file write at a time."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"{path}: cannot open: {exc.strerror}") from exc

    def commit(self, state: MrtState) -> None:
        """Write ``state`` over the file and wait until it is on stable storage."""
        write_at(self.fd, state.pack(), 0)
        sync_data(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
