"""VHD spec "Hard Disk Footer Format": the 512-byte structure at the end of every VHD file.

Dynamic and differencing files keep a copy at offset 0. The trailing footer is authoritative; the copy
is used when the trailing one is damaged (a crash while a block was being appended leaves block data
where the footer was). Very old Virtual PC files end in a 511-byte footer (the last reserved byte is
missing); it is read like a 512-byte one.
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass

from hvbackup.disks.fileio import read_exact
from hvbackup.disks.vhd.checksum import vhd_checksum
from hvbackup.errors import DiskFormatError
from hvbackup.units import GiB

COOKIE = b"conectix"
SIZE = 512
SHORT_SIZE = 511
VERSION = 0x00010000
FEATURE_RESERVED = 0x2            # "must always be set"
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
TYPE_NAMES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}
TYPE_CODES = {name: code for code, name in TYPE_NAMES.items()}
MAX_DISK_SIZE = 2040 * GiB        # Hyper-V's limit for VHD; qemu refuses more (VHD_MAX_SECTORS)
EPOCH = 946684800                 # 2000-01-01 00:00:00 UTC as a Unix time

# Cookie, Features, File Format Version, Data Offset, Time Stamp, Creator Application, Creator Version,
# Creator Host OS, Original Size, Current Size, Disk Geometry (cylinders, heads, sectors per track),
# Disk Type, Checksum, Unique Id, Saved State; then 427 reserved bytes.
_LAYOUT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_CHECKSUM_OFFSET = 64


def vhd_timestamp(unix_time: float | None = None) -> int:
    """Seconds since 2000-01-01 UTC, as the footer and the dynamic header store time."""
    seconds = int(time.time() if unix_time is None else unix_time) - EPOCH
    return max(0, seconds) & 0xFFFFFFFF


@dataclass(frozen=True)
class Footer:
    disk_type: int
    current_size: int
    geometry: tuple[int, int, int]
    unique_id: uuid.UUID
    data_offset: int = NO_DATA_OFFSET
    timestamp: int = 0
    creator_app: bytes = b"hvbk"
    creator_version: int = 0
    creator_host_os: bytes = b"Wi2k"
    original_size: int = 0
    features: int = FEATURE_RESERVED
    version: int = VERSION
    saved_state: int = 0

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.disk_type]

    def pack(self) -> bytes:
        buf = bytearray(SIZE)
        cylinders, heads, sectors_per_track = self.geometry
        _LAYOUT.pack_into(
            buf, 0, COOKIE, self.features, self.version, self.data_offset, self.timestamp, self.creator_app,
            self.creator_version, self.creator_host_os, self.original_size, self.current_size,
            cylinders, heads, sectors_per_track, self.disk_type, 0, self.unique_id.bytes, self.saved_state,
        )
        struct.pack_into(">I", buf, _CHECKSUM_OFFSET, vhd_checksum(buf, _CHECKSUM_OFFSET))
        return bytes(buf)

    @classmethod
    def unpack(cls, data: bytes) -> Footer:
        """The footer in ``data`` (511 or 512 bytes); DiskFormatError names the first rule it breaks."""
        if data[:8] != COOKIE:
            raise DiskFormatError("no 'conectix' cookie", reason="vhd.footer.cookie")
        (_, features, version, data_offset, timestamp, creator_app, creator_version, host_os, original_size,
         current_size, cylinders, heads, sectors_per_track, disk_type, checksum, unique_id,
         saved_state) = _LAYOUT.unpack_from(data.ljust(SIZE, b"\0"))
        expected = vhd_checksum(data, _CHECKSUM_OFFSET)
        if checksum != expected:
            raise DiskFormatError(f"checksum is {checksum:#010x}, the content sums to {expected:#010x}",
                                  reason="vhd.footer.checksum")
        footer = cls(
            disk_type=disk_type, current_size=current_size, geometry=(cylinders, heads, sectors_per_track),
            unique_id=uuid.UUID(bytes=unique_id), data_offset=data_offset, timestamp=timestamp,
            creator_app=creator_app, creator_version=creator_version, creator_host_os=host_os,
            original_size=original_size, features=features, version=version, saved_state=saved_state,
        )
        footer.validate()
        return footer

    def validate(self) -> None:
        if self.version >> 16 != 1:
            raise DiskFormatError(f"unsupported file format version {self.version:#010x} (major version 1 only)",
                                  reason="vhd.footer.version")
        if self.disk_type not in TYPE_NAMES:
            raise DiskFormatError(f"unsupported disk type {self.disk_type} (2 fixed, 3 dynamic, 4 differencing)",
                                  reason="vhd.footer.disk-type")
        if self.current_size % 512 or self.current_size > MAX_DISK_SIZE:
            raise DiskFormatError(
                f"disk size {self.current_size} is not a multiple of 512 bytes up to 2040 GiB",
                reason="vhd.footer.disk-size",
            )
        if self.disk_type != FIXED and self.data_offset < SIZE:
            raise DiskFormatError(f"the dynamic header offset {self.data_offset:#x} overlaps the footer copy",
                                  reason="vhd.footer.data-offset")


def read_footer(fd: int, file_size: int) -> tuple[Footer, int, list[str]]:
    """The footer to trust; the length of the valid footer ending the file (0 when that one is
    damaged and the copy at offset 0 of a dynamic or differencing file stands in); and the damage
    the file survives: a damaged, missing or different one of a dynamic or differencing file's two
    copies."""
    if file_size < SHORT_SIZE:
        raise DiskFormatError(f"file is truncated: {file_size} bytes cannot hold a VHD footer",
                              reason="vhd.footer.truncated")
    trailing, trailing_problem = None, None  # a problem stays None where no cookie is found
    # Neither footer usable: the error carries the reason of the one at the end, else the copy's.
    reasons = []
    for length in (SIZE, SHORT_SIZE):
        if file_size < length:
            continue
        raw = read_exact(fd, length, file_size - length, "VHD footer")
        if raw[:8] != COOKIE:
            continue
        try:
            trailing = Footer.unpack(raw), length
        except DiskFormatError as exc:
            trailing_problem = f"the footer at the end of the file is invalid: {exc}"
            reasons.append(exc.reason)
        break
    copy, copy_problem = None, None
    if file_size >= SIZE:
        raw = read_exact(fd, SIZE, 0, "VHD footer copy")
        if raw[:8] == COOKIE:
            try:
                copy = Footer.unpack(raw)
            except DiskFormatError as exc:
                copy_problem = f"the footer copy at offset 0 is invalid: {exc}"
                reasons.append(exc.reason)
    if trailing is not None:
        footer, length = trailing
        if footer.disk_type == FIXED:
            return footer, length, []  # a fixed disk has no copy: offset 0 holds guest data
        if copy is None:
            return footer, length, [copy_problem or "the footer copy at offset 0 is missing or overwritten"]
        if copy != footer:
            return footer, length, ["the footer copy at offset 0 differs from the footer at the end of the file"]
        return footer, length, []
    if copy is not None and copy.disk_type != FIXED:
        missing = trailing_problem or "the footer at the end of the file is missing or overwritten"
        return copy, 0, [f"{missing} (the copy at offset 0 stands in)"]
    if copy is not None:
        copy_problem = "the footer copy at offset 0 claims a fixed disk, which has no copy"
        reasons.append("vhd.footer.missing")
    problems = [p for p in (trailing_problem, copy_problem) if p]
    if not problems:
        raise DiskFormatError("not a VHD file: no 'conectix' footer at the end of the file or at offset 0",
                              reason="vhd.footer.cookie")
    raise DiskFormatError("; ".join(problems), reason=reasons[0])
