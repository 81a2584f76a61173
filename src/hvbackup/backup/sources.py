"""Where a backup reads a checkpoint's disks from: the two ways a Hyper-V backup application has.

``VirtDiskSource`` (``--method virtdisk``) opens each frozen disk file of the recovery checkpoint with
OpenVirtualDisk (read-only), asks QueryChangesVirtualDisk for the ranges written since the base's RCT
ID, and reads those ranges itself: local, nothing copied first.

``ExportSource`` (``--method export``) has the host do the reading: ExportSystemDefinition of the
checkpoint into a staging directory — in full, or, given the base reference point, a differencing
VHDX of the changes on top of the base's export — and the backup reads the exported files. The
differencing disk's own blocks are the change list. Afterwards the staged differential is folded into
its parent, so the staging directory keeps one full set per VM: the parent the next differential needs
(Hyper-V writes a differential's parent locator to the previous export's disks).

Both say, per disk, which chunks hold data (``data_chunks``) or changed since the base
(``changed_chunks``), and read whole chunks of the disk as it was at the checkpoint: the same content,
so the same restore point, whichever way it was read.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Iterable

from hvbackup import stack, virtdisk
from hvbackup.disks.device import BlockDevice, Extent, ExtentState
from hvbackup.errors import HostError, HvBackupError, NeedsFull, VirtDiskError
from hvbackup.host.changes import INVALID_STATE
from hvbackup.host.export import export_system_definition
from hvbackup.host.model import Checkpoint, ExportSettings, ReferencePoint
from hvbackup.host.vm import Vm


def chunks_of(extents: Iterable[Extent], chunk_size: int) -> list[int]:
    """The indices of the chunks the DATA extents touch, sorted."""
    found: set[int] = set()
    for ext in extents:
        if ext.state == ExtentState.DATA and ext.length:
            found.update(range(ext.offset // chunk_size, (ext.end - 1) // chunk_size + 1))
    return sorted(found)


def ranges_to_chunks(ranges: Iterable[tuple[int, int]], chunk_size: int) -> list[int]:
    return chunks_of((Extent(o, n, ExtentState.DATA) for o, n in ranges), chunk_size)


def geometry_of(device: BlockDevice) -> dict:
    return {"virtual_size": device.size, "block_size": device.block_size,
            "logical_sector_size": device.logical_sector_size, "physical_sector_size": device.physical_sector_size}


class DiskReader:
    """One disk of the checkpoint, open for reading whole chunks."""

    def __init__(self, device: BlockDevice):
        self.device = device
        self.geometry = geometry_of(device)

    def read(self, offset: int, length: int) -> bytes:
        return self.device.read(offset, length)

    def data_chunks(self, chunk_size: int) -> list[int]:
        return chunks_of(self.device.extents(), chunk_size)

    def changed_chunks(self, chunk_size: int) -> list[int]:
        raise NotImplementedError

    def close(self) -> None:
        self.device.close()


class _VirtDiskReader(DiskReader):
    def __init__(self, handle: virtdisk.VirtualDiskHandle, base_rct_id: str | None):
        super().__init__(handle.device)
        self.handle, self.base_rct_id = handle, base_rct_id

    def read(self, offset: int, length: int) -> bytes:
        return virtdisk.read_virtual_disk(self.handle, offset, length)

    def changed_chunks(self, chunk_size: int) -> list[int]:
        """QueryChangesVirtualDisk over the whole disk, continuing at ProcessedLength."""
        ranges, offset, size = [], 0, self.device.size
        try:
            while offset < size:
                found, processed = virtdisk.query_changes_virtual_disk(self.handle, self.base_rct_id, offset,
                                                                       size - offset)
                ranges.extend(found)
                if processed <= 0:
                    raise NeedsFull(f"{self.handle.path}: the change query made no progress at {offset}")
                offset += processed
        except VirtDiskError as exc:
            if exc.code in virtdisk.CHANGE_TRACKING_RESET_ERRORS:
                raise NeedsFull(str(exc)) from None
            raise
        return ranges_to_chunks(ranges, chunk_size)

    def close(self) -> None:
        self.handle.close()


class VirtDiskSource:
    method = "virtdisk"

    def __init__(self, vm: Vm, checkpoint: Checkpoint, base: ReferencePoint | None):
        self.vm, self.checkpoint, self.base = vm, checkpoint, base

    def open_disk(self, index: int) -> DiskReader:
        disk = self.checkpoint.disks[index]
        handle = virtdisk.open_virtual_disk(self.vm.path_of(disk.frozen), read_only=True)
        return _VirtDiskReader(handle, _base_rct_id(self.base, disk.instance_id))

    def finish(self) -> None:
        """Nothing staged."""

    def abandon(self) -> None:
        """Nothing staged."""


def _base_rct_id(base: ReferencePoint | None, disk_id: str) -> str | None:
    if base is None:
        return None
    return dict(zip(base.virtual_disk_identifiers, base.resilient_change_tracking_identifiers)).get(disk_id)


class _ExportedReader(DiskReader):
    def __init__(self, device: BlockDevice, full_reason: str | None):
        super().__init__(device)
        self.full_reason = full_reason

    def changed_chunks(self, chunk_size: int) -> list[int]:
        if self.full_reason:
            raise NeedsFull(self.full_reason)
        # The differential's own blocks (depth 0) are what changed; the rest comes from its parent.
        return chunks_of((e for e in self.device.extents() if e.depth == 0), chunk_size)


class ExportSource:
    """Exports into ``<staging>/<checkpoint ID>``; ``finish`` keeps that directory as the VM's one
    full set and removes the older ones, ``abandon`` removes it."""

    method = "export"

    def __init__(self, vm: Vm, checkpoint: Checkpoint, base: ReferencePoint | None, staging: str,
                 cancelled: Callable[[], bool] | None = None):
        self.vm, self.checkpoint = vm, checkpoint
        self.cancelled = cancelled
        self.staging = staging
        self.directory = os.path.join(staging, checkpoint.instance_id)
        # Why the disks are exported in full although there is a base, if they are.
        self.full_reason = None
        if base is not None and not _staged(base, staging):
            self.full_reason = ("the staged export of the base reference point is gone, so the host cannot "
                                "write a differential on top of it")
        os.makedirs(staging, exist_ok=True)
        try:
            self.files = self._export(base if base is not None and self.full_reason is None else None)
        except BaseException:
            self.abandon()
            raise

    def _export(self, base: ReferencePoint | None) -> list[str]:
        shutil.rmtree(self.directory, ignore_errors=True)  # a crashed run's, or a differential given up
        settings = ExportSettings(snapshot_virtual_system=self.checkpoint.instance_id,
                                  differential_backup_base=base.instance_id if base else None,
                                  create_vm_export_subdirectory=False)
        try:
            return export_system_definition(self.vm, self.directory, settings,
                                            cancelled=self.cancelled)["virtual_hard_disks"]
        except HostError as exc:
            if base is None or exc.return_value != INVALID_STATE:
                raise
            # Change tracking cannot say what changed (off, lost, changed offline): export in full.
            self.full_reason = str(exc)
            return self._export(None)

    def open_disk(self, index: int) -> DiskReader:
        return _ExportedReader(stack.open(self.files[index], read_only=True), self.full_reason)

    def finish(self) -> None:
        """Fold each differential into the full copy below it, under the differential's name (the
        name the new reference point records), then drop the older export directories."""
        for path in self.files:
            _fold(path)
        for entry in os.listdir(self.staging):
            if entry != self.checkpoint.instance_id:
                shutil.rmtree(os.path.join(self.staging, entry), ignore_errors=True)

    def abandon(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _staged(base: ReferencePoint, staging: str) -> bool:
    """The base's exported disks are still in this staging directory (the parents a differential needs)."""
    root = os.path.realpath(staging) + os.sep
    return bool(base.exported) and all(os.path.realpath(p).startswith(root) and os.path.isfile(p)
                                       for p in base.exported)


def _fold(path: str) -> None:
    """Merge ``path`` down its chain until it is one full disk, keeping its name."""
    while True:
        with stack.open(path, read_only=True) as disk:
            parent = disk.parent.path if disk.parent is not None else None
        if parent is None:
            return
        try:
            stack.merge(path)
        except HvBackupError as exc:
            raise HostError(f"folding the staged export {path} into {parent}: {exc}", INVALID_STATE) from None
        os.replace(parent, path)
