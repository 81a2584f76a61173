"""The host's WMI-shaped services: the methods a backup application calls on Hyper-V, with their
names (snake_case), parameters and return values.

Every method returns ``(return_value, value)`` and raises nothing for an expected failure:

* ``0`` — done; ``value`` is the result (a checkpoint, a reference point, a VM, ...);
* ``4096`` (Method Parameters Checked - Job Started) — ``value`` is a running ``ConcreteJob``
  whose ``result`` is the result once it completes, or whose ``error_code`` and
  ``error_description`` say why not;
* anything else — the method refused before starting; ``value`` is an ``MsvmError``.

Two return-value tables are in use, as on Hyper-V. Msvm_VirtualSystemSnapshotService inherits the
CIM table (1 Not Supported, 2 Failed, 3 Timeout, 4 Invalid Parameter, 5 Invalid State, 6 Invalid
Type); the reference-point, management and image-management services use the vendor table (32768
Failed, 32769 Access Denied, 32770 Not Supported, ... 32773 Invalid parameter, 32774 System is in
use, 32775 Invalid state for this operation, ... 32779 File not found / File in use). The host's
errors carry the vendor value (``HostError.return_value``); the snapshot service translates it to
the CIM one. A job's ``error_code`` is always the vendor value.

Quick operations (CreateSnapshot, DestroyReferencePoint, DefineSystem, RequestStateChange,
GetVirtualDiskChanges) finish before returning 0. Those that copy or merge disk data (ApplySnapshot,
DestroySnapshot and ConvertToReferencePoint, which merge the checkpoint's AVHDX files away;
ExportSystemDefinition; ImportSystemDefinition and RealizePlannedSystem) return 4096 and a job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from hvbackup.errors import HostError, HvBackupError
from hvbackup.host import checkpoints, refpoints
from hvbackup.host.jobs import ConcreteJob, JobType
from hvbackup.host.model import (
    CONSISTENCY_APPLICATION,
    CONSISTENCY_CRASH,
    ExportSettings,
    VmState,
    check_vm_name,
)
from hvbackup.host.vm import Vm

if TYPE_CHECKING:
    from hvbackup.host.host import Host

COMPLETED, JOB_STARTED = 0, 4096

# CIM_VirtualSystemSnapshotService return values
CIM_NOT_SUPPORTED, CIM_FAILED, CIM_TIMEOUT, CIM_INVALID_PARAMETER, CIM_INVALID_STATE, CIM_INVALID_TYPE = range(1, 7)

# Msvm_* vendor return values
FAILED, ACCESS_DENIED, NOT_SUPPORTED, STATUS_UNKNOWN, TIMEOUT = 32768, 32769, 32770, 32771, 32772
INVALID_PARAMETER, SYSTEM_IN_USE, INVALID_STATE, INCORRECT_DATA_TYPE = 32773, 32774, 32775, 32776
SYSTEM_NOT_AVAILABLE, OUT_OF_MEMORY, FILE_NOT_FOUND = 32777, 32778, 32779
FILE_IN_USE = 32779  # ImportSystemDefinition's meaning of 32779

_CIM_OF_VENDOR = {NOT_SUPPORTED: CIM_NOT_SUPPORTED, TIMEOUT: CIM_TIMEOUT, INVALID_PARAMETER: CIM_INVALID_PARAMETER,
                  INVALID_STATE: CIM_INVALID_STATE, INCORRECT_DATA_TYPE: CIM_INVALID_TYPE}


@dataclass
class MsvmError:
    """Msvm_Error: why a method failed without starting a job (WMI's extended status)."""

    return_value: int
    error_code: int             # the vendor value, whichever table the method returns
    description: str
    exception: HvBackupError

    def to_dict(self) -> dict:
        return {"return_value": self.return_value, "error_code": self.error_code, "description": self.description}


def vendor_value(exc: HvBackupError) -> int:
    return exc.return_value if isinstance(exc, HostError) else FAILED


def cim_value(vendor: int) -> int:
    return _CIM_OF_VENDOR.get(vendor, CIM_FAILED)


def _call(to_table: Callable[[int], int], method: Callable[[], Any]) -> tuple[int, Any]:
    """Run a quick method, or one that checks its parameters and starts a job."""
    try:
        value = method()
    except HvBackupError as exc:
        code = vendor_value(exc)
        return to_table(code), MsvmError(to_table(code), code, str(exc), exc)
    return (JOB_STARTED if isinstance(value, ConcreteJob) else COMPLETED), value


def _vendor(code: int) -> int:
    return code


def _settings(value: dict | None, what: str) -> dict:
    """An embedded setting-data instance: its fields, snake_case."""
    if value is not None and not isinstance(value, dict):
        raise HostError(f"{what} is not a set of fields", INVALID_PARAMETER)
    return dict(value or {})


def _job(job_type: JobType, description: str, operation, *, cancellable: bool = False) -> ConcreteJob:
    return ConcreteJob(job_type, description, cancellable=cancellable).run(operation)


class VirtualSystemSnapshotService:
    """Msvm_VirtualSystemSnapshotService: CreateSnapshot, ApplySnapshot, DestroySnapshot,
    ConvertToReferencePoint. Return values from the CIM table (module docstring)."""

    SETTINGS = {"consistency_level", "ignore_non_snapshottable_disks", "guest_backup_type", "element_name"}
    REFERENCE_POINT_SETTINGS = {"consistency_level", "element_name"}

    def __init__(self, host: Host):
        self.host = host

    def create_snapshot(self, vm: Vm, snapshot_settings: dict | None = None, snapshot_type: int = 2, *,
                        owner_pid: int | None = None) -> tuple[int, Any]:
        """CreateSnapshot(AffectedSystem, SnapshotSettings, SnapshotType): ``snapshot_settings`` holds
        Msvm_VirtualSystemSnapshotSettingData fields in snake_case (``consistency_level`` 1
        application / 2 crash, ``element_name`` the checkpoint's name). Synchronous: (0, Checkpoint).
        ``owner_pid`` (hvbackup's own) marks a recovery checkpoint as that backup process's."""
        def method():
            settings = _settings(snapshot_settings, "SnapshotSettings")
            unknown = set(settings) - self.SETTINGS
            if unknown:
                raise HostError(f"SnapshotSettings has no field {', '.join(sorted(unknown))}", INVALID_PARAMETER)
            level = settings.get("consistency_level", CONSISTENCY_CRASH)
            if level not in (CONSISTENCY_APPLICATION, CONSISTENCY_CRASH):
                raise HostError(f"ConsistencyLevel {level} is not 1 (application) or 2 (crash)", INVALID_PARAMETER)
            return checkpoints.create(vm, snapshot_type=snapshot_type, name=settings.get("element_name"),
                                      consistency_level=level, owner_pid=owner_pid)
        return _call(cim_value, method)

    def apply_snapshot(self, vm: Vm, snapshot_id: str) -> tuple[int, Any]:
        """ApplySnapshot(Snapshot): a job (71) that moves the VM to the checkpoint."""
        def method():
            checkpoint = vm.checkpoint(snapshot_id)
            return _job(JobType.APPLY_VIRTUAL_MACHINE_SNAPSHOT, f"apply {checkpoint.name}",
                        lambda progress, cancelled: checkpoints.apply(vm, checkpoint.instance_id))
        return _call(cim_value, method)

    def destroy_snapshot(self, vm: Vm, snapshot_id: str) -> tuple[int, Any]:
        """DestroySnapshot(AffectedSnapshot): a job (72) that drops the checkpoint and merges its files."""
        def method():
            checkpoint = vm.checkpoint(snapshot_id)
            return _job(JobType.DELETE_VIRTUAL_MACHINE_SNAPSHOT, f"delete {checkpoint.name}",
                        lambda progress, cancelled: checkpoints.destroy(vm, checkpoint.instance_id))
        return _call(cim_value, method)

    def convert_to_reference_point(self, vm: Vm, snapshot_id: str,
                                   reference_point_settings: dict | None = None) -> tuple[int, Any]:
        """ConvertToReferencePoint(AffectedSnapshot, ReferencePointSettings): a job (200) whose result
        is the Msvm_VirtualSystemReferencePoint; only recovery checkpoints convert (else 5).
        ``reference_point_settings`` holds Msvm_VirtualSystemReferencePointSettingData fields in
        snake_case: ``consistency_level`` and ``element_name`` (inherited from CIM_SettingData),
        the point's name; both default to the checkpoint's."""
        def method():
            settings = _settings(reference_point_settings, "ReferencePointSettings")
            unknown = set(settings) - self.REFERENCE_POINT_SETTINGS
            if unknown:
                raise HostError(f"ReferencePointSettings has no field {', '.join(sorted(unknown))}", INVALID_PARAMETER)
            level, name = settings.get("consistency_level"), settings.get("element_name")
            if level is not None and level not in (CONSISTENCY_APPLICATION, CONSISTENCY_CRASH):
                raise HostError(f"ConsistencyLevel {level!r} is not 1 (application) or 2 (crash)", INVALID_PARAMETER)
            if name is not None and not isinstance(name, str):
                raise HostError(f"ElementName {name!r} is not text", INVALID_PARAMETER)
            checkpoint = vm.checkpoint(snapshot_id)
            checkpoints.require_recovery(checkpoint)
            return _job(JobType.CONVERT_SNAPSHOT_TO_REFERENCE_POINT, f"convert {checkpoint.name}",
                        lambda progress, cancelled: refpoints.convert_to_reference_point(
                            vm, checkpoint.instance_id, element_name=name, consistency_level=level))
        return _call(cim_value, method)


class VirtualSystemReferencePointService:
    """Msvm_VirtualSystemReferencePointService: DestroyReferencePoint (vendor table)."""

    def __init__(self, host: Host):
        self.host = host

    def destroy_reference_point(self, vm: Vm, reference_point_id: str) -> tuple[int, Any]:
        """DestroyReferencePoint(AffectedReferencePoint): synchronous, (0, None); 32773 if unknown."""
        return _call(_vendor, lambda: refpoints.destroy_reference_point(vm, reference_point_id))


class VirtualSystemManagementService:
    """Msvm_VirtualSystemManagementService: DefineSystem, ExportSystemDefinition,
    ImportSystemDefinition, RealizePlannedSystem, and Msvm_ComputerSystem.RequestStateChange
    (vendor table)."""

    def __init__(self, host: Host):
        self.host = host

    def define_system(self, name: str, disk_sizes: list[int], *, processors: int = 1, memory_mb: int = 1024,
                      notes: str = "") -> tuple[int, Any]:
        """DefineSystem: a new VM (Off) with one tracked VHDX per size. (0, Vm)."""
        return _call(_vendor, lambda: self.host.create_vm(name, disk_sizes, processors=processors,
                                                          memory_mb=memory_mb, notes=notes))

    def request_state_change(self, vm: Vm, requested_state: int) -> tuple[int, Any]:
        """Msvm_ComputerSystem.RequestStateChange: 2 Running, 3 Off, 6 Saved, 9 Paused. (0, VmState);
        32775 if the VM cannot go there from where it is."""
        actions = {VmState.RUNNING: "start", VmState.OFF: "stop", VmState.SAVED: "save", VmState.PAUSED: "pause"}

        def method():
            if requested_state not in actions:
                raise HostError(f"RequestedState {requested_state} is not 2, 3, 6 or 9", INVALID_PARAMETER)
            return vm.request_state_change(actions[VmState(requested_state)])
        return _call(_vendor, method)

    def export_system_definition(self, vm: Vm, export_directory: str,
                                 export_setting_data: ExportSettings) -> tuple[int, Any]:
        """ExportSystemDefinition(ComputerSystem, ExportDirectory, ExportSettingData): a cancellable
        job (62) whose result is what ``export_system_definition`` reports (the files written)."""
        from hvbackup.host.export import export_subdirectory, export_system_definition

        def method():
            settings = export_setting_data
            if not export_directory or not isinstance(export_directory, str):
                raise HostError("ExportDirectory names no directory", INVALID_PARAMETER)
            if settings.create_vm_export_subdirectory:
                export_subdirectory(vm)
            if settings.snapshot_virtual_system is not None:
                vm.checkpoint(settings.snapshot_virtual_system)
            if settings.differential_backup_base is not None:
                _require_base(vm, settings.differential_backup_base)
            return _job(JobType.EXPORT_VIRTUAL_MACHINE, f"export {vm.name}",
                        lambda progress, cancelled: export_system_definition(
                            vm, export_directory, settings, progress=progress, cancelled=cancelled),
                        cancellable=True)
        return _call(_vendor, method)

    def import_system_definition(self, system_definition_file: str, snapshot_folder: str | None = None,
                                 generate_new_system_identifier: bool = False, *,
                                 name: str | None = None) -> tuple[int, Any]:
        """ImportSystemDefinition(SystemDefinitionFile, SnapshotFolder, GenerateNewSystemIdentifier):
        a job (61) whose result is the planned VM (Msvm_PlannedComputerSystem). ``name``
        (hvbackup's own) plans the VM under that name instead of the exported one."""
        from hvbackup.host.importing import import_system_definition

        def method():
            if not isinstance(system_definition_file, str) or not os.path.isfile(system_definition_file):
                raise HostError(f"{system_definition_file}: no such system definition file", INVALID_PARAMETER)
            if name is not None:
                check_vm_name(name)
            return _job(JobType.IMPORT_VIRTUAL_MACHINE, f"import {system_definition_file}",
                        lambda progress, cancelled: import_system_definition(
                            self.host, system_definition_file, snapshot_folder, generate_new_system_identifier,
                            name=name))
        return _call(_vendor, method)

    def realize_planned_system(self, planned_system) -> tuple[int, Any]:
        """RealizePlannedSystem(PlannedSystem): a job (141) whose result is the VM."""
        from hvbackup.host.importing import realize_planned_system

        return _call(_vendor, lambda: _job(JobType.REALIZING_VIRTUAL_MACHINE, "realize planned VM",
                                           lambda progress, cancelled: realize_planned_system(planned_system)))


def _require_base(vm: Vm, instance_id: str) -> None:
    """DifferentialBackupBase names a reference point or a checkpoint of the VM."""
    if any(r.instance_id.lower() == instance_id.lower() for r in vm.reference_points()):
        return
    vm.checkpoint(instance_id)


class ImageManagementService:
    """Msvm_ImageManagementService: GetVirtualDiskChanges (vendor table, 32779 File not found)."""

    def __init__(self, host: Host):
        self.host = host

    def get_virtual_disk_changes(self, path: str, limit_id: str, byte_offset: int,
                                 byte_length: int) -> tuple[int, Any]:
        """GetVirtualDiskChanges(Path, LimitId, ByteOffset, ByteLength): synchronous,
        (0, (ProcessedByteLength, ChangedByteOffsets, ChangedByteLengths))."""
        from hvbackup.host.changes import get_virtual_disk_changes

        def method():
            if not os.path.exists(path):
                raise HostError(f"{path}: no such virtual disk", FILE_NOT_FOUND)
            return get_virtual_disk_changes(path, limit_id, byte_offset, byte_length)
        return _call(_vendor, method)

