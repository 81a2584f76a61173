"""One VM of a host: its document (configuration, state, checkpoints, reference points, intent),
its files, and the guest's view of its disks.

A ``Vm`` object is shared by every caller in a process (``Host.vm`` returns the same one), so its
``io_lock`` serialises guest I/O with the operations that must see the disks still: creating a
checkpoint or merging one away closes the disks under that lock and reopens them after.

The document is checked whenever it is read or written (``document.py``): a damaged one is a
HostError naming the file, never a KeyError. ``DamagedVm`` is what the host lists in its place.

A VM knows its host only as a ``VmRegistry``: the host (``host.Host``) sits above the modules that
work on VMs, so they name what they use of it rather than import it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from hvbackup import stack
from hvbackup.disks.device import BlockDevice, Extent
from hvbackup.disks.filter import Filter
from hvbackup.errors import DiskBusyError, HostError
from hvbackup.host import store
from hvbackup.host.document import DocumentProblem, check_vm_document
from hvbackup.host.fileerrors import file_errors
from hvbackup.host.model import Checkpoint, ReferencePoint, VmConfig, VmState, check_vm_name
from hvbackup.host.returns import FAILED, INVALID_PARAMETER, INVALID_STATE, SYSTEM_IN_USE

DISK_DIRECTORY = "Virtual Hard Disks"
EXCLUSIVE_FILE = "exclusive.lock"
EXCLUSIVE_POLL = 0.1  # seconds between attempts while waiting for another holder


@dataclass
class DamagedVm:
    """A VM directory whose document cannot be used (unreadable, wrong shape, missing). The host
    lists it, leaves it alone and works with its other VMs; the user may repair it by hand."""

    vm_id: str
    directory: str
    problem: str

    def to_dict(self) -> dict:
        return {"id": self.vm_id, "directory": self.directory, "problem": self.problem}


class VmRegistry(Protocol):
    """What a VM, and the operations on it, use of the host it belongs to: its directory, the lock
    that serialises metadata changes, and its VMs (``Vm`` objects are shared: one per VM and host)."""

    directory: str
    lock: store.HostLock

    @property
    def vms_directory(self) -> str: ...

    def inventory(self) -> list[Vm | DamagedVm]: ...

    def vms(self) -> list[Vm]: ...


class Vm:
    def __init__(self, host: VmRegistry, vm_id: str):
        self.host, self.vm_id = host, vm_id
        self.directory = os.path.join(host.vms_directory, vm_id)
        self.document_path = os.path.join(self.directory, "vm.json")
        self.io_lock = threading.RLock()
        self._devices: dict[int, BlockDevice] = {}

    # -- the document ----------------------------------------------------------------------------

    def load(self) -> dict:
        document = store.read_document(self.document_path)
        try:
            check_vm_document(document)
        except DocumentProblem as exc:
            raise HostError(f"{self.document_path}: damaged VM document: {exc}") from None
        return document

    def save(self, document: dict) -> None:
        try:
            check_vm_document(document)
        except DocumentProblem as exc:  # a defect: never write what the next read would call damaged
            raise HostError(f"{self.document_path}: refusing to write a damaged VM document: {exc}",
                            FAILED) from None
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
        if isinstance(checkpoint_id, str):
            for c in self.checkpoints():
                if c.instance_id.lower() == checkpoint_id.lower() or c.name == checkpoint_id:
                    return c
        raise HostError(f"VM {self.name} has no checkpoint {checkpoint_id}", INVALID_PARAMETER)

    def reference_points(self) -> list[ReferencePoint]:
        return [ReferencePoint.from_dict(r) for r in self.load()["reference_points"]]

    def reference_point(self, instance_id: str) -> ReferencePoint:
        if isinstance(instance_id, str):
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

    def rename(self, name: str) -> None:
        """ModifySystemSettings(ElementName): a new name, checked as every VM name is and unique on
        the host. The disk files keep their names, as on Hyper-V."""
        check_vm_name(name)
        with self.host.lock.held():
            if any(vm.name == name for vm in self.host.vms() if vm.vm_id != self.vm_id):
                raise HostError(f"the host already has a VM named {name!r}", INVALID_PARAMETER)
            document = self.load()
            document["config"]["name"] = name
            self.save(document)

    # -- one long operation at a time -------------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, purpose: str, *, timeout: float | None = 0) -> Iterator[None]:
        """Hold the VM for one long operation (a backup, a restore over it), across processes: a
        flock on ``exclusive.lock`` in the VM directory, which records the holder's pid, purpose
        and start time. ``purpose`` follows "is being" ("backed up"). Another holder makes it fail at
        once with HostError 32774 naming that holder; ``timeout`` seconds (None: no limit) waits for
        it instead. Not re-entrant. Take it before, never while holding, the host lock, which the
        holder itself takes briefly for each metadata change."""
        if timeout != 0 and self.host.lock.owned():
            raise HostError(f"VM {self.vm_id}: waiting for the VM while holding the host lock could deadlock",
                            INVALID_STATE)
        path = os.path.join(self.directory, EXCLUSIVE_FILE)
        with file_errors(f"VM {self.vm_id}: taking the VM for one operation"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._take_exclusive(fd, path, purpose, timeout)
            record = {"pid": os.getpid(), "purpose": purpose,
                      "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            with file_errors(f"VM {self.vm_id}: recording who holds the VM"):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # a waiter must not take a past holder for the present one
        finally:
            os.close(fd)

    def _take_exclusive(self, fd: int, path: str, purpose: str, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise HostError(self._busy(fd), SYSTEM_IN_USE) from None
                time.sleep(EXCLUSIVE_POLL if deadline is None else
                           max(0.0, min(EXCLUSIVE_POLL, deadline - time.monotonic())))

    def _busy(self, fd: int) -> str:
        try:
            name = self.name
        except HostError:
            name = self.vm_id
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            return (f"VM {name} is already being {holder['purpose']} by process {holder['pid']} "
                    f"since {holder['since']}")
        except (OSError, ValueError, TypeError, KeyError):  # the holder has not recorded itself yet
            return f"VM {name} is already held by another operation"

    # -- state changes (Msvm_ComputerSystem.RequestStateChange) -----------------------------------

    _TRANSITIONS = {
        "start": ({VmState.OFF, VmState.SAVED, VmState.PAUSED}, VmState.RUNNING),
        "stop": ({VmState.RUNNING, VmState.PAUSED, VmState.SAVED}, VmState.OFF),
        "save": ({VmState.RUNNING, VmState.PAUSED}, VmState.SAVED),
        "pause": ({VmState.RUNNING}, VmState.PAUSED),
    }

    def request_state_change(self, action: str) -> VmState:
        if not isinstance(action, str) or action not in self._TRANSITIONS:
            raise HostError(f"{action!r} is not one of {', '.join(self._TRANSITIONS)}", INVALID_PARAMETER)
        allowed, target = self._TRANSITIONS[action]
        with self.host.lock.held(), self.io_lock, file_errors(f"VM {self.vm_id}: changing its state"):
            document = self.load()
            current = VmState(document["state"])
            if current not in allowed:
                raise HostError(f"VM {self.name} is {current.name.title()}; cannot {action} it", INVALID_STATE)
            self.close_disks()
            runtime = self.path_of("runtime-state.vmrs")
            document["state"] = int(target)
            if target == VmState.SAVED:
                # The saved state holds what a running VM keeps in memory; here: when it was saved. It
                # is written first, and goes again if recording the state fails or is interrupted.
                store.write_document(runtime, {"saved_from": current.name, "vm_id": self.vm_id})
                try:
                    self.save(document)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(runtime)
                    raise
            else:
                self.save(document)
                if target != VmState.PAUSED and os.path.exists(runtime):
                    os.unlink(runtime)  # once the state is recorded: a stray one goes at the next change
            return target

    # -- guest I/O -------------------------------------------------------------------------------

    def disk(self, index: int) -> GuestDisk:
        disks_ = self.config.disks
        if not isinstance(index, int) or not 0 <= index < len(disks_):
            count = f"{len(disks_)} disk" + ("" if len(disks_) == 1 else "s")
            raise HostError(f"VM {self.name} has {count}; there is no disk {index}", INVALID_PARAMETER)
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
                with file_errors(f"VM {config.name}: opening disk {index}"):
                    device = stack.open(self.path_of(config.disks[index].active))
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


class GuestDisk(Filter):
    """What the guest sees of one disk: a filter over the disk's active file (itself behind the
    change tracking filter), serialised with the VM's checkpoint operations. It stays valid across
    checkpoints: ``next`` is the file active at the moment of each call, every I/O call runs under the
    VM's I/O lock, and what the disk is comes from that file. Closing it releases nothing; the VM
    owns the open files."""

    def __init__(self, vm: Vm, index: int):
        # No fixed next layer (Filter.__init__): ``next`` is looked up at every call.
        self.vm, self.index = vm, index
        with vm.io_lock:
            vm._device(index)  # a VM that is not running has no disks to reach: fail here, as attaching would

    @property
    def next(self) -> BlockDevice:
        with self.vm.io_lock:
            return self.vm._device(self.index)

    @property
    def path(self) -> str:
        return f"{self.vm.name}:disk{self.index}"

    def readinto(self, offset: int, buffer) -> None:
        with self.vm.io_lock:
            super().readinto(offset, buffer)

    def read(self, offset: int, length: int) -> bytes:
        with self.vm.io_lock:
            return super().read(offset, length)

    def write(self, offset: int, data) -> None:
        with self.vm.io_lock:
            super().write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        with self.vm.io_lock:
            super().trim(offset, length)

    def flush(self) -> None:
        with self.vm.io_lock:
            super().flush()

    def start_flush(self) -> None:
        with self.vm.io_lock:
            super().start_flush()

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        with self.vm.io_lock:  # all of them now: a checkpoint may close the file once the lock is let go
            return iter(list(super().extents(offset, length)))

    def info(self) -> dict:
        with self.vm.io_lock:
            return super().info()

    def close(self) -> None:
        """The VM's files stay open: the VM closes them when it stops or takes a checkpoint."""
