"""``--method virtdisk``: each frozen disk file of the recovery checkpoint opened with OpenVirtualDisk
(read-only, with its parents), QueryChangesVirtualDisk since the base's RCT ID, and the reads done
here: local, nothing copied first."""

from __future__ import annotations

import threading

from hvbackup import virtdisk
from hvbackup.backup.geometry import Geometry
from hvbackup.backup.readers import (
    CHANGED_OFFLINE,
    NEW_DISK,
    NO_BASE,
    TRACKING_LOST,
    Range,
    close_all,
    data_ranges,
    merged,
)
from hvbackup.errors import NeedsFull, VirtDiskError
from hvbackup.host.model import Checkpoint, ReferencePoint
from hvbackup.host.vm import Vm
from hvbackup.winerror import ERROR_CTLOG_VHD_CHANGED_OFFLINE


def open_readers(vm: Vm, checkpoint: Checkpoint, base: ReferencePoint | None,
                 cancel: threading.Event) -> list[VirtDiskReader]:
    readers: list[VirtDiskReader] = []
    try:
        for disk in checkpoint.disks:
            handle = virtdisk.open_virtual_disk(vm.path_of(disk.frozen), read_only=True)
            readers.append(VirtDiskReader(handle, disk.instance_id))
    except BaseException:
        close_all(readers, failed=True)
        raise
    return readers


class VirtDiskReader:
    whole = True

    def __init__(self, handle: virtdisk.VirtualDiskHandle, disk_id: str):
        self.handle, self.disk_id = handle, disk_id
        self.geometry = Geometry.of(handle.device)

    def changes(self, base: ReferencePoint | None) -> list[Range]:
        """QueryChangesVirtualDisk over the whole disk, continuing at ProcessedLength."""
        if base is None:
            raise NeedsFull("there is no base to read changes since", reason=NO_BASE)
        rct_id = dict(zip(base.virtual_disk_identifiers, base.resilient_change_tracking_identifiers)).get(self.disk_id)
        if rct_id is None:
            raise NeedsFull(f"the base reference point has no disk {self.disk_id}", reason=NEW_DISK)
        ranges: list[Range] = []
        offset, size = 0, self.geometry.virtual_size
        try:
            while offset < size:
                found, processed = virtdisk.query_changes_virtual_disk(self.handle, rct_id, offset, size - offset)
                if processed <= 0:
                    raise NeedsFull(f"{self.handle.path}: the change query made no progress at {offset}",
                                    reason=TRACKING_LOST)
                ranges.extend(found)
                offset += processed
        except VirtDiskError as exc:
            if exc.code not in virtdisk.CHANGE_TRACKING_RESET_ERRORS:
                raise
            reason = CHANGED_OFFLINE if exc.code == ERROR_CTLOG_VHD_CHANGED_OFFLINE else TRACKING_LOST
            raise NeedsFull(str(exc), reason=reason) from None
        return merged(ranges)

    def allocated(self) -> list[Range]:
        return data_ranges(self.handle.device.extents())

    def readinto(self, offset: int, buffer) -> None:
        self.handle.device.readinto(offset, buffer)

    def finish(self) -> None:
        self.handle.close()

    abandon = finish  # nothing was made for reading
