"""Legacy VHD (Virtual PC / Hyper-V v1), per Microsoft's "Virtual Hard Disk Image Format
Specification" v1.0 (2006): fixed, dynamic and differencing disks."""

from hvbackup.disks.vhd.create import create_vhd
from hvbackup.disks.vhd.disk import VhdDisk

__all__ = ["VhdDisk", "create_vhd"]
