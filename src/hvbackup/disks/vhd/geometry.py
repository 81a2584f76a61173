"""VHD spec Appendix "CHS Calculation", and how a new disk records its size so every reader agrees.

Virtual PC (and qemu for the creators "vpc " and "qemu" and any it does not know, such as ours) sizes
a disk as cylinders x heads x sectors-per-track; Hyper-V sizes it by the footer's current size. qemu
falls back to the current size when the geometry is the maximum 65535/16/255. So a new disk gets the
standard geometry of its size when that reproduces the size exactly, and the maximum geometry
otherwise: every reader then sees exactly ``current_size``.
"""

from __future__ import annotations

SECTOR = 512
MAX_GEOMETRY = (65535, 16, 255)


def standard_geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) of the spec's algorithm: rounds the size down."""
    total_sectors = min(total_sectors, 65535 * 16 * 255)
    if total_sectors >= 65535 * 16 * 63:
        sectors_per_track, heads = 255, 16
        cylinders_times_heads = total_sectors // sectors_per_track
    else:
        sectors_per_track = 17
        cylinders_times_heads = total_sectors // sectors_per_track
        heads = max(4, -(-cylinders_times_heads // 1024))
        if cylinders_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track, heads = 31, 16
            cylinders_times_heads = total_sectors // sectors_per_track
        if cylinders_times_heads >= heads * 1024:
            sectors_per_track, heads = 63, 16
            cylinders_times_heads = total_sectors // sectors_per_track
    return cylinders_times_heads // heads, heads, sectors_per_track


def geometry_sectors(geometry: tuple[int, int, int]) -> int:
    cylinders, heads, sectors_per_track = geometry
    return cylinders * heads * sectors_per_track


def geometry_for_size(size: int) -> tuple[int, int, int]:
    """The geometry a new disk of ``size`` bytes records (see the module docstring)."""
    geometry = standard_geometry(size // SECTOR)
    return geometry if geometry_sectors(geometry) * SECTOR == size else MAX_GEOMETRY
