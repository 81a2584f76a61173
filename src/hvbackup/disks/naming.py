"""What a disk file's name says about its format.

The suffix chooses the format of a new file where none is given. A .vhdx/.avhdx or .vhd/.avhd name
claims its format: a new file may not contradict it, and ``check`` reports a file that does, since
tools and people go by the name. .raw and .img only suggest raw: any file reads as a raw image, and
.img is common for other formats too (qcow2 cloud images, for one).
"""

from __future__ import annotations

import os

from hvbackup.errors import DiskError

FORMATS = ("vhdx", "vhd", "raw")
SUFFIX_FORMATS = {".vhdx": "vhdx", ".avhdx": "vhdx", ".vhd": "vhd", ".avhd": "vhd", ".raw": "raw", ".img": "raw"}
CLAIMING_FORMATS = ("vhdx", "vhd")


def format_named(path: str | os.PathLike) -> str | None:
    """The format the file name's suffix names, or None for any other suffix."""
    return SUFFIX_FORMATS.get(os.path.splitext(os.fspath(path))[1].lower())


def format_claimed(path: str | os.PathLike) -> str | None:
    """The format the name claims (vhdx or vhd), or None."""
    named = format_named(path)
    return named if named in CLAIMING_FORMATS else None


def format_for_path(path: str | os.PathLike, format: str | None = None) -> str:
    """``format`` if given (a known one, and not another than the name claims), else the format the
    suffix names: .vhdx/.avhdx, .vhd/.avhd, .raw/.img. Any other name needs ``format``."""
    path = os.fspath(path)
    if format is not None:
        if format not in FORMATS:
            raise DiskError(f"unknown disk format {format!r} (one of {', '.join(FORMATS)})")
        claimed = format_claimed(path)
        if claimed not in (None, format):
            raise DiskError(f"{path}: the name says {claimed.upper()}, but the format asked for is "
                            f"{format.upper()}; choose a name that does not claim another format")
        return format
    named = format_named(path)
    if named is None:
        raise DiskError(f"{path}: the disk format cannot be told from the file name; give it "
                        f"({', '.join(FORMATS)}; -O/--format on the command line)")
    return named
