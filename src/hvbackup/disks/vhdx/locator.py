"""[MS-VHDX] 2.6.2.6 Parent Locator: who the parent of a differencing file is and where to find it.

A 20-byte header, a table of 12-byte key/value entries, then UTF-16LE strings. The VHDX locator type
(2.6.2.6.3) names the parent by the DataWriteGuid it had when the child was created
(``parent_linkage``, or ``parent_linkage2`` during a merge) and by paths tried in the order
relative_path, volume_path, absolute_win32_path.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from hvbackup.disks import parents
from hvbackup.errors import DiskFormatError

VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
PATH_KEYS = ("relative_path", "volume_path", "absolute_win32_path")

_HEADER = struct.Struct("<16sHH")     # 2.6.2.6.1: LocatorType, Reserved, KeyValueCount
_ENTRY = struct.Struct("<IIHH")       # 2.6.2.6.2: KeyOffset, ValueOffset, KeyLength, ValueLength
_WIN32_PREFIX = "\\\\?\\"


def format_linkage(guid: uuid.UUID) -> str:
    """2.6.2.6.3: a lowercase GUID in braces (libvhdi accepts no other case); read in any case."""
    return "{" + str(guid) + "}"


def parse_linkage(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text.strip().strip("{}"))
    except ValueError:
        raise DiskFormatError(f"parent linkage {text!r} is not a GUID", reason="vhdx.parent-locator.linkage") from None


def path_entries(child_path: str, parent_path: str) -> dict[str, str]:
    """The path keys a new or refreshed locator holds for ``parent_path``."""
    return {
        "relative_path": parents.relative_path(child_path, parent_path),
        "absolute_win32_path": _WIN32_PREFIX + parents.absolute_path(parent_path),
    }


@dataclass(frozen=True)
class ParentLocator:
    entries: dict[str, str]
    locator_type: uuid.UUID = VHDX_LOCATOR_TYPE

    def candidates(self, child_path: str) -> list[str]:
        """Host paths to try for the parent, in the order 2.6.2.6.3 prescribes; volume_path names a
        Windows volume GUID, which no POSIX host can resolve, so it is skipped."""
        entries = self.entries
        return parents.candidates(child_path, entries.get("relative_path"), entries.get("absolute_win32_path"))

    @property
    def linkages(self) -> list[uuid.UUID]:
        return [parse_linkage(self.entries[k]) for k in ("parent_linkage", "parent_linkage2") if k in self.entries]

    def pack(self) -> bytes:
        table_end = _HEADER.size + _ENTRY.size * len(self.entries)
        strings = bytearray()
        table = bytearray(_HEADER.pack(self.locator_type.bytes_le, 0, len(self.entries)))
        for key, value in self.entries.items():
            raw_key, raw_value = key.encode("utf-16-le"), value.encode("utf-16-le")
            key_offset = table_end + len(strings)
            strings += raw_key
            value_offset = table_end + len(strings)
            strings += raw_value
            table += _ENTRY.pack(key_offset, value_offset, len(raw_key), len(raw_value))
        return bytes(table + strings)

    @classmethod
    def unpack(cls, data: bytes) -> ParentLocator:
        if len(data) < _HEADER.size:
            raise DiskFormatError("the parent locator is shorter than its header",
                                  reason="vhdx.parent-locator.truncated")
        raw_type, _reserved, count = _HEADER.unpack_from(data)
        locator_type = uuid.UUID(bytes_le=raw_type)
        if locator_type != VHDX_LOCATOR_TYPE:
            raise DiskFormatError(f"unsupported parent locator type {locator_type}", reason="vhdx.parent-locator.type")
        if _HEADER.size + count * _ENTRY.size > len(data):
            raise DiskFormatError(f"the parent locator claims {count} entries but is only {len(data)} bytes",
                                  reason="vhdx.parent-locator.entry-count")
        entries: dict[str, str] = {}
        for i in range(count):
            key_off, value_off, key_len, value_len = _ENTRY.unpack_from(data, _HEADER.size + i * _ENTRY.size)
            key = _string(data, key_off, key_len, "key")
            value = _string(data, value_off, value_len, f"value of {key!r}")
            if key in entries:
                raise DiskFormatError(f"parent locator key {key!r} appears twice",
                                      reason="vhdx.parent-locator.duplicate-key")
            entries[key] = value
        if "parent_linkage" not in entries:
            raise DiskFormatError("the parent locator has no parent_linkage", reason="vhdx.parent-locator.missing-key")
        for key in ("parent_linkage", "parent_linkage2"):
            if key in entries:
                parse_linkage(entries[key])
        if not any(k in entries for k in PATH_KEYS):
            raise DiskFormatError("the parent locator names no path to the parent",
                                  reason="vhdx.parent-locator.missing-path")
        return cls(entries, locator_type)


def _string(data: bytes, offset: int, length: int, what: str) -> str:
    if offset == 0 or length == 0 or length % 2 or offset + length > len(data):
        raise DiskFormatError(f"parent locator {what} lies outside the locator or is empty",
                              reason="vhdx.parent-locator.string-bounds")
    try:
        text = data[offset:offset + length].decode("utf-16-le")
    except UnicodeDecodeError:
        raise DiskFormatError(f"parent locator {what} is not valid UTF-16",
                              reason="vhdx.parent-locator.string-encoding") from None
    if "\0" in text:
        raise DiskFormatError(f"parent locator {what} contains a NUL character",
                              reason="vhdx.parent-locator.string-nul")
    return text
