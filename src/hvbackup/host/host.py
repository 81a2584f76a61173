"""The virtualization host: a directory of VMs whose disks are tracked VHDX files, and the registry
of their ``Vm`` objects (one per VM, shared by every caller in the process).

The modules that work on VMs (``vm``, ``checkpoints``, ``refpoints``, ``recovery``) sit below this
one and see the host as a ``vm.VmRegistry``; opening a host runs ``recovery.recover_all`` first.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Callable, Iterator

from hvbackup import durable, stack, tracking
from hvbackup.errors import HostError
from hvbackup.host import store
from hvbackup.host.document import DocumentProblem, check_vm_document
from hvbackup.host.fileerrors import file_errors
from hvbackup.host.model import (
    DiskAttachment,
    VmConfig,
    check_vm_id,
    check_vm_name,
    disk_instance_id,
    new_id,
    new_vm_document,
)
from hvbackup.host.recovery import recover_all
from hvbackup.host.returns import INVALID_PARAMETER
from hvbackup.host.store import STAGING_SUFFIX
from hvbackup.host.vm import DISK_DIRECTORY, DamagedVm, Vm


class Host:
    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.lock = store.host_lock(self.directory)
        self._vms: dict[str, Vm] = {}
        self._vms_lock = threading.Lock()

    @classmethod
    def init(cls, directory: str) -> Host:
        """Make ``directory`` a host (it may exist, but must not be a host already)."""
        host_file = os.path.join(directory, "host.json")
        if os.path.exists(host_file):
            raise HostError(f"{directory} is already a host", INVALID_PARAMETER)
        with file_errors(f"making {directory} a host"):
            os.makedirs(os.path.join(directory, "vms"), exist_ok=True)
        store.write_document(host_file, {"host_id": new_id()})
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str) -> Host:
        """Open a host; operations a crash interrupted are finished or undone first (VMs whose
        document is damaged are left as they are: ``inventory`` lists them)."""
        host = cls(directory)
        store.read_document(os.path.join(host.directory, "host.json"))
        if not os.path.isdir(host.vms_directory):
            raise HostError(f"{host.vms_directory}: missing; the host directory is damaged")
        recover_all(host)
        return host

    # -- VMs -------------------------------------------------------------------------------------

    @property
    def vms_directory(self) -> str:
        return os.path.join(self.directory, "vms")

    def vm_ids(self) -> list[str]:
        """The IDs of every VM directory, damaged ones included."""
        with file_errors("listing the host's VMs"):
            entries = os.listdir(self.vms_directory)
        # A ".partial" directory is a VM still being built (or one a crash interrupted).
        return sorted(e for e in entries if not e.endswith(STAGING_SUFFIX) and not e.startswith(".")
                      and os.path.isdir(os.path.join(self.vms_directory, e)))

    def inventory(self) -> list[Vm | DamagedVm]:
        """Every VM directory, in ID order: a ``Vm`` for each sound document, a ``DamagedVm``
        (ID, directory, problem) for each one that cannot be read or has the wrong shape."""
        return list(self._entries())

    def _entries(self) -> Iterator[Vm | DamagedVm]:
        for vm_id in self.vm_ids():
            vm = self._vm(vm_id)
            try:
                vm.load()
            except HostError as exc:
                yield DamagedVm(vm_id, vm.directory, str(exc))
            else:
                yield vm

    def vms(self) -> list[Vm]:
        """The VMs whose documents are sound (``inventory`` also lists the damaged ones)."""
        return [entry for entry in self.inventory() if isinstance(entry, Vm)]

    def vm(self, name_or_id: str) -> Vm:
        """The VM with this ID or name. A damaged document does not stop a lookup of another VM;
        asking for the damaged one by its ID says what is wrong with it."""
        damaged = []
        if isinstance(name_or_id, str):
            for entry in self._entries():
                if entry.vm_id.lower() == name_or_id.lower():
                    if isinstance(entry, DamagedVm):
                        raise HostError(f"VM {entry.vm_id}: its document is damaged: {entry.problem}")
                    return entry
                if isinstance(entry, DamagedVm):
                    damaged.append(entry.vm_id)
                elif entry.name == name_or_id:
                    return entry
        unknown = f"the host has no VM {name_or_id!r}"
        if damaged:
            unknown += f" (the documents of {', '.join(damaged)} are damaged; it may be one of them)"
        raise HostError(unknown, INVALID_PARAMETER)

    def _vm(self, vm_id: str) -> Vm:
        with self._vms_lock:
            if vm_id not in self._vms:
                self._vms[vm_id] = Vm(self, vm_id)
            return self._vms[vm_id]

    def create_vm(self, name: str, disk_sizes: list[int], *, processors: int = 1, memory_mb: int = 1024,
                  notes: str = "", vm_id: str | None = None, block_size: int | None = None) -> Vm:
        """A new VM (Off) with one dynamic, tracked VHDX per size in ``disk_sizes``."""
        check_vm_name(name)
        vm_id = check_vm_id(vm_id) if vm_id is not None else new_id()
        for value, what in ((processors, "processors"), (memory_mb, "memory_mb")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HostError(f"{what} must be a whole number of at least 1, not {value!r}", INVALID_PARAMETER)
        if not isinstance(notes, str):
            raise HostError("notes must be text", INVALID_PARAMETER)
        if not isinstance(disk_sizes, (list, tuple)) or not all(
                isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in disk_sizes):
            raise HostError(f"disk sizes must be positive byte counts, not {disk_sizes!r}", INVALID_PARAMETER)

        def build(staging: str) -> VmConfig:
            attachments = []
            for index, size in enumerate(disk_sizes):
                relative = os.path.join(DISK_DIRECTORY, f"{name}_disk{index}.vhdx")
                stack.create(os.path.join(staging, relative), size, block_size=block_size).close()
                tracking.enable(os.path.join(staging, relative))
                attachments.append(DiskAttachment(disk_instance_id(vm_id, index), [relative], 0, index))
            return VmConfig(vm_id, name, processors, memory_mb, notes, attachments)

        with self.lock.held():
            if any(vm.name == name for vm in self.vms()):
                raise HostError(f"the host already has a VM named {name!r}", INVALID_PARAMETER)
            return self.add_vm(vm_id, build, name=name)

    def add_vm(self, vm_id: str, build: Callable[[str], VmConfig], *, name: str) -> Vm:
        """Make the VM ``vm_id`` named ``name`` in a staging directory, ``build(staging)`` putting
        its tracked disks there and returning its configuration, then move it in place with one
        rename: a crash never leaves half a VM (an abandoned staging directory is removed when the
        host opens), and a failure or an interruption leaves nothing. The ID and the name are
        checked before any file is made (HostError 32773)."""
        vm_id, name = check_vm_id(vm_id), check_vm_name(name)
        with self.lock.held(), file_errors(f"adding VM {name} ({vm_id}) to {self.directory}"):
            directory = os.path.join(self.vms_directory, vm_id)
            if os.path.lexists(directory):
                raise HostError(f"the host already has a VM directory {directory}", INVALID_PARAMETER)
            staging = directory + STAGING_SUFFIX
            shutil.rmtree(staging, ignore_errors=True)
            try:
                os.makedirs(os.path.join(staging, DISK_DIRECTORY))
                config = build(staging)
                document = new_vm_document(config)
                _check_new(document, vm_id, name)
                store.write_document(os.path.join(staging, "vm.json"), document)
                # The side files name their disk by path: the directory moves, not the files in it.
                os.rename(staging, directory)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            durable.sync_directory(self.vms_directory)
            return self._vm(vm_id)


def _check_new(document: dict, vm_id: str, name: str) -> None:
    """What ``build`` returned must be the VM asked for, in a document the host can read back."""
    config = document["config"]
    if str(config.get("vm_id")).upper() != vm_id or config.get("name") != name:
        raise HostError(f"the VM built is {config.get('name')!r} ({config.get('vm_id')}), not {name!r} ({vm_id})",
                        INVALID_PARAMETER)
    try:
        check_vm_document(document)
    except DocumentProblem as exc:
        raise HostError(f"VM {name}: invalid configuration: {exc}", INVALID_PARAMETER) from None
