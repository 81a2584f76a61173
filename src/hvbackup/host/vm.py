"""One VM of a host: its document (configuration, state, checkpoints, reference points, intent),
its files, and the guest's view of its disks.

A ``Vm`` object is shared by every caller in a process (``Host.vm`` returns the same one), so its
``io_lock`` serialises guest I/O with the operations that must see the disks still: creating a
checkpoint or merging one away closes the disks under that lock and reopens them after.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING, Iterator

from hvbackup import disks
from hvbackup.disks.device import BlockDevice
from hvbackup.errors import DiskBusyError, HostError
from hvbackup.host import store
from hvbackup.host.model import Checkpoint, ReferencePoint, VmConfig, VmState

if TYPE_CHECKING:
    from hvbackup.host.host import Host

INVALID_STATE = 32775
SYSTEM_IN_USE = 32774
INVALID_PARAMETER = 32773
DISK_DIRECTORY = "Virtual Hard Disks"


class Vm:
    def __init__(self, host: Host, vm_id: str):
        self.host, self.vm_id = host, vm_id
        self.directory = os.path.join(host.directory, "vms", vm_id)
        self.document_path = os.path.join(self.directory, "vm.json")
        self.io_lock = threading.RLock()
        self._devices: dict[int, BlockDevice] = {}

    # -- the document ----------------------------------------------------------------------------

    def load(self) -> dict:
        return store.read_document(self.document_path)

    def save(self, document: dict) -> None:
        store.write_document(self.document_path, document)

    @property
    def config(self) -> VmConfig:
        return VmConfig.from_dict(self.load()["config"])

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> VmState:
        return VmState(self.load()["state"])

    def checkpoints(self) -> list[Checkpoint]:
        return [Checkpoint.from_dict(c) for c in self.load()["checkpoints"]]

    def checkpoint(self, checkpoint_id: str) -> Checkpoint:
        for c in self.checkpoints():
            if c.instance_id.lower() == checkpoint_id.lower() or c.name == checkpoint_id:
                return c
        raise HostError(f"VM {self.name} has no checkpoint {checkpoint_id}", INVALID_PARAMETER)

    def reference_points(self) -> list[ReferencePoint]:
        return [ReferencePoint.from_dict(r) for r in self.load()["reference_points"]]

    def reference_point(self, instance_id: str) -> ReferencePoint:
        for r in self.reference_points():
            if r.instance_id.lower() == instance_id.lower():
                return r
        raise HostError(f"VM {self.name} has no reference point {instance_id}", INVALID_PARAMETER)

    def path_of(self, relative: str) -> str:
        return os.path.join(self.directory, relative)

    def summary(self) -> dict:
        document = self.load()
        config = VmConfig.from_dict(document["config"])
        return {
            "id": self.vm_id, "name": config.name, "state": VmState(document["state"]).name.title(),
            "enabled_state": document["state"], "processors": config.processors, "memory_mb": config.memory_mb,
            "notes": config.notes, "disks": [self.path_of(d.active) for d in config.disks],
            "checkpoints": len(document["checkpoints"]), "reference_points": len(document["reference_points"]),
        }

    # -- state changes (Msvm_ComputerSystem.RequestStateChange) -----------------------------------

    _TRANSITIONS = {
        "start": ({VmState.OFF, VmState.SAVED, VmState.PAUSED}, VmState.RUNNING),
        "stop": ({VmState.RUNNING, VmState.PAUSED, VmState.SAVED}, VmState.OFF),
        "save": ({VmState.RUNNING, VmState.PAUSED}, VmState.SAVED),
        "pause": ({VmState.RUNNING}, VmState.PAUSED),
    }

    def request_state_change(self, action: str) -> VmState:
        allowed, target = self._TRANSITIONS[action]
        with self.host.lock.held(), self.io_lock:
            document = self.load()
            current = VmState(document["state"])
            if current not in allowed:
                raise HostError(f"VM {self.name} is {current.name.title()}; cannot {action} it", INVALID_STATE)
            self.close_disks()
            runtime = self.path_of("runtime-state.vmrs")
            if target == VmState.SAVED:
                # The saved state holds what a running VM keeps in memory; here: when it was saved.
                store.write_document(runtime, {"saved_from": current.name, "vm_id": self.vm_id})
            elif os.path.exists(runtime) and target != VmState.PAUSED:
                os.unlink(runtime)
            document["state"] = int(target)
            self.save(document)
            return target

    # -- guest I/O -------------------------------------------------------------------------------

    def disk(self, index: int) -> GuestDisk:
        disks_ = self.config.disks
        if not 0 <= index < len(disks_):
            raise HostError(f"VM {self.name} has {len(disks_)} disks; there is no disk {index}", INVALID_PARAMETER)
        return GuestDisk(self, index)

    def _device(self, index: int) -> BlockDevice:
        device = self._devices.get(index)
        if device is None:
            document = self.load()
            config, state = VmConfig.from_dict(document["config"]), VmState(document["state"])
            if state not in (VmState.RUNNING, VmState.PAUSED):
                raise HostError(f"VM {config.name} is {state.name.title()}; start it to reach its disks",
                                INVALID_STATE)
            try:
                device = disks.open(self.path_of(config.disks[index].active))
            except DiskBusyError:
                raise HostError(f"VM {config.name}: disk {index} is in use by another process",
                                SYSTEM_IN_USE) from None
            self._devices[index] = device
        return device

    def close_disks(self) -> None:
        """Flush and close the open disks (a tracked disk seals a point if it was written)."""
        with self.io_lock:
            devices, self._devices = self._devices, {}
            for device in devices.values():
                device.close()

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Guest I/O waits while the block runs; the disks are closed, so their files can change."""
        with self.io_lock:
            self.close_disks()
            yield


class GuestDisk(BlockDevice):
    """What the guest sees of one disk: a filter over the disk's active file (itself the change
    tracking filter over the VHDX), serialised with the VM's checkpoint operations. It stays valid
    across checkpoints: every call reaches the file that is active at that moment. Closing it
    releases nothing; the VM owns the open files."""

    def __init__(self, vm: Vm, index: int):
        self.vm, self.index = vm, index
        self.path = f"{vm.name}:disk{index}"
        self.read_only = False
        self.closed = False
        with vm.io_lock:
            device = vm._device(index)
            for name in ("size", "block_size", "logical_sector_size", "physical_sector_size", "format",
                         "disk_type", "disk_id"):
                setattr(self, name, getattr(device, name))

    def readinto(self, offset: int, buffer) -> None:
        with self.vm.io_lock:
            self.vm._device(self.index).readinto(offset, buffer)

    def write(self, offset: int, data) -> None:
        with self.vm.io_lock:
            self.vm._device(self.index).write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        with self.vm.io_lock:
            self.vm._device(self.index).trim(offset, length)

    def _write(self, offset: int, data: memoryview) -> None:
        self.write(offset, data)

    def _trim(self, offset: int, length: int) -> None:
        self.trim(offset, length)

    def flush(self) -> None:
        with self.vm.io_lock:
            self.vm._device(self.index).flush()

    def _extents(self, start: int, end: int):
        with self.vm.io_lock:
            return list(self.vm._device(self.index).extents(start, end - start))

    def _close(self) -> None:
        pass
