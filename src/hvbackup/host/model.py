"""The host's objects, named after the Hyper-V WMI classes they stand for, as stored in vm.json.

Msvm_ComputerSystem (a VM and its EnabledState), Msvm_VirtualSystemSettingData (its configuration,
the ``.vmcx``; a checkpoint is one too), Msvm_StorageAllocationSettingData (a disk attachment),
Msvm_VirtualSystemReferencePoint.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from dataclasses import dataclass, field

# Msvm_VirtualSystemSnapshotService.CreateSnapshot SnapshotType
SNAPSHOT_TYPE_FULL = 2          # a standard checkpoint
SNAPSHOT_TYPE_RECOVERY = 32768  # a backup (recovery) checkpoint
SYSTEM_TYPE = {
    SNAPSHOT_TYPE_FULL: "Microsoft:Hyper-V:Snapshot:Realized",
    SNAPSHOT_TYPE_RECOVERY: "Microsoft:Hyper-V:Snapshot:Recovery",
}
REFERENCE_POINT_TYPE_RCT = 2    # Msvm_VirtualSystemReferencePoint.ReferencePointType
CONSISTENCY_APPLICATION, CONSISTENCY_CRASH = 1, 2


class VmState(enum.IntEnum):
    """Msvm_ComputerSystem.EnabledState values of the states a VM can be in."""

    RUNNING = 2
    OFF = 3
    SAVED = 6
    PAUSED = 9


@dataclass
class DiskAttachment:
    """Msvm_StorageAllocationSettingData: one virtual hard disk of the VM. ``chain`` lists its files
    from the base VHDX to the active one (relative to the VM directory); checkpoints freeze files."""

    instance_id: str
    chain: list[str]
    controller: int = 0
    location: int = 0

    @property
    def active(self) -> str:
        return self.chain[-1]


@dataclass
class VmConfig:
    """Msvm_VirtualSystemSettingData of a VM: what its ``.vmcx`` file holds."""

    vm_id: str
    name: str
    processors: int = 1
    memory_mb: int = 1024
    notes: str = ""
    disks: list[DiskAttachment] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VmConfig:
        disks = [DiskAttachment(**d) for d in data.get("disks", [])]
        return cls(**{**data, "disks": disks})


@dataclass
class CheckpointDisk:
    instance_id: str
    frozen: str           # the file holding the disk as it was at the checkpoint (read-only from then on)
    rct_id: str           # the change tracking point sealed at the checkpoint


@dataclass
class Checkpoint:
    """A snapshot Msvm_VirtualSystemSettingData: standard (2) or recovery (32768)."""

    instance_id: str
    name: str
    snapshot_type: int
    created: str
    consistency_level: int
    state: int                      # the VM's EnabledState when it was taken
    config: dict                    # VmConfig.to_dict() at that moment
    disks: list[CheckpointDisk]
    parent: str | None = None       # the checkpoint it follows
    owner: dict | None = None       # recovery checkpoints: the process that took it {pid, boot_id}
    exported: list[str] = field(default_factory=list)  # disk files of its last full/differential export

    @property
    def virtual_system_type(self) -> str:
        return SYSTEM_TYPE[self.snapshot_type]

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "virtual_system_type": self.virtual_system_type}

    @classmethod
    def from_dict(cls, data: dict) -> Checkpoint:
        data = {k: v for k, v in data.items() if k != "virtual_system_type"}
        return cls(**{**data, "disks": [CheckpointDisk(**d) for d in data["disks"]]})


@dataclass
class ReferencePoint:
    """Msvm_VirtualSystemReferencePoint (RCT based): the two identifier arrays are parallel."""

    instance_id: str
    virtual_system_identifier: str
    virtual_disk_identifiers: list[str]
    resilient_change_tracking_identifiers: list[str]
    consistency_level: int
    created: str
    reference_point_type: int = REFERENCE_POINT_TYPE_RCT
    exported: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ReferencePoint:
        return cls(**data)


def new_id() -> str:
    return str(uuid.uuid4()).upper()


def disk_instance_id(vm_id: str, index: int) -> str:
    """A new Msvm_StorageAllocationSettingData InstanceID: it embeds the VM's ID."""
    return f"Microsoft:{vm_id}\\{new_id()}\\0\\{index}\\D"


def new_vm_document(config: VmConfig) -> dict:
    """The document of a VM just created or imported: Off, each disk a single base file."""
    return {
        "config": config.to_dict(), "state": int(VmState.OFF), "checkpoints": [], "reference_points": [],
        "files": {d.instance_id: {d.active: None} for d in config.disks}, "intent": None,
    }


# Msvm_VirtualSystemExportSettingData.CopySnapshotConfiguration and .BackupIntent
EXPORT_ALL_SNAPSHOTS, EXPORT_NO_SNAPSHOTS, EXPORT_ONE_SNAPSHOT, EXPORT_ONE_SNAPSHOT_FOR_BACKUP = 0, 1, 2, 3
BACKUP_INTENT_PRESERVE_CHAIN, BACKUP_INTENT_MERGE = 0, 1


@dataclass
class ExportSettings:
    """Msvm_VirtualSystemExportSettingData, the fields a backup export uses (snake_case)."""

    copy_snapshot_configuration: int = EXPORT_ONE_SNAPSHOT_FOR_BACKUP
    snapshot_virtual_system: str | None = None     # the checkpoint to export (its instance ID)
    differential_backup_base: str | None = None    # a reference point (or checkpoint) instance ID
    backup_intent: int = BACKUP_INTENT_PRESERVE_CHAIN
    copy_vm_storage: bool = True
    copy_vm_runtime_information: bool = False
    create_vm_export_subdirectory: bool = True
    capture_live_state: int = 0                    # 0 crash consistent, 1 saved state, 2 app consistent
