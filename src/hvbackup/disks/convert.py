"""Converting a disk between raw, VHD and VHDX; a differencing chain is flattened into one file.

Only the extents that hold data are read; pieces of zeros are not written, so a dynamic result
stays sparse. The result is built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import os

from hvbackup import disks
from hvbackup.disks.copy import Progress, copy_data, data_bytes, data_pieces
from hvbackup.disks.fileio import remove_file, rename_file, sync_directory
from hvbackup.disks.naming import format_for_path
from hvbackup.errors import DiskError


def convert(
    src_path: str,
    dst_path: str,
    *,
    format: str | None = None,
    type: str = "dynamic",
    block_size: int | None = None,
    progress: Progress | None = None,
) -> None:
    """Write ``src_path``'s contents as the new file ``dst_path``: of ``format``, or of the format
    its name's suffix names (``format_for_path``)."""
    format = format_for_path(dst_path, format)
    if type == "differencing":
        raise DiskError("convert writes a whole disk; it cannot make a differencing disk")
    if os.path.lexists(dst_path):
        raise DiskError(f"{dst_path}: already exists")
    directory, name = os.path.split(os.path.abspath(dst_path))
    temp = os.path.join(directory, f".{name}.converting")
    if os.path.lexists(temp):
        remove_file(temp)  # left by an interrupted conversion
    with disks.open(src_path, read_only=True) as src:
        sector = src.logical_sector_size if format == "vhdx" else 512
        try:
            with disks.create(temp, src.size, format=format, type=type, block_size=block_size,
                              logical_sector_size=sector,
                              physical_sector_size=src.physical_sector_size) as dst:
                # A new disk reads as zeros everywhere, fixed ones included, so zeros need no write.
                copy_data(src, dst, data_pieces(src.extents()), skip_zeros=True,
                          total=data_bytes(src.extents()), progress=progress)
            if os.path.lexists(dst_path):
                raise DiskError(f"{dst_path}: already exists")
            rename_file(temp, dst_path)
            sync_directory(directory)
        except BaseException:
            if os.path.lexists(temp):
                remove_file(temp)
            raise
