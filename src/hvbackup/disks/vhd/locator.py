"""VHD spec "Dynamic Disk Header Format", Parent Locator Entries: eight 24-byte entries, each pointing
at platform data elsewhere in the file that tells where a differencing disk's parent is.

Only the Windows Unicode codes are used: W2ru (path relative to the child's directory) and W2ku
(absolute path), both UTF-16 LE without a terminator. Platform Data Space counts 512-byte sectors as
the spec says; Windows writes bytes there, so readers go by Platform Data Length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hvbackup.disks import parents
from hvbackup.disks.fileio import read_exact, round_up
from hvbackup.errors import DiskFormatError
from hvbackup.units import KiB

W2RU = b"W2ru"
W2KU = b"W2ku"
COUNT = 8
MAX_DATA_LENGTH = 64 * KiB     # a Windows path is at most 32767 UTF-16 code units

# Platform Code, Platform Data Space, Platform Data Length, Reserved, Platform Data Offset
ENTRY = struct.Struct(">4sIIIQ")

# What each platform code holds, by the names VHDX locators give the same paths.
PATH_KEYS = {W2RU: "relative_path", W2KU: "absolute_win32_path"}


@dataclass(frozen=True)
class LocatorEntry:
    platform_code: bytes = bytes(4)
    data_space: int = 0
    data_length: int = 0
    data_offset: int = 0

    def pack(self) -> bytes:
        return ENTRY.pack(self.platform_code, self.data_space, self.data_length, 0, self.data_offset)

    @classmethod
    def unpack(cls, data: bytes) -> LocatorEntry:
        code, space, length, _reserved, offset = ENTRY.unpack(data)
        return cls(code, space, length, offset)

    @classmethod
    def for_data(cls, platform_code: bytes, data: bytes, offset: int) -> LocatorEntry:
        return cls(platform_code, round_up(len(data), 512) // 512, len(data), offset)


def read_locator_paths(fd: int, entries: tuple[LocatorEntry, ...], file_size: int) -> dict[str, str]:
    """{"relative_path": ..., "absolute_win32_path": ...} from the first W2ru and W2ku entries."""
    paths: dict[str, str] = {}
    for entry in entries:
        key = PATH_KEYS.get(entry.platform_code)
        if key is None or key in paths:
            continue
        name = entry.platform_code.decode()
        if entry.data_length > MAX_DATA_LENGTH:
            raise DiskFormatError(f"parent locator {name} claims {entry.data_length} bytes of path",
                                  reason="vhd.parent-locator.data-length")
        if entry.data_offset + entry.data_length > file_size:
            raise DiskFormatError(f"parent locator {name} data at {entry.data_offset:#x} lies past the end of the file",
                                  reason="vhd.parent-locator.beyond-file")
        raw = read_exact(fd, entry.data_length, entry.data_offset, f"parent locator {name}")
        try:
            # Writers pad with NULs, sometimes to an odd length.
            text = raw[:len(raw) & ~1].decode("utf-16-le").rstrip("\0")
        except UnicodeDecodeError:
            raise DiskFormatError(f"parent locator {name} is not valid UTF-16",
                                  reason="vhd.parent-locator.encoding") from None
        if "\0" in text:
            raise DiskFormatError(f"parent locator {name} holds a NUL inside its path", reason="vhd.parent-locator.nul")
        if text:
            paths[key] = text
    return paths


def windows_paths(child_path: str, parent_path: str) -> dict[bytes, str]:
    """The W2ru and W2ku values for a new child: Windows-style, with backslashes. A POSIX host has no
    drive letter, so the absolute path is the host path with its separators turned."""
    relative = parents.relative_path(child_path, parent_path)
    if not relative.startswith("..\\"):
        relative = ".\\" + relative
    return {W2RU: relative, W2KU: parents.absolute_path(parent_path)}
