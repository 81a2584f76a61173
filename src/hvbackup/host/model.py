"""The host's objects, named after the Hyper-V WMI classes they stand for, as stored in vm.json.

Msvm_ComputerSystem (a VM and its EnabledState), Msvm_VirtualSystemSettingData (its configuration,
the ``.vmcx``; a checkpoint is one too), Msvm_StorageAllocationSettingData (a disk attachment),
Msvm_VirtualSystemReferencePoint.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import unicodedata
import uuid
from dataclasses import dataclass, field

from hvbackup.errors import HostError
from hvbackup.host.returns import INVALID_PARAMETER

# Msvm_VirtualSystemSnapshotService.CreateSnapshot SnapshotType
SNAPSHOT_TYPE_FULL = 2          # a standard checkpoint
SNAPSHOT_TYPE_RECOVERY = 32768  # a backup (recovery) checkpoint
SYSTEM_TYPE = {
    SNAPSHOT_TYPE_FULL: "Microsoft:Hyper-V:Snapshot:Realized",
    SNAPSHOT_TYPE_RECOVERY: "Microsoft:Hyper-V:Snapshot:Recovery",
}
REFERENCE_POINT_TYPE_RCT = 2    # Msvm_VirtualSystemReferencePoint.ReferencePointType
CONSISTENCY_APPLICATION, CONSISTENCY_CRASH = 1, 2

# A VM name becomes part of file names (<name>_disk<i>_<checkpoint ID>.avhdx plus hidden temporary
# and side-file suffixes, about 80 bytes more) and of an export's directory: 150 bytes keeps every
# such name under the usual 255-byte limit. 100 characters is Hyper-V's limit.
VM_NAME_MAX_CHARACTERS = 100
VM_NAME_MAX_BYTES = 150
VM_NAME_RULE = (f"a VM name is 1 to {VM_NAME_MAX_CHARACTERS} characters (at most {VM_NAME_MAX_BYTES} bytes of "
                "UTF-8) with no '/', '\\' or control characters, no leading or trailing space, does not start "
                "with '.', and is not a GUID (commands take a VM's name or its ID)")
_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


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
        disks = [DiskAttachment(**_known_fields(DiskAttachment, d)) for d in data.get("disks", [])]
        return cls(**{**_known_fields(cls, data), "disks": disks})


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
        disks = [CheckpointDisk(**_known_fields(CheckpointDisk, d)) for d in data["disks"]]
        return cls(**{**_known_fields(cls, data), "disks": disks})


@dataclass
class ReferencePoint:
    """Msvm_VirtualSystemReferencePoint (RCT based): the two identifier arrays are parallel.
    ``element_name`` (CIM_ManagedElement.ElementName) is the recovery checkpoint's name unless
    ConvertToReferencePoint was given one: a backup application names its points per repository."""

    instance_id: str
    virtual_system_identifier: str
    virtual_disk_identifiers: list[str]
    resilient_change_tracking_identifiers: list[str]
    consistency_level: int
    created: str
    reference_point_type: int = REFERENCE_POINT_TYPE_RCT
    exported: list[str] = field(default_factory=list)
    element_name: str = ""  # documents written before it existed have none

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ReferencePoint:
        return cls(**_known_fields(cls, data))


def check_vm_name(name: object) -> str:
    """``name`` if it can name a VM (``VM_NAME_RULE``); HostError 32773 saying what is wrong otherwise.
    Every entry point that takes a VM name, or reads one from a file, checks it before making a file."""
    problem = _vm_name_problem(name)
    if problem:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:60]) + "..."
        raise HostError(f"{shown} cannot be a VM name: {problem}; {VM_NAME_RULE}", INVALID_PARAMETER)
    return name  # type: ignore[return-value]


def _vm_name_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return "it is not text"
    if not name:
        return "it is empty"
    if len(name) > VM_NAME_MAX_CHARACTERS:
        return f"it has {len(name)} characters"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid Unicode text"
    if size > VM_NAME_MAX_BYTES:
        return f"it takes {size} bytes of UTF-8"
    if "/" in name or "\\" in name:
        return "it holds a path separator"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "it holds a control character"
    if name != name.strip():
        return "it starts or ends with white space"
    if name.startswith("."):
        return "it starts with '.'"
    if _GUID.fullmatch(name):
        return "it has the form of a VM ID"
    return None


def check_vm_id(vm_id: object) -> str:
    """A VM ID (it names the VM's directory): a GUID, returned upper-case; HostError 32773 otherwise."""
    if not isinstance(vm_id, str) or not _GUID.fullmatch(vm_id):
        shown = repr(vm_id)[:80]
        raise HostError(f"{shown} is not a VM ID: a VM ID is a GUID (8-4-4-4-12 hexadecimal digits)",
                        INVALID_PARAMETER)
    return vm_id.upper()


def _known_fields(cls, data: dict) -> dict:
    """The entries of ``data`` that are fields of ``cls``: a newer document's extra keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


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
