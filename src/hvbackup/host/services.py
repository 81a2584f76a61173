"""The host's WMI-shaped services: the methods a backup application calls on Hyper-V, with their
names (snake_case), parameters and return values.

Every method returns ``(return_value, value)`` and raises nothing for an expected failure:

* ``0`` — done; ``value`` is the result (a checkpoint, a reference point, a VM, ...);
* ``4096`` (Method Parameters Checked - Job Started) — ``value`` is a running ``ConcreteJob``
  whose ``result`` is the result once it completes, or whose ``error_code`` and
  ``error_description`` say why not;
* anything else — the method refused before starting; ``value`` is an ``MsvmError``.

Two return-value tables are in use, as on Hyper-V (``returns.py``): Msvm_VirtualSystemSnapshotService
answers from the CIM table (1 Not Supported, 2 Failed, 3 Timeout, 4 Invalid Parameter, 5 Invalid
State, 6 Invalid Type), the other services from the vendor table (32768 Failed, ... 32773 Invalid
parameter, 32774 System is in use, 32775 Invalid state for this operation, ... 32779 File not found /
File in use). The host's errors carry the vendor value, which a job's ``error_code`` and an
``MsvmError.error_code`` keep.

Quick operations (CreateSnapshot, DestroyReferencePoint, DefineSystem, RequestStateChange,
GetVirtualDiskChanges, and the listings) finish before returning 0. Those that copy or merge disk
data (ApplySnapshot, DestroySnapshot and ConvertToReferencePoint, which merge the checkpoint's AVHDX
files away; removing orphans; ExportSystemDefinition; ImportSystemDefinition and
RealizePlannedSystem) return 4096 and a job.

These services are the host's one entry: the CLI and the backup engine call them, and ``outcome``
turns an answer into its result or raises the failure, for callers that want Python's way.
"""

from __future__ import annotations

import datetime
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from hvbackup.errors import HostError, HvBackupError
from hvbackup.host import checkpoints, recovery, refpoints
from hvbackup.host.changes import get_virtual_disk_changes
from hvbackup.host.export import export_subdirectory, export_system_definition
from hvbackup.host.host import Host
from hvbackup.host.importing import PlannedSystem, import_system_definition, realize_planned_system
from hvbackup.host.jobs import ConcreteJob, JobType
from hvbackup.host.model import (
    CONSISTENCY_APPLICATION,
    CONSISTENCY_CRASH,
    SNAPSHOT_TYPE_FULL,
    SNAPSHOT_TYPE_RECOVERY,
    ExportSettings,
    VmState,
    check_vm_name,
)
from hvbackup.host.returns import (
    COMPLETED,
    FAILED,
    FILE_NOT_FOUND,
    INVALID_PARAMETER,
    JOB_STARTED,
    cim_value,
)
from hvbackup.host.vm import Vm


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


