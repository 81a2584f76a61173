"""Recognising a disk file by its content, not its name."""

from __future__ import annotations

import os

from hvbackup.disks.vhdx.header import any_valid as any_valid_header
from hvbackup.disks.vhdx.identifier import SIGNATURE as VHDX_SIGNATURE
from hvbackup.errors import DiskError, DiskFormatError

VHD_COOKIE = b"conectix"


def detect_format(path: str) -> str:
    """'vhdx' (file type identifier at 0, or a damaged one with VHDX headers behind it), 'vhd'
    (footer copy at 0, or a footer at the end — a fixed VHD), else 'raw'."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            # A VHDX whose file type identifier was overwritten still has a valid header.
            if head == VHDX_SIGNATURE or any_valid_header(f.fileno()):
                return "vhdx"
            if head == VHD_COOKIE:
                return "vhd"
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                raise DiskFormatError(f"{path}: the file is empty, not a disk", reason="disk.file.empty")
            for footer in (512, 511):  # Virtual PC's oldest footers are 511 bytes
                if size >= footer:
                    f.seek(size - footer)
                    if f.read(8) == VHD_COOKIE:
                        return "vhd"
    except IsADirectoryError:
        raise DiskError(f"{path}: is a directory, not a disk") from None
    except OSError as exc:
        raise DiskError(f"{path}: cannot open: {exc.strerror}") from exc
    return "raw"
