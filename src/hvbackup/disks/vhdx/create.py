"""Creating VHDX files: fixed, dynamic and differencing.

Layout (1 MiB aligned, as [MS-VHDX] 2.1 requires): header section, a 1 MiB log at 1 MiB, the 1 MiB
metadata region at 2 MiB, the BAT at 3 MiB, then payload. A fixed disk has every block allocated
and FULLY_PRESENT with LeaveBlockAllocated set; dynamic and differencing disks start with every
entry NOT_PRESENT, which is a BAT of zeros, left as a hole in the file. The file is built under a
temporary name and linked into place, so a crash never leaves a half-written disk at ``path``.
"""

from __future__ import annotations

import os
import uuid

import numpy as np

from hvbackup import __version__
from hvbackup.disks.fileio import new_file, preallocate, write_at
from hvbackup.disks.vhdx import bat as batmod
from hvbackup.disks.vhdx import header, identifier, region
from hvbackup.disks.vhdx.bat import Geometry
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.disks.vhdx.locator import ParentLocator, format_linkage, path_entries
from hvbackup.disks.vhdx.metadata import FileParameters, Metadata
from hvbackup.errors import DiskError
from hvbackup.units import MiB

DEFAULT_BLOCK_SIZE = 32 * MiB             # Hyper-V's default for fixed and dynamic disks
DEFAULT_DIFFERENCING_BLOCK_SIZE = 2 * MiB  # and for differencing disks (AVHDX)
LOG_OFFSET = MiB
LOG_LENGTH = MiB
METADATA_OFFSET = 2 * MiB
METADATA_LENGTH = MiB
BAT_OFFSET = 3 * MiB
CREATOR = f"hvbackup {__version__}"


def create_vhdx(
    path: str,
    size: int | None,
    *,
    disk_type: str = "dynamic",
    block_size: int | None = None,
    logical_sector_size: int = 512,
    physical_sector_size: int = 4096,
    parent_path: str | None = None,
) -> None:
    if disk_type not in ("fixed", "dynamic", "differencing"):
        raise DiskError(f"unknown VHDX type {disk_type!r} (fixed, dynamic or differencing)")
    if (disk_type == "differencing") != (parent_path is not None):
        raise DiskError("a differencing disk needs a parent, and only a differencing disk takes one")
    if physical_sector_size not in (512, 4096):
        raise DiskError(f"physical sector size {physical_sector_size} is neither 512 nor 4096")
    locator = None
    inherited: tuple = ()
    disk_id = uuid.uuid4()
    if parent_path is not None:
        with VhdxDisk.open(parent_path, read_only=True) as parent:
            if size not in (None, parent.size):
                raise DiskError(f"a differencing disk has its parent's size ({parent.size} bytes)")
            size = parent.size
            # 2.6.1.2 IsVirtualDisk: a new child takes the parent's virtual disk items.
            logical_sector_size = parent.logical_sector_size
            physical_sector_size = parent.physical_sector_size
            disk_id = parent.disk_id
            inherited = tuple((e, d) for e, d in parent.metadata.other_items if e.is_virtual_disk)
            locator = ParentLocator({
                "parent_linkage": format_linkage(parent.data_write_guid),
                **path_entries(path, parent_path),
            })
    if size is None:
        raise DiskError("a size is needed")
    if block_size is None:
        block_size = DEFAULT_DIFFERENCING_BLOCK_SIZE if locator else DEFAULT_BLOCK_SIZE
    geometry = Geometry(size, block_size, logical_sector_size, has_parent=locator is not None)
    metadata = Metadata(
        file_parameters=FileParameters(block_size, leave_block_allocated=disk_type == "fixed",
                                       has_parent=locator is not None),
        virtual_size=size,
        disk_id=disk_id,
        logical_sector_size=logical_sector_size,
        physical_sector_size=physical_sector_size,
        parent_locator=locator,
        other_items=inherited,
    )
    data_offset = BAT_OFFSET + geometry.region_length
    # A dynamic or differencing BAT is all NOT_PRESENT: zeros, left as a hole in the file.
    table = b""
    if disk_type == "fixed":
        entries = np.zeros(geometry.entry_count, dtype="<u8")
        blocks = np.arange(geometry.data_blocks, dtype=np.uint64)
        locations = data_offset + blocks * np.uint64(block_size)
        entries[blocks + blocks // np.uint64(geometry.chunk_ratio)] = (
            (locations // np.uint64(MiB)) << np.uint64(batmod.OFFSET_SHIFT) | np.uint64(batmod.FULLY_PRESENT)
        )
        table = entries.tobytes()
    payload_bytes = geometry.data_blocks * block_size if disk_type == "fixed" else 0
    regions = region.RegionTable((
        region.RegionEntry(region.BAT_GUID, BAT_OFFSET, geometry.region_length, required=True),
        region.RegionEntry(region.METADATA_GUID, METADATA_OFFSET, METADATA_LENGTH, required=True),
    ))
    pieces = [
        (identifier.OFFSET, identifier.FileTypeIdentifier(CREATOR).pack()),
        *zip(header.OFFSETS, header.initial_headers(LOG_OFFSET, LOG_LENGTH, uuid.uuid4())),
        *((offset, regions.pack()) for offset in region.OFFSETS),
        (METADATA_OFFSET, metadata.pack(METADATA_LENGTH)),
        (BAT_OFFSET, table),
    ]
    with new_file(path) as fd:
        for offset, data in pieces:
            write_at(fd, data, offset)
        os.ftruncate(fd, data_offset)
        if payload_bytes:
            preallocate(fd, data_offset, payload_bytes)