def outcome(answer: tuple[int, Any], cancel: threading.Event | None = None) -> Any:
    """The result of a service call, after waiting for its job if it started one; a failure is raised:
    the HvBackupError that caused it, or a HostError carrying the job's error code. Setting ``cancel``
    asks a cancellable job to stop (RequestStateChange Terminate) and waits for it to clean up."""
    return_value, value = answer
    if return_value == COMPLETED:
        return value
    if not isinstance(value, ConcreteJob):
        raise value.exception
    job = value
    while not job.wait(0.1 if cancel is not None else None):
        if cancel.is_set():
            job.cancel()
            cancel = None
    if job.succeeded:
        return job.result
    if isinstance(job.exception, HvBackupError):
        raise job.exception
    raise HostError(f"{job.description}: job {job.instance_id} ended {job.job_state.name.title()} "
                    f"({job.error_code}): {job.error_description}", job.error_code or FAILED) from job.exception


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
    ConvertToReferencePoint; listing a VM's checkpoints, finding and removing orphans. Return values
    from the CIM table (module docstring)."""

    SETTINGS = {"consistency_level", "ignore_non_snapshottable_disks", "guest_backup_type", "element_name"}
    REFERENCE_POINT_SETTINGS = {"consistency_level", "element_name"}

    def __init__(self, host: Host):
        self.host = host

    def create_snapshot(self, vm: Vm, snapshot_settings: dict | None = None,
                        snapshot_type: int = SNAPSHOT_TYPE_FULL, *, owner_pid: int | None = None) -> tuple[int, Any]:
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

    def get_snapshots(self, vm: Vm, snapshot_type: int | None = None) -> tuple[int, Any]:
        """The VM's checkpoints, oldest first (Msvm_SnapshotOfVirtualSystem; hvbackup's own method):
        all of them, or those of ``snapshot_type`` (2 standard, 32768 recovery). (0, [Checkpoint])."""
        def method():
            if snapshot_type not in (None, SNAPSHOT_TYPE_FULL, SNAPSHOT_TYPE_RECOVERY):
                raise HostError(f"SnapshotType {snapshot_type!r} is not 2 (standard) or 32768 (recovery)",
                                INVALID_PARAMETER)
            return [c for c in vm.checkpoints() if snapshot_type in (None, c.snapshot_type)]
        return _call(cim_value, method)

    def find_orphans(self, *, max_age: datetime.timedelta = recovery.UNOWNED_MAX_AGE) -> tuple[int, Any]:
        """What interrupted backups left on the host (hvbackup's own method): recovery checkpoints
        whose backup is gone, or without an owner and older than ``max_age``, and disk files no
        record names. (0, recovery.Orphans); the checkpoints are ``(vm, checkpoint, why)``."""
        def method():
            _require_age(max_age)
            return recovery.find_orphans(self.host, max_age=max_age)
        return _call(cim_value, method)

    def clean_orphans(self, *, max_age: datetime.timedelta = recovery.UNOWNED_MAX_AGE) -> tuple[int, Any]:
        """Remove what ``find_orphans`` finds (hvbackup's own method): a job (72) that destroys those
        checkpoints, merging their files away, and deletes those files; its result is the Orphans."""
        def method():
            _require_age(max_age)
            return _job(JobType.DELETE_VIRTUAL_MACHINE_SNAPSHOT, "remove orphaned checkpoints and files",
                        lambda progress, cancelled: recovery.clean(self.host, max_age=max_age))
        return _call(cim_value, method)


def _require_age(max_age: object) -> None:
    if not isinstance(max_age, datetime.timedelta) or max_age < datetime.timedelta(0):
        raise HostError(f"{max_age!r} is not an age", INVALID_PARAMETER)


class VirtualSystemReferencePointService:
    """Msvm_VirtualSystemReferencePointService: DestroyReferencePoint, listing a VM's reference
    points (vendor table)."""

    def __init__(self, host: Host):
        self.host = host

    def destroy_reference_point(self, vm: Vm, reference_point_id: str) -> tuple[int, Any]:
        """DestroyReferencePoint(AffectedReferencePoint): synchronous, (0, None); 32773 if unknown."""
        return _call(_vendor, lambda: refpoints.destroy_reference_point(vm, reference_point_id))

    def get_reference_points(self, vm: Vm) -> tuple[int, Any]:
        """The VM's reference points, oldest first (Msvm_ReferencePointOfVirtualSystem; hvbackup's own
        method). (0, [ReferencePoint])."""
        return _call(_vendor, vm.reference_points)


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

    def export_system_definition(self, vm: Vm, export_directory: str, export_setting_data: ExportSettings, *,
                                 detached: bool = False) -> tuple[int, Any]:
        """ExportSystemDefinition(ComputerSystem, ExportDirectory, ExportSettingData): a cancellable
        job (62) whose result is what ``export_system_definition`` reports (the files written).
        ``detached`` (hvbackup's own): a differential that needs no export of its base."""
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
                            vm, export_directory, settings, progress=progress, cancelled=cancelled,
                            detached=detached),
                        cancellable=True)
        return _call(_vendor, method)

    def import_system_definition(self, system_definition_file: str, snapshot_folder: str | None = None,
                                 generate_new_system_identifier: bool = False, *,
                                 name: str | None = None) -> tuple[int, Any]:
        """ImportSystemDefinition(SystemDefinitionFile, SnapshotFolder, GenerateNewSystemIdentifier):
        a job (61) whose result is the planned VM (Msvm_PlannedComputerSystem). ``name``
        (hvbackup's own) plans the VM under that name instead of the exported one."""
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

    def realize_planned_system(self, planned_system: PlannedSystem) -> tuple[int, Any]:
        """RealizePlannedSystem(PlannedSystem): a job (141) whose result is the VM."""
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
        def method():
            if not os.path.exists(path):
                raise HostError(f"{path}: no such virtual disk", FILE_NOT_FOUND)
            return get_virtual_disk_changes(path, limit_id, byte_offset, byte_length)
        return _call(_vendor, method)

