"""A disk's geometry as the backup keeps it: what readers report and what a manifest stores per disk."""

from __future__ import annotations

from dataclasses import dataclass

from hvbackup.disks.device import BlockDevice


@dataclass(frozen=True)
class Geometry:
    virtual_size: int
    block_size: int
    logical_sector_size: int
    physical_sector_size: int

    @classmethod
    def of(cls, device: BlockDevice) -> Geometry:
        return cls(device.size, device.block_size, device.logical_sector_size, device.physical_sector_size)

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        """From a manifest's ``geometry``."""
        return cls(data["virtual_size"], data["block_size"], data["logical_sector_size"], data["physical_sector_size"])

    def to_dict(self) -> dict:
        """As a manifest keeps it."""
        return dict(self.__dict__)
