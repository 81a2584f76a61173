"""Msvm_VirtualSystemManagementService.ExportSystemDefinition for backups: a checkpoint's
configuration and disks copied to a directory, full or differential, as
Msvm_VirtualSystemExportSettingData (``ExportSettings``) asks.

Layout, as Hyper-V writes it (without CreateVmExportSubdirectory there is no ``<VM name>`` level)::

    <ExportDirectory>/<VM name>/Virtual Machines/<VM id>.vmcx           the checkpoint's configuration
    <ExportDirectory>/<VM name>/Virtual Hard Disks/<disk>.vhdx           a full copy of each disk
    <ExportDirectory>/<VM name>/Virtual Hard Disks/<disk>_<checkpoint>.avhdx   or a differential

A differential (DifferentialBackupBase set) holds only the ranges change tracking reports since the
base, a reference point or a checkpoint, and names the base's exported disk as its parent: base and
differential read as the disk at the checkpoint. With BackupIntent Merge the ranges are written into
the base's exported disk instead, which moves into the destination: one up-to-date full set; the
base's export is consumed. The exported disks are recorded in the checkpoint (``exported``), so the
reference point it becomes knows the parents of the next differential.

A backup application that keeps no export of the base (hvbackup's own backups: their base is in a
repository) asks for a *detached* differential: its parent locator names the disk file the
checkpoint froze, which is not in the destination, and the differential is read alone
(``disks.open(..., without_parent=True)``): its own sectors are exactly the changed ranges. A disk
the base does not know is then exported in full instead of failing the export.

Crash safety: each disk is built under a hidden name and renamed into place once flushed; the .vmcx
comes last, after the checkpoint records the export, so an export whose .vmcx exists is complete and
recorded. Running an interrupted export again replaces what it left; an interrupted Merge, which
leaves ``.<disk>.vhdx.merging`` (or the renamed disk) in the destination, is resumed: it writes the
same ranges again. The host lock is held throughout, so the checkpoint's files cannot be merged away
while they are read.

A failure, a cancellation or an interruption (any exception, KeyboardInterrupt included) before the
.vmcx is in place removes exactly what this export created, directories included, and the record of
it; what was there before stays, and so does a Merge's working file (it holds the base's data).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass
from typing import Callable

from hvbackup import disks, durable, stack
from hvbackup.disks.copy import Progress, copy_data, data_bytes, data_pieces
from hvbackup.disks.device import BlockDevice, Extent, ExtentState
from hvbackup.disks.fileio import replace_file, sync_directory
from hvbackup.errors import DiskError, HostError, HvBackupError
from hvbackup.host import checkpoints
from hvbackup.host.changes import changed_ranges
from hvbackup.host.fileerrors import file_errors, write_failed
from hvbackup.host.model import (
    BACKUP_INTENT_MERGE,
    BACKUP_INTENT_PRESERVE_CHAIN,
    EXPORT_ONE_SNAPSHOT,
    EXPORT_ONE_SNAPSHOT_FOR_BACKUP,
    Checkpoint,
    ExportSettings,
    check_vm_name,
)
from hvbackup.host.returns import FAILED, INVALID_PARAMETER, NOT_SUPPORTED
from hvbackup.host.undo import Created
from hvbackup.host.vm import DISK_DIRECTORY, Vm
from hvbackup.meter import ByteMeter

CONFIG_DIRECTORY = "Virtual Machines"
DEFINITION_FORMAT = "hvbackup-vmcx"
DEFINITION_VERSION = 1
PIPELINE_PIECE = 1 << 20  # changed ranges this large on average are copied with read-ahead threads


@dataclass
class Base:
    """The DifferentialBackupBase: per virtual disk identifier, its RCT ID and its exported file."""

    instance_id: str
    rct_ids: dict[str, str]
    exported: dict[str, str]


def export_system_definition(vm: Vm, directory: str, settings: ExportSettings, *,
                             progress: Progress | None = None,
                             cancelled: Callable[[], bool] | None = None, detached: bool = False) -> dict:
    """Export the checkpoint ``settings.snapshot_virtual_system``; returns the files written:
    ``{"directory", "definition_file", "virtual_hard_disks": [...]}``. ``detached``: a differential
    needs no export of its base (see the module's docstring)."""
    _check_settings(settings)
    if not isinstance(directory, str) or not directory:
        raise HostError("ExportDirectory names no directory", INVALID_PARAMETER)
    with vm.host.lock.held(), file_errors(f"exporting VM {vm.vm_id} to {directory}"):
        checkpoints.finish_intent(vm)  # an interrupted merge may still hold the checkpoint's files
        checkpoint = vm.checkpoint(settings.snapshot_virtual_system)
        base = _base(vm, settings.differential_backup_base, checkpoint) if settings.differential_backup_base else None
        merge = base is not None and settings.backup_intent == BACKUP_INTENT_MERGE
        if merge and detached:  # a Merge writes into the base's export, which a detached one has not
            raise HostError("BackupIntent Merge needs the base's export: it cannot be detached", INVALID_PARAMETER)
        root = os.path.join(directory, export_subdirectory(vm)) if settings.create_vm_export_subdirectory else directory
        definition = os.path.join(root, CONFIG_DIRECTORY, f"{vm.vm_id}.vmcx")
        names = [_disk_name(checkpoint, i, differential=base is not None and not merge)
                 for i in range(len(checkpoint.disks))]
        targets = [os.path.join(root, DISK_DIRECTORY, name) for name in names]
        _check_destination(definition, targets if settings.copy_vm_storage else [])
        created = Created()
        try:
            created.make_directories(os.path.dirname(definition))
            exported = []
            if settings.copy_vm_storage:
                created.make_directories(os.path.join(root, DISK_DIRECTORY))
                exported = _export_disks(vm, checkpoint, base, merge, detached, targets,
                                         _Meter(progress, cancelled), created)
                _record(vm, checkpoint, exported)
            _write_definition(definition, vm, checkpoint, settings, names)
        except BaseException:
            if not os.path.lexists(definition):  # with its .vmcx in place the export is complete
                _undo(vm, checkpoint, created)
            raise
        return {"directory": root, "definition_file": definition, "virtual_hard_disks": exported}


def export_subdirectory(vm: Vm) -> str:
    """The ``<VM name>`` directory of an export: the name must be one a VM may have."""
    try:
        return check_vm_name(vm.name)
    except HostError as exc:
        raise HostError(f"{exc}. Rename the VM, or export without CreateVmExportSubdirectory",
                        INVALID_PARAMETER) from None


def _undo(vm: Vm, checkpoint: Checkpoint, created: Created) -> None:
    """Back to before the export: the files and directories this export made removed, and the
    checkpoint's record of its last export as it was. Best effort: the failure itself is what the
    caller must see (a record left naming removed files fails a later differential with 32773)."""
    created.remove()
    with contextlib.suppress(HvBackupError, OSError):
        _record(vm, checkpoint, checkpoint.exported)


def _check_destination(definition: str, targets: list[str]) -> None:
    """Never write over a complete export. Disk files in a directory with no .vmcx at all are what an
    interrupted export left: they are replaced (or, for a Merge, finished)."""
    if os.path.lexists(definition):
        raise HostError(f"{definition} already exists: export into another directory", INVALID_PARAMETER)
    config_directory = os.path.dirname(definition)
    complete = os.path.isdir(config_directory) and any(n.endswith(".vmcx") for n in os.listdir(config_directory))
    for target in targets:
        if complete and os.path.lexists(target):
            raise HostError(f"{target} belongs to another export in this directory", INVALID_PARAMETER)


def _check_settings(settings: ExportSettings) -> None:
    csc = settings.copy_snapshot_configuration
    if csc not in (EXPORT_ONE_SNAPSHOT, EXPORT_ONE_SNAPSHOT_FOR_BACKUP):
        code = NOT_SUPPORTED if csc in (0, 1) else INVALID_PARAMETER
        raise HostError(f"CopySnapshotConfiguration {csc}: only 2 (ExportOneSnapshot) and 3 "
                        "(ExportOneSnapshotForBackup) are supported", code)
    if not settings.snapshot_virtual_system:
        raise HostError("SnapshotVirtualSystem names no checkpoint to export", INVALID_PARAMETER)
    if settings.differential_backup_base and csc != EXPORT_ONE_SNAPSHOT_FOR_BACKUP:
        raise HostError("DifferentialBackupBase needs CopySnapshotConfiguration 3", INVALID_PARAMETER)
    if settings.backup_intent not in (BACKUP_INTENT_PRESERVE_CHAIN, BACKUP_INTENT_MERGE):
        raise HostError(f"BackupIntent {settings.backup_intent} is not 0 (PreserveChain) or 1 (Merge)",
                        INVALID_PARAMETER)
    if settings.capture_live_state not in (0, 1, 2):
        raise HostError(f"CaptureLiveState {settings.capture_live_state} is not 0, 1 or 2", INVALID_PARAMETER)


def _base(vm: Vm, base_id: str, checkpoint: Checkpoint) -> Base:
    for point in vm.reference_points():
        if point.instance_id.lower() == base_id.lower():
            exported = dict(zip(point.virtual_disk_identifiers, point.exported))
            return Base(point.instance_id,
                        dict(zip(point.virtual_disk_identifiers, point.resilient_change_tracking_identifiers)),
                        exported)
    for other in vm.checkpoints():
        if other.instance_id.lower() == base_id.lower() and other.instance_id != checkpoint.instance_id:
            ids = [d.instance_id for d in other.disks]
            return Base(other.instance_id, {d.instance_id: d.rct_id for d in other.disks},
                        dict(zip(ids, other.exported)))
    raise HostError(f"VM {vm.name} has no reference point or other checkpoint {base_id} to be the "
                    "DifferentialBackupBase", INVALID_PARAMETER)


def _disk_name(checkpoint: Checkpoint, index: int, *, differential: bool) -> str:
    """The base file's name for a full set (as Hyper-V names exported disks), with the checkpoint's
    ID for a differential."""
    stem = os.path.splitext(os.path.basename(checkpoint.config["disks"][index]["chain"][0]))[0]
    return f"{stem}_{checkpoint.instance_id}.avhdx" if differential else f"{stem}.vhdx"


class _Meter(ByteMeter):
    """The export's bytes over all disks. The copies report per disk (done, total in that disk), so a
    disk's progress is added as it grows; the cancellation is checked between pieces."""

    def __init__(self, progress: Progress | None, cancelled: Callable[[], bool] | None):
        super().__init__(progress)
        self.stop_requested = cancelled
        self._in_disk = 0

    def check(self) -> None:
        if self.stop_requested and self.stop_requested():
            raise HostError("the export was cancelled", FAILED)

    def piece(self, done_in_disk: int, _total_in_disk: int) -> None:
        self.add(done_in_disk - self._in_disk)
        self._in_disk = done_in_disk
        self.check()

    def disk_done(self, count: int) -> None:
        """The disk's ``count`` bytes are exported, whatever the copy reported."""
        self.add(count - self._in_disk)
        self._in_disk = 0


@dataclass
class _Plan:
    """One disk to export: in full (``ranges`` None) or the changed ``ranges`` onto ``parent``."""

    source: str
    block_size: int
    parent: str | None
    ranges: list[Extent] | None
    count: int  # bytes to copy


def _export_disks(vm: Vm, checkpoint: Checkpoint, base: Base | None, merge: bool, detached: bool,
                  targets: list[str], meter: _Meter, created: Created) -> list[str]:
    plans = []
    for disk in checkpoint.disks:
        source = vm.path_of(disk.frozen)
        with stack.open(source, read_only=True) as src:
            size, held, block_size = src.size, data_bytes(src.extents()), src.block_size
        rct_id = base.rct_ids.get(disk.instance_id) if base is not None else None
        if base is None or (detached and rct_id is None):
            plans.append(_Plan(source, block_size, None, None, held))
            continue
        # Detached: the frozen file is the parent the locator names (its size, sectors and identity).
        parent = source if detached else base.exported.get(disk.instance_id)
        if rct_id is None:
            raise HostError(f"the base {base.instance_id} does not know disk {disk.instance_id}", INVALID_PARAMETER)
        if parent is None:
            raise HostError(f"the base {base.instance_id} has no export of disk {disk.instance_id}: a "
                            "differential export needs the base's exported disk as its parent; export the "
                            "base checkpoint before converting it, or take a full export", INVALID_PARAMETER)
        ranges = [Extent(o, n, ExtentState.DATA) for o, n in changed_ranges(source, rct_id, size)]
        plans.append(_Plan(source, block_size, parent, ranges, data_bytes(ranges)))
    meter.grow(sum(plan.count for plan in plans))
    exported = []
    for plan, target in zip(plans, targets):
        meter.check()
        _remove_leftovers(target)
        if not merge:  # a Merge's target is the base's disk, moved: never removed
            created.new_file(target)
        try:
            if plan.ranges is None:
                # The copy keeps the disk's block size, so it holds data where the disk does.
                with durable.built_in_place(target, "exporting") as temp:
                    disks.convert(plan.source, temp, format="vhdx", block_size=plan.block_size,
                                  progress=meter.piece)
            elif merge:
                _merge_into(plan.source, plan.ranges, plan.parent, target, meter)
            else:
                _differential(plan.source, plan.ranges, plan.parent, target, meter)
        except DiskError as exc:
            raise HostError(f"exporting {plan.source}: {exc}", FAILED) from None
        meter.disk_done(plan.count)
        exported.append(os.path.abspath(target))
    return exported


def _remove_leftovers(target: str) -> None:
    """Staged files an interrupted export of ``target`` left, at every level: this module's, then
    ``disks.convert``'s staged file of that one, and the disk layer's of each; a Merge's working file
    is kept to be resumed."""
    directory, name = os.path.split(target)
    durable.sweep(directory, name, keep=(".merging",))
    staged = durable.hidden(target, "exporting")
    for inner in (staged, durable.hidden(staged, "converting")):
        durable.sweep(directory, os.path.basename(inner))


def _differential(source: str, ranges: list[Extent], parent: str, target: str, meter: _Meter) -> None:
    """A differencing VHDX on ``parent`` holding the changed ranges of ``source``."""
    if not os.path.isfile(parent):
        raise HostError(f"the base's exported disk {parent} is missing; a differential needs it as its parent",
                        INVALID_PARAMETER)
    # An export's disk is never tracked: written as the format alone, whatever its parent is.
    with durable.built_in_place(target, "exporting") as temp, stack.open(source, read_only=True) as src, \
            disks.create(temp, format="vhdx", type="differencing", parent=parent) as dst:
        _copy_ranges(src, dst, ranges, meter)


def _merge_into(source: str, ranges: list[Extent], base_disk: str, target: str, meter: _Meter) -> None:
    """BackupIntent Merge: move the base's full disk to the destination and write the changed ranges
    into it. Moved first, so the base is never left looking whole while holding part of the changes."""
    working = durable.hidden(target, "merging")
    if os.path.isfile(base_disk):
        with stack.open(base_disk, read_only=True) as base, stack.open(source, read_only=True) as src:
            if base.parent is not None or base.size != src.size:
                raise HostError(f"{base_disk} is not a full copy of the disk: Merge needs a full base export",
                                INVALID_PARAMETER)
        try:
            os.replace(base_disk, working)
        except OSError as exc:
            code = INVALID_PARAMETER if exc.errno == errno.EXDEV else FAILED
            raise HostError(f"cannot move {base_disk} to {working}: {exc.strerror} (Merge needs the "
                            "destination on the base export's file system)", code) from None
        sync_directory(os.path.dirname(base_disk))
        sync_directory(os.path.dirname(working))
    elif os.path.isfile(target) and not os.path.isfile(working):
        os.rename(target, working)  # finished, but the export was interrupted before its .vmcx
    elif not os.path.isfile(working):
        raise HostError(f"the base's exported disk {base_disk} is missing; Merge writes into it", INVALID_PARAMETER)
    # The working file is an export's full disk, never tracked: written as the format alone.
    with stack.open(source, read_only=True) as src, disks.open(working) as dst:
        _copy_ranges(src, dst, ranges, meter)
    os.rename(working, target)
    sync_directory(os.path.dirname(target))


def _copy_ranges(src: BlockDevice, dst: BlockDevice, ranges: list[Extent], meter: _Meter) -> None:
    """Copy the changed ranges, zeros included (the base may hold data where the disk now reads
    zeros). Large ranges go through the pipelined copy; scattered small ones, the usual differential,
    one after the other in this thread: handing 64 KiB pieces to reader threads costs more than the
    overlap gains (about a third of a 1 %-changed 4 GiB differential in bench_export.py)."""
    pieces, total = list(data_pieces(ranges)), data_bytes(ranges)
    if pieces and total // len(pieces) >= PIPELINE_PIECE:
        copy_data(src, dst, pieces, skip_zeros=False, total=total, progress=meter.piece)
        return
    buffer = memoryview(bytearray(max((length for _, length in pieces), default=0)))
    done = 0
    for offset, length in pieces:
        view = buffer[:length]
        src.readinto(offset, view)
        dst.write(offset, view)
        done += length
        meter.piece(done, total)


def _write_definition(path: str, vm: Vm, checkpoint: Checkpoint, settings: ExportSettings,
                      names: list[str]) -> None:
    """The .vmcx: the checkpoint's configuration under the VM's ID (ExportOneSnapshotForBackup), its
    disks named by their files in ``Virtual Hard Disks``."""
    config = json.loads(json.dumps(checkpoint.config))
    for attachment, name in zip(config["disks"], names):
        attachment["chain"] = [name]
    definition = {
        "format": DEFINITION_FORMAT,
        "version": DEFINITION_VERSION,
        "virtual_system_identifier": vm.vm_id,
        "configuration": config,
        "snapshot": {
            "instance_id": checkpoint.instance_id, "element_name": checkpoint.name,
            "virtual_system_type": checkpoint.virtual_system_type, "created": checkpoint.created,
            "consistency_level": checkpoint.consistency_level,
            "resilient_change_tracking_identifiers": [d.rct_id for d in checkpoint.disks],
        },
        "differential_backup_base": settings.differential_backup_base,
        "backup_intent": settings.backup_intent,
    }
    if settings.copy_vm_runtime_information:
        definition["runtime"] = {"enabled_state": checkpoint.state}
    try:
        replace_file(path, (json.dumps(definition, indent=1, sort_keys=True) + "\n").encode())
    except DiskError as exc:
        raise write_failed(exc) from None


def _record(vm: Vm, checkpoint: Checkpoint, exported: list[str]) -> None:
    """The checkpoint now has an export. (After a Merge the base's list names files that moved away:
    a later differential against that base fails with 32773, as it must.)"""
    with vm.host.lock.held():
        document = vm.load()
        for entry in document["checkpoints"]:
            if entry["instance_id"] == checkpoint.instance_id:
                entry["exported"] = exported
        vm.save(document)
