"""Finishing what a crash interrupted, and finding what interrupted backups left behind.

An intent in a VM document names the operation in progress:

* ``create_checkpoint`` (also the first half of applying one): the new AVHDX files it lists were
  not yet recorded, so no guest write reached them; they are deleted.
* ``collapse``: the merges and deletions after destroying or applying a checkpoint; they are run
  again (each merge resumes where it stopped).

Orphans, what ``hvbackup checkpoint clean`` removes: recovery checkpoints whose backup is gone (the
process that took them ended, or none was recorded and they are older than a day), disk files in
the VM's directory that no VM record names, and VM directories a crash left half-created.

A VM whose document is damaged is skipped by both, never changed or deleted (the user may repair it
by hand); ``find_orphans`` reports it.
"""

from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass

from hvbackup.errors import HvBackupError
from hvbackup.host import checkpoints
from hvbackup.host.fileerrors import file_errors
from hvbackup.host.model import SNAPSHOT_TYPE_RECOVERY, Checkpoint
from hvbackup.host.store import STAGING_SUFFIX
from hvbackup.host.vm import DISK_DIRECTORY, DamagedVm, Vm, VmRegistry

UNOWNED_MAX_AGE = datetime.timedelta(days=1)
DISK_SUFFIXES = (".vhdx", ".avhdx", ".vhd", ".avhd")


def recover_all(host: VmRegistry) -> list[DamagedVm]:
    """At open: remove half-built VM directories and finish every VM's interrupted operation.
    Returns the VMs skipped because their document is damaged."""
    with host.lock.held():
        with file_errors("removing half-built VMs"):
            for name in os.listdir(host.vms_directory):
                if name.endswith(STAGING_SUFFIX):
                    shutil.rmtree(os.path.join(host.vms_directory, name), ignore_errors=True)
        damaged = []
        for entry in host.inventory():
            if isinstance(entry, DamagedVm):
                damaged.append(entry)
                continue
            try:
                checkpoints.finish_intent(entry)
            except HvBackupError:
                continue  # e.g. a disk another process holds open; the intent stays for the next open
        return damaged


@dataclass
class Orphans:
    checkpoints: list[tuple[Vm, Checkpoint, str]]   # (vm, checkpoint, why)
    files: list[tuple[Vm, str]]                      # unrecorded disk files
    damaged: list[DamagedVm]                         # VMs skipped: their document cannot be read

    def to_dict(self) -> dict:
        return {
            "checkpoints": [{"vm": vm.name, "vm_id": vm.vm_id, "id": c.instance_id, "name": c.name,
                             "created": c.created, "why": why} for vm, c, why in self.checkpoints],
            "files": [{"vm": vm.name, "path": vm.path_of(f)} for vm, f in self.files],
            "damaged": [d.to_dict() for d in self.damaged],
        }


def find_orphans(host: VmRegistry, *, max_age: datetime.timedelta = UNOWNED_MAX_AGE) -> Orphans:
    found = Orphans([], [], [])
    now = datetime.datetime.now(datetime.timezone.utc)
    for entry in host.inventory():
        if isinstance(entry, DamagedVm):
            found.damaged.append(entry)
            continue
        vm = entry
        document = vm.load()
        for checkpoint in (Checkpoint.from_dict(c) for c in document["checkpoints"]):
            if checkpoint.snapshot_type == SNAPSHOT_TYPE_RECOVERY:
                why = _stray(checkpoint, now, max_age)
                if why:
                    found.checkpoints.append((vm, checkpoint, why))
        recorded = {f for files in document["files"].values() for f in files}
        disk_dir = vm.path_of(DISK_DIRECTORY)
        with file_errors(f"VM {vm.name}: looking for unrecorded disk files"):
            names = sorted(os.listdir(disk_dir)) if os.path.isdir(disk_dir) else []
        for name in names:
            relative = os.path.join(DISK_DIRECTORY, name)
            if name.endswith(DISK_SUFFIXES) and relative not in recorded:
                found.files.append((vm, relative))
    return found


def _stray(checkpoint: Checkpoint, now: datetime.datetime, max_age: datetime.timedelta) -> str | None:
    owner = checkpoint.owner
    if owner:
        if owner.get("boot_id") != checkpoints.boot_id():
            return "the host restarted since the backup that took it"
        if not _alive(owner["pid"]):
            return f"the backup that took it (process {owner['pid']}) is gone"
        return None
    age = now - datetime.datetime.fromisoformat(checkpoint.created)
    return f"no backup owns it and it is {age.days} days old" if age > max_age else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean(host: VmRegistry, *, max_age: datetime.timedelta = UNOWNED_MAX_AGE) -> Orphans:
    """Destroy stray recovery checkpoints (merging their files away) and delete unrecorded files."""
    with host.lock.held(), file_errors("removing orphaned disk files"):
        orphans = find_orphans(host, max_age=max_age)
        for vm, checkpoint, _ in orphans.checkpoints:
            checkpoints.destroy(vm, checkpoint.instance_id)
        for vm, name in orphans.files:
            checkpoints.remove_disk_file(vm.path_of(name))
        return orphans
