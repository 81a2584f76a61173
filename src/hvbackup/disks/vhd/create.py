"""Creating VHD files: fixed, dynamic and differencing.

Layout of a dynamic or differencing file: footer copy at 0, dynamic header at 512, the BAT at 1536
(every entry unallocated, padded to a sector), for a differencing disk the W2ru and W2ku locator data
after it, then the trailing footer where the first block will go. A fixed file is its preallocated
data and the footer. The creator is "hvbk"; see geometry.py for how the size is recorded. The file is
built under a temporary name and linked into place, so a crash never leaves a half-written disk.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

from hvbackup import __version__
from hvbackup.disks.fileio import new_file, preallocate, round_up, write_at
from hvbackup.disks.vhd import dynamic_header
from hvbackup.disks.vhd.disk import VhdDisk
from hvbackup.disks.vhd.dynamic_header import DEFAULT_BLOCK_SIZE, DynamicHeader
from hvbackup.disks.vhd.footer import MAX_DISK_SIZE, NO_DATA_OFFSET, TYPE_CODES, Footer, vhd_timestamp
from hvbackup.disks.vhd.footer import SIZE as FOOTER_SIZE
from hvbackup.disks.vhd.geometry import geometry_for_size
from hvbackup.disks.vhd.locator import LocatorEntry, windows_paths
from hvbackup.errors import DiskError
from hvbackup.units import MiB

CREATOR_APP = b"hvbk"
HEADER_OFFSET = FOOTER_SIZE
TABLE_OFFSET = HEADER_OFFSET + dynamic_header.SIZE
_FILL = b"\xff" * (4 * MiB)


def _creator_version() -> int:
    major, minor = (int(part) for part in __version__.split(".")[:2])
    return major << 16 | minor


def create_vhd(
    path: str,
    size: int | None,
    *,
    disk_type: str = "dynamic",
    block_size: int | None = None,
    parent_path: str | None = None,
) -> None:
    """Create a VHD. A differencing disk has its parent's size; ``size`` may then be None. A fixed disk
    has no blocks, so ``block_size`` does not apply to it."""
    if disk_type not in TYPE_CODES:
        raise DiskError(f"unknown VHD type {disk_type!r} (fixed, dynamic or differencing)")
    if (disk_type == "differencing") != (parent_path is not None):
        raise DiskError("a differencing disk needs a parent, and only a differencing disk takes one")
    parent_footer = None
    if parent_path is not None:
        with VhdDisk.open(parent_path, read_only=True) as parent:
            if size not in (None, parent.size):
                raise DiskError(f"a differencing disk has its parent's size ({parent.size} bytes)")
            size, parent_footer = parent.size, parent.footer
    if not isinstance(size, int) or not 0 < size <= MAX_DISK_SIZE or size % 512:
        raise DiskError(f"VHD size {size!r} is not a positive multiple of 512 bytes up to 2040 GiB")
    bs = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if disk_type != "fixed" and (
        not dynamic_header.MIN_BLOCK_SIZE <= bs <= dynamic_header.MAX_BLOCK_SIZE or bs & (bs - 1)
    ):
        raise DiskError(f"block size {bs} is not a power of two between 4 KiB and 256 MiB")
    footer = Footer(
        disk_type=TYPE_CODES[disk_type],
        current_size=size,
        original_size=size,
        geometry=geometry_for_size(size),
        unique_id=uuid.uuid4(),
        data_offset=NO_DATA_OFFSET if disk_type == "fixed" else HEADER_OFFSET,
        timestamp=vhd_timestamp(),
        creator_app=CREATOR_APP,
        creator_version=_creator_version(),
    ).pack()
    with new_file(path) as fd:
        if disk_type == "fixed":
            preallocate(fd, 0, size)
            write_at(fd, footer, size)
            return
        entries = -(-size // bs)
        table_end = TABLE_OFFSET + round_up(entries * 4, 512)
        header = DynamicHeader(table_offset=TABLE_OFFSET, max_table_entries=entries, block_size=bs)
        locator_data, data_end = [], table_end
        if parent_footer is not None:
            locators = []
            for code, value in windows_paths(path, parent_path).items():
                data = value.encode("utf-16-le")
                locators.append(LocatorEntry.for_data(code, data, data_end))
                locator_data.append((data_end, data))
                data_end += round_up(len(data), 512)
            header = dataclasses.replace(
                header, parent_unique_id=parent_footer.unique_id, parent_timestamp=parent_footer.timestamp,
                parent_name=os.path.basename(parent_path), locators=tuple(locators),
            )
        write_at(fd, footer, 0)
        write_at(fd, header.pack(), HEADER_OFFSET)
        for at in range(TABLE_OFFSET, table_end, len(_FILL)):
            write_at(fd, memoryview(_FILL)[:min(len(_FILL), table_end - at)], at)
        for offset, data in locator_data:
            write_at(fd, data, offset)
        write_at(fd, footer, data_end)
