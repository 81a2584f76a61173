"""Where a disk's tracking lives: the two side files next to it, and the marker item inside it.

The marker is an optional user metadata item of the VHDX ([MS-VHDX] 2.6.1.2: IsUser, IsVirtualDisk,
not IsRequired, so other tools ignore it and keep it). It holds the lineage GUID. It is what lets a
disk whose side files were deleted report its tracking as lost rather than as never enabled, and
what ties the side files to this disk and no other.
"""

from __future__ import annotations

import os
import struct
import uuid

from hvbackup.disks.fileio import remove_file
from hvbackup.disks.vhdx.disk import VhdxDisk

MARKER_ITEM = uuid.UUID("7f1e3c52-9a4b-4d6e-8c21-5b0f9e4a6d13")
_MARKER = struct.Struct("<16sI")  # lineage GUID, marker version
_MARKER_VERSION = 1


def rct_path(disk_path: str) -> str:
    return disk_path + ".rct"


def mrt_path(disk_path: str) -> str:
    return disk_path + ".mrt"


def remove_side_files(disk_path: str) -> None:
    for side in (rct_path(disk_path), mrt_path(disk_path)):
        if os.path.exists(side):
            remove_file(side)


def read_marker(disk: VhdxDisk) -> uuid.UUID | None:
    """The lineage the disk says it is tracked in; None when tracking is off. A marker this version
    cannot read counts as a lineage no side file matches."""
    data = disk.virtual_disk_item(MARKER_ITEM)
    if data is None:
        return None
    if len(data) != _MARKER.size or _MARKER.unpack(data)[1] != _MARKER_VERSION:
        return uuid.UUID(int=0)
    return uuid.UUID(bytes_le=_MARKER.unpack(data)[0])


def write_marker(disk: VhdxDisk, lineage: uuid.UUID | None) -> None:
    data = None if lineage is None else _MARKER.pack(lineage.bytes_le, _MARKER_VERSION)
    disk.set_virtual_disk_item(MARKER_ITEM, data)
