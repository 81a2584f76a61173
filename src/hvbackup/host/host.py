"""The virtualization host: a directory of VMs whose disks are tracked VHDX files."""

from __future__ import annotations

import os
import shutil
import threading
from typing import Callable

from hvbackup import disks, tracking
from hvbackup.disks.fileio import sync_directory
from hvbackup.errors import HostError
from hvbackup.host import store
from hvbackup.host.model import DiskAttachment, VmConfig, disk_instance_id, new_id, new_vm_document
from hvbackup.host.vm import DISK_DIRECTORY, INVALID_PARAMETER, Vm

MiB = 1 << 20


class Host:
    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.lock = store.HostLock(os.path.join(self.directory, "host.lock"))
        self._vms: dict[str, Vm] = {}
        self._vms_lock = threading.Lock()

    @classmethod
    def init(cls, directory: str) -> Host:
        """Make ``directory`` a host (it may exist, but must not be a host already)."""
        host_file = os.path.join(directory, "host.json")
        if os.path.exists(host_file):
            raise HostError(f"{directory} is already a host")
        os.makedirs(os.path.join(directory, "vms"), exist_ok=True)
        store.write_document(host_file, {"host_id": new_id()})
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str) -> Host:
        """Open a host; operations a crash interrupted are finished or undone first."""
        host = cls(directory)
        store.read_document(os.path.join(host.directory, "host.json"))
        from hvbackup.host.recovery import recover_all  # recovery uses the checkpoint machinery

        recover_all(host)
        return host

    # -- VMs -------------------------------------------------------------------------------------

    def vm_ids(self) -> list[str]:
        root = os.path.join(self.directory, "vms")
        # A ".partial" directory is a VM still being built (or one a crash interrupted).
        return sorted(d for d in os.listdir(root)
                      if not d.endswith(".partial") and os.path.exists(os.path.join(root, d, "vm.json")))

    def vms(self) -> list[Vm]:
        return [self._vm(vm_id) for vm_id in self.vm_ids()]

    def vm(self, name_or_id: str) -> Vm:
        for vm_id in self.vm_ids():
            vm = self._vm(vm_id)
            if vm_id.lower() == name_or_id.lower() or vm.name == name_or_id:
                return vm
        raise HostError(f"the host has no VM {name_or_id!r}", INVALID_PARAMETER)

    def _vm(self, vm_id: str) -> Vm:
        with self._vms_lock:
            if vm_id not in self._vms:
                self._vms[vm_id] = Vm(self, vm_id)
            return self._vms[vm_id]

    def create_vm(self, name: str, disk_sizes: list[int], *, processors: int = 1, memory_mb: int = 1024,
                  notes: str = "", vm_id: str | None = None, block_size: int | None = None) -> Vm:
        """A new VM (Off) with one dynamic, tracked VHDX per size in ``disk_sizes``."""
        if not name or any(vm.name == name for vm in self.vms()):
            raise HostError(f"a VM needs a name no other VM of the host has ({name!r})", INVALID_PARAMETER)
        vm_id = vm_id or new_id()

        def build(staging: str) -> VmConfig:
            attachments = []
            for index, size in enumerate(disk_sizes):
                relative = os.path.join(DISK_DIRECTORY, f"{name}_disk{index}.vhdx")
                disks.create(os.path.join(staging, relative), size, block_size=block_size).close()
                tracking.enable(os.path.join(staging, relative))
                attachments.append(DiskAttachment(disk_instance_id(vm_id, index), [relative], 0, index))
            return VmConfig(vm_id, name, processors, memory_mb, notes, attachments)

        return self.add_vm(vm_id, build)

    def add_vm(self, vm_id: str, build: Callable[[str], VmConfig]) -> Vm:
        """Make a VM in a staging directory, ``build(staging)`` putting its tracked disks there and
        returning its configuration, then move it in place with one rename: a crash never leaves
        half a VM (an abandoned staging directory is removed when the host opens)."""
        with self.lock.held():
            directory = os.path.join(self.directory, "vms", vm_id)
            staging = directory + ".partial"
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(os.path.join(staging, DISK_DIRECTORY))
            try:
                config = build(staging)
                store.write_document(os.path.join(staging, "vm.json"), new_vm_document(config))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            # The side files name their disk by path: the directory moves, not the files in it.
            os.rename(staging, directory)
            sync_directory(os.path.dirname(directory))
            return self._vm(vm_id)
