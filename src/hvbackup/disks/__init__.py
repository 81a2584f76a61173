"""Virtual disk formats behind one block device interface: VHDX ([MS-VHDX]), legacy VHD and raw.

``create`` makes a new disk and returns it open for writing; ``open`` recognises the format by
content and opens differencing parents itself. Both give the format chain only: the layers above
(change tracking) are composed over it by ``hvbackup.stack``. ``convert``, ``merge`` and
``compare`` work on any mix of formats; ``merge`` and ``check`` take hooks for those layers.
"""

from __future__ import annotations

import os

from hvbackup.disks.device import BlockDevice, Extent, ExtentState
from hvbackup.disks.filter import Filter
from hvbackup.disks.naming import FORMATS, format_for_path, format_named
from hvbackup.disks.probe import detect_format
from hvbackup.disks.raw import RawDisk, create_raw
from hvbackup.disks.vhd import VhdDisk, create_vhd
from hvbackup.disks.vhdx.create import create_vhdx
from hvbackup.disks.vhdx.disk import VhdxDisk, VhdxDiskAlone
from hvbackup.errors import DiskError

TYPES = ("fixed", "dynamic", "differencing")
_OPENERS = {"vhdx": VhdxDisk.open, "vhd": VhdDisk.open, "raw": RawDisk.open}


def create(
    path: str | os.PathLike,
    size: int | None = None,
    *,
    format: str | None = None,
    type: str = "dynamic",
    parent: str | os.PathLike | None = None,
    block_size: int | None = None,
    logical_sector_size: int = 512,
    physical_sector_size: int = 4096,
) -> BlockDevice:
    """Create a disk file and return it open read-write. ``format`` None takes the format the
    name's suffix names (``format_for_path``); a differencing disk whose name names none is of its
    parent's format. A differencing disk takes its size from ``parent``; ``size`` may then be
    omitted."""
    path = os.fspath(path)
    parent = os.fspath(parent) if parent is not None else None
    if format is None and parent is not None and format_named(path) is None:
        format = detect_format(parent)  # a child is always of its parent's format
    format = format_for_path(path, format)
    if type not in TYPES:
        raise DiskError(f"unknown disk type {type!r} (one of {', '.join(TYPES)})")
    if format == "vhdx":
        create_vhdx(path, size, disk_type=type, block_size=block_size, logical_sector_size=logical_sector_size,
                    physical_sector_size=physical_sector_size, parent_path=parent)
    elif format == "vhd":
        if logical_sector_size != 512:
            raise DiskError("VHD disks have 512-byte sectors only")
        create_vhd(path, size, disk_type=type, block_size=block_size, parent_path=parent)
    else:
        if type == "differencing" or size is None:
            raise DiskError("a raw image has a size and no parent")
        create_raw(path, size)
    return open(path)


def open(path: str | os.PathLike, *, read_only: bool = False, without_parent: bool = False) -> BlockDevice:
    """Open a disk file of any supported format, with its parents if it is differencing.
    ``without_parent`` (a VHDX, read-only) opens only the file itself: its own sectors (``VhdxDiskAlone``)."""
    path = os.fspath(path)
    format = detect_format(path)
    if without_parent:
        if format != "vhdx" or not read_only:
            raise DiskError(f"{path}: only a VHDX opened read-only can be read without its parent")
        return VhdxDiskAlone.open(path, read_only=True)
    return _OPENERS[format](path, read_only=read_only)


# The operations on whole disks; imported last because they use create() and open().
from hvbackup.disks.check import CheckReport, check  # noqa: E402
from hvbackup.disks.compare import Comparison, compare  # noqa: E402
from hvbackup.disks.convert import convert  # noqa: E402
from hvbackup.disks.merge import MergeHooks, merge  # noqa: E402

__all__ = [
    "BlockDevice", "CheckReport", "Comparison", "Extent", "ExtentState", "FORMATS", "Filter", "MergeHooks", "TYPES",
    "check", "compare", "convert", "create", "detect_format", "format_for_path", "merge", "open",
]
