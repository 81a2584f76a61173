"""[MS-VHDX] 2.2.1 File Type Identifier: the signature at offset 0, written once at creation."""

from __future__ import annotations

from dataclasses import dataclass

from hvbackup.disks.fileio import sync_data, write_at
from hvbackup.errors import DiskFormatError
from hvbackup.units import KiB

SIGNATURE = b"vhdxfile"
OFFSET = 0
SIZE = 64 * KiB
_CREATOR_BYTES = 512


@dataclass(frozen=True)
class FileTypeIdentifier:
    creator: str

    def pack(self) -> bytes:
        creator = self.creator.encode("utf-16-le")[:_CREATOR_BYTES]
        return SIGNATURE + creator.ljust(_CREATOR_BYTES, b"\0")

    @classmethod
    def unpack(cls, data: bytes) -> FileTypeIdentifier:
        if data[:8] != SIGNATURE:
            raise DiskFormatError("not a VHDX file: the file type identifier signature is missing",
                                  reason="vhdx.identifier.signature")
        raw = data[8:8 + _CREATOR_BYTES]
        text = raw.decode("utf-16-le", errors="replace")
        return cls(creator=text.split("\0", 1)[0])


def restore(fd: int, creator: str) -> None:
    """Write a new identifier over a damaged one: the whole 64 KiB structure, reserved bytes zero."""
    write_at(fd, FileTypeIdentifier(creator).pack().ljust(SIZE, b"\0"), OFFSET)
    sync_data(fd)
