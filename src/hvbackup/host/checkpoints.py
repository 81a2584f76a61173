"""Checkpoints (Msvm_VirtualSystemSnapshotService): create, apply, destroy, and the merges that
follow.

Each disk's files form a tree recorded in the VM document (``files``: file -> parent). Creating a
checkpoint freezes every disk's active file and gives it a new child (an AVHDX) that takes the
writes. Applying one gives its frozen files a new child and makes that active. Destroying one only
drops its record; ``collapse`` then tidies the tree: a file that is neither active nor frozen by a
checkpoint is deleted if nothing sits on it, and merged with its child if exactly one does.

Every step that changes files is preceded by an intent in the VM document, so whoever opens the host
after a crash finishes it (``recovery.py``), as does the next operation on the VM
(``finish_intent``). A failure or an interruption (any exception, KeyboardInterrupt included) while
a checkpoint's new files are made removes them at once; one during a merge leaves the ``collapse``
intent, which the next open or operation runs again.
"""

from __future__ import annotations

import contextlib
import datetime
import os

from hvbackup import stack, tracking
from hvbackup.errors import DiskBusyError, HostError, HvBackupError
from hvbackup.host.document import MAX_PID
from hvbackup.host.fileerrors import file_errors
from hvbackup.host.model import (
    CONSISTENCY_APPLICATION,
    CONSISTENCY_CRASH,
    SNAPSHOT_TYPE_FULL,
    SNAPSHOT_TYPE_RECOVERY,
    Checkpoint,
    CheckpointDisk,
    VmConfig,
    VmState,
    new_id,
)
from hvbackup.host.returns import INVALID_PARAMETER, INVALID_STATE, SYSTEM_IN_USE
from hvbackup.host.vm import Vm
from hvbackup.tracking.sidefiles import remove_side_files

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def boot_id() -> str:
    try:
        with open(BOOT_ID_PATH) as f:
            return f.read().strip()
    except OSError:
        return ""


def create(vm: Vm, *, snapshot_type: int = SNAPSHOT_TYPE_FULL, name: str | None = None,
           consistency_level: int = CONSISTENCY_CRASH, owner_pid: int | None = None) -> Checkpoint:
    """CreateSnapshot: quiesce, seal a tracking point per disk, freeze each active file under a new
    AVHDX, record the configuration. ``owner_pid`` marks a recovery checkpoint as a running backup's."""
    if snapshot_type not in (SNAPSHOT_TYPE_FULL, SNAPSHOT_TYPE_RECOVERY):
        raise HostError(f"snapshot type {snapshot_type} is not 2 (standard) or 32768 (recovery)", INVALID_PARAMETER)
    if name is not None and not isinstance(name, str):
        raise HostError(f"a checkpoint's name is text, not {name!r}", INVALID_PARAMETER)
    if consistency_level not in (CONSISTENCY_APPLICATION, CONSISTENCY_CRASH):
        raise HostError(f"consistency level {consistency_level!r} is not 1 (application) or 2 (crash)",
                        INVALID_PARAMETER)
    if owner_pid is not None and (not isinstance(owner_pid, int) or not 0 < owner_pid <= MAX_PID):
        raise HostError(f"owner_pid {owner_pid!r} is not a process ID", INVALID_PARAMETER)
    with vm.host.lock.held(), vm.quiesced(), file_errors(f"VM {vm.vm_id}: creating a checkpoint"):
        finish_intent(vm)
        document = vm.load()
        config = VmConfig.from_dict(document["config"])
        checkpoint_id = new_id()
        try:
            rct_ids = [tracking.seal(vm.path_of(d.active)) for d in config.disks]
        except DiskBusyError:
            raise HostError(f"VM {config.name}: a disk is in use by another process", SYSTEM_IN_USE) from None
        children = [_child_name(d.active, checkpoint_id) for d in config.disks]
        document["intent"] = {"op": "create_checkpoint", "files": children}
        vm.save(document)
        with _new_files_undone_on_failure(vm):
            for attachment, child in zip(config.disks, children):
                stack.create(vm.path_of(child), type="differencing", parent=vm.path_of(attachment.active)).close()
            checkpoint = Checkpoint(
                instance_id=checkpoint_id,
                name=name or f"{config.name} - ({now()})",
                snapshot_type=snapshot_type,
                created=now(),
                consistency_level=consistency_level,
                state=document["state"],
                config=config.to_dict(),
                disks=[CheckpointDisk(d.instance_id, d.active, rct) for d, rct in zip(config.disks, rct_ids)],
                parent=document.get("current_checkpoint"),
                owner={"pid": owner_pid, "boot_id": boot_id()} if owner_pid else None,
            )
            for attachment, child in zip(config.disks, children):
                document["files"][attachment.instance_id][child] = attachment.active
                attachment.chain.append(child)
            document["config"] = config.to_dict()
            document["checkpoints"].append(checkpoint.to_dict())
            document["current_checkpoint"] = checkpoint_id
            document["intent"] = None
            vm.save(document)
        return checkpoint


