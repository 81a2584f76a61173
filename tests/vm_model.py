"""One model of what a VM's disks hold, shared by the tests of every layer above the host: each
write and trim goes to the running VM through guest I/O and to an in-memory copy, so any later view
of the disks (a checkpoint, an export, a restore) is checked against what the guest wrote."""

from __future__ import annotations

import hashlib

from hvbackup.host import Host


class GuestModel:
    def __init__(self, vm, sizes: list[int]):
        self.vm = vm
        self.disks = [bytearray(size) for size in sizes]

    @classmethod
    def create(cls, host: Host, sizes: list[int], name: str = "web", **options) -> "GuestModel":
        vm = host.create_vm(name, list(sizes), **options)
        vm.request_state_change("start")
        return cls(vm, sizes)

    def write(self, index: int, offset: int, data: bytes, *, release: bool = False) -> None:
        """Write as the guest; ``release`` lets go of the disk files afterwards, for commands that
        open the host in another process."""
        self.vm.disk(index).write(offset, data)
        self.disks[index][offset:offset + len(data)] = data
        if release:
            self.vm.close_disks()

    def trim(self, index: int, offset: int, length: int) -> None:
        self.vm.disk(index).trim(offset, length)
        self.disks[index][offset:offset + length] = bytes(length)

    def snapshot(self) -> list[bytes]:
        """What the disks hold now, to compare with a point taken now."""
        return [bytes(disk) for disk in self.disks]

    def digests(self) -> list[str]:
        return [hashlib.sha256(disk).hexdigest() for disk in self.disks]
