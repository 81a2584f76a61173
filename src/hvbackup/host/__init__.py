"""The Hyper-V-style host: VMs whose disks are tracked VHDX files, checkpoints, reference points,
export and import, and the WMI-shaped services over them (docs/host.md)."""

from hvbackup.host.host import Host
from hvbackup.host.model import (
    SNAPSHOT_TYPE_FULL,
    SNAPSHOT_TYPE_RECOVERY,
    Checkpoint,
    ReferencePoint,
    VmConfig,
    VmState,
    check_vm_name,
)
from hvbackup.host.vm import DamagedVm, GuestDisk, Vm

__all__ = ["Checkpoint", "DamagedVm", "GuestDisk", "Host", "ReferencePoint", "SNAPSHOT_TYPE_FULL",
           "SNAPSHOT_TYPE_RECOVERY", "Vm", "VmConfig", "VmState", "check_vm_name"]
