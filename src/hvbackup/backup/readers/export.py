"""``--method export``: the host reads the disks (ExportSystemDefinition, the WMI path a remote
backup application uses) and the backup reads the exported files.

Without a base the checkpoint is exported in full and read like any disk. With the base's reference
point the host writes a *detached* differential of each disk: the changed ranges only, its parent
not at hand. It is opened without its parent, so its own sectors are the change list and the only
bytes there are to read; the planner lays them over the base point's chunks from the repository.
The export goes into a hidden directory beside the VMs (``<host>/.<VM ID>.exporting``) that is
removed as soon as its files are open: the host keeps no copy of the VM's disks.
"""

from __future__ import annotations

import os
import shutil
import threading

from hvbackup import disks, durable
from hvbackup.backup import readers
from hvbackup.backup.geometry import Geometry
from hvbackup.backup.readers import Range, close_all, data_ranges
from hvbackup.disks.device import BlockDevice
from hvbackup.errors import HostError, NeedsFull
from hvbackup.host.model import Checkpoint, ExportSettings, ReferencePoint
from hvbackup.host.returns import INVALID_PARAMETER, INVALID_STATE
from hvbackup.host.services import VirtualSystemManagementService, outcome
from hvbackup.host.vm import Vm


def export_directory(vm: Vm) -> str:
    """Where a backup of ``vm`` has the host export: hidden, beside the VMs; one per VM, whose
    backups take turns (``Vm.exclusive``)."""
    return durable.hidden(os.path.join(vm.host.directory, vm.vm_id), "exporting")


def open_readers(vm: Vm, checkpoint: Checkpoint, base: ReferencePoint | None,
                 cancel: threading.Event) -> list[ExportReader]:
    directory = export_directory(vm)
    shutil.rmtree(directory, ignore_errors=True)  # what a killed run left
    try:
        files, full = _export(vm, checkpoint, base, directory, cancel)
        opened: list[ExportReader] = []
        try:
            for path in files:  # a full copy has no parent to leave out
                opened.append(ExportReader(disks.open(path, read_only=True, without_parent=True), full))
        except BaseException:
            close_all(opened, failed=True)
            raise
        return opened
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # open files stay readable; the host keeps nothing


def _export(vm: Vm, checkpoint: Checkpoint, base: ReferencePoint | None, directory: str,
            cancel: threading.Event) -> tuple[list[str], NeedsFull | None]:
    """The exported disk files, and why they are full copies although there is a base, if they are."""
    settings = ExportSettings(snapshot_virtual_system=checkpoint.instance_id,
                              differential_backup_base=base.instance_id if base else None,
                              create_vm_export_subdirectory=False)
    try:
        service = VirtualSystemManagementService(vm.host)
        answer = outcome(service.export_system_definition(vm, directory, settings, detached=True), cancel)
        return answer["virtual_hard_disks"], None
    except HostError as exc:
        if base is None or exc.return_value not in (INVALID_STATE, INVALID_PARAMETER):
            raise
        # Change tracking cannot say what changed (off, lost, changed offline: 32775), or does not know
        # the base's RCT ID (a disk replaced: 32773): export in full. Any other fault recurs there.
        full = NeedsFull(f"the host could not export the changes: {exc}", reason=readers.TRACKING_LOST)
    files, _ = _export(vm, checkpoint, None, directory, cancel)
    return files, full


class ExportReader:
    def __init__(self, device: BlockDevice, full: NeedsFull | None):
        self.device = device
        self.geometry = Geometry.of(device)
        self.whole = device.disk_type != "differencing"
        self.full = full

    def changes(self, base: ReferencePoint | None) -> list[Range]:
        if base is None:
            raise NeedsFull("there is no base to read changes since", reason=readers.NO_BASE)
        if self.whole:
            raise self.full or NeedsFull("the base reference point does not know this disk: the host exported it "
                                         "in full", reason=readers.NEW_DISK)
        return data_ranges(self.device.extents())  # no parent: what the file holds is what changed

    def allocated(self) -> list[Range]:
        if not self.whole:
            raise HostError("the host exported only this disk's changes, and a full read needs all of it: "
                            "back up with --full", INVALID_STATE)
        return data_ranges(self.device.extents())

    def readinto(self, offset: int, buffer) -> None:
        self.device.readinto(offset, buffer)

    def finish(self) -> None:
        self.device.close()

    abandon = finish  # the export directory went when the files were opened