@contextlib.contextmanager
def _new_files_undone_on_failure(vm: Vm):
    """Any exception before the new files are recorded removes them and clears the intent, as the
    next open would. If that fails too, the intent stays for the next open to finish."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(HvBackupError, OSError):
            finish_intent(vm)
        raise


def finish_intent(vm: Vm) -> None:
    """Finish or undo what a crash, failure or interruption left half done (the document's intent):
    a checkpoint's new files no record names are deleted (no guest write reached them); the merges
    after a destroy or apply run again (each resumes where it stopped)."""
    with vm.host.lock.held(), file_errors(f"VM {vm.vm_id}: finishing an interrupted operation"):
        document = vm.load()
        intent = document.get("intent")
        if not intent:
            return
        if intent["op"] == "create_checkpoint":
            recorded = {f for files in document["files"].values() for f in files}
            for name in intent["files"]:
                if name not in recorded:
                    remove_disk_file(vm.path_of(name))
            document["intent"] = None
            vm.save(document)
        else:
            collapse(vm)


def _child_name(active: str, checkpoint_id: str) -> str:
    directory, base = os.path.split(active)
    stem = base.rsplit("_", 1)[0] if base.endswith(".avhdx") else os.path.splitext(base)[0]
    return os.path.join(directory, f"{stem}_{checkpoint_id}.avhdx")


def destroy(vm: Vm, checkpoint_id: str) -> None:
    """DestroySnapshot: drop the checkpoint and merge away the files only it needed."""
    with vm.host.lock.held(), file_errors(f"VM {vm.vm_id}: deleting a checkpoint"):
        finish_intent(vm)
        document = vm.load()
        checkpoint = vm.checkpoint(checkpoint_id)
        drop_record(document, checkpoint)
        document["intent"] = {"op": "collapse"}
        vm.save(document)
        collapse(vm)


def drop_record(document: dict, checkpoint: Checkpoint) -> None:
    """Forget the checkpoint in ``document``: its children follow its parent. The caller records a
    ``collapse`` intent in the same save, since the checkpoint's files may no longer be needed."""
    document["checkpoints"] = [c for c in document["checkpoints"] if c["instance_id"] != checkpoint.instance_id]
    for other in document["checkpoints"]:
        if other.get("parent") == checkpoint.instance_id:
            other["parent"] = checkpoint.parent
    if document.get("current_checkpoint") == checkpoint.instance_id:
        document["current_checkpoint"] = checkpoint.parent


def apply(vm: Vm, checkpoint_id: str) -> None:
    """ApplySnapshot: the VM continues from the checkpoint (its configuration and state, its disks
    through new AVHDX files on the frozen ones); what was written since is discarded."""
    with vm.host.lock.held(), vm.quiesced(), file_errors(f"VM {vm.vm_id}: applying a checkpoint"):
        finish_intent(vm)
        document = vm.load()
        checkpoint = vm.checkpoint(checkpoint_id)
        config = VmConfig.from_dict(checkpoint.config)
        branch_id = new_id()
        children = [_child_name(d.frozen, branch_id) for d in checkpoint.disks]
        document["intent"] = {"op": "create_checkpoint", "files": children}
        vm.save(document)
        with _new_files_undone_on_failure(vm):
            frozen = {d.instance_id: d.frozen for d in checkpoint.disks}
            for attachment, child in zip(config.disks, children):
                parent = frozen[attachment.instance_id]
                stack.create(vm.path_of(child), type="differencing", parent=vm.path_of(parent)).close()
                document["files"][attachment.instance_id][child] = parent
                attachment.chain = _chain_to(document["files"][attachment.instance_id], child)
            document["config"] = config.to_dict()
            document["state"] = checkpoint.state if checkpoint.state != VmState.RUNNING else int(VmState.SAVED)
            document["current_checkpoint"] = checkpoint.instance_id
            document["intent"] = {"op": "collapse"}
            vm.save(document)
        collapse(vm)


def _chain_to(files: dict[str, str | None], leaf: str) -> list[str]:
    chain = [leaf]
    while files[chain[-1]] is not None:
        chain.append(files[chain[-1]])
    return chain[::-1]


def collapse(vm: Vm) -> None:
    """Delete files nothing needs and merge a file nothing but its one child needs into that child's
    place, until neither applies; then clear the intent. Safe to run again after a crash."""
    with vm.host.lock.held(), vm.quiesced(), file_errors(f"VM {vm.vm_id}: merging checkpoint files"):
        while _collapse_one(vm):
            pass
        document = vm.load()
        document["intent"] = None
        vm.save(document)


def _collapse_one(vm: Vm) -> bool:
    document = vm.load()
    config = VmConfig.from_dict(document["config"])
    for attachment in config.disks:
        files: dict[str, str | None] = document["files"][attachment.instance_id]
        frozen = (d["frozen"] for c in document["checkpoints"] for d in c["disks"])
        needed = {attachment.active, *frozen}
        for name in list(files):
            if name in needed:
                continue
            kids = [f for f, p in files.items() if p == name]
            if not kids:
                remove_disk_file(vm.path_of(name))
                del files[name]
                vm.save(document)
                return True
            if len(kids) == 1:
                _merge_down(vm, document, attachment.instance_id, name, kids[0])
                return True
    return False


def _merge_down(vm: Vm, document: dict, instance_id: str, parent: str, child: str) -> None:
    """Fold ``child`` into ``parent`` (which nothing else needs); ``parent`` takes the child's place."""
    files = document["files"][instance_id]
    grandchildren = [f for f, p in files.items() if p == child]
    if os.path.exists(vm.path_of(child)):
        stack.merge(vm.path_of(child), children=[vm.path_of(g) for g in grandchildren])
    for g in grandchildren:
        files[g] = parent
    del files[child]
    for c in document["checkpoints"]:
        for d in c["disks"]:
            if d["instance_id"] == instance_id and d["frozen"] == child:
                d["frozen"] = parent
    for attachment in document["config"]["disks"]:
        if attachment["instance_id"] == instance_id:
            attachment["chain"] = _chain_to(files, parent if attachment["chain"][-1] == child
                                            else attachment["chain"][-1])
    vm.save(document)


def remove_disk_file(path: str) -> None:
    """A disk file nothing needs, with its change tracking side files."""
    if os.path.exists(path):
        os.unlink(path)
    remove_side_files(path)


def require_recovery(checkpoint: Checkpoint) -> None:
    if checkpoint.snapshot_type != SNAPSHOT_TYPE_RECOVERY:
        raise HostError(f"checkpoint {checkpoint.instance_id} is not a recovery checkpoint", INVALID_STATE)
