"""The change-tracking filter: a filter over a writable VHDX that records every write and trim
before passing it on; every other call reaches the VHDX untouched.

The order of one write: mark its region in the .mrt file (durably, only if not yet marked since the
last save), stamp its granules in the in-memory map, then write the data. The first write of a
session also announces, in the same .mrt commit, the DataWriteGuid the VHDX is about to take, so a
crash afterwards is not mistaken for a foreign writer. Closing after writing seals a point.
"""

from __future__ import annotations

import uuid

from hvbackup.disks.device import BlockDevice
from hvbackup.disks.filter import Filter
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.tracking import lifecycle
from hvbackup.tracking.ids import RctId
from hvbackup.tracking.mrtfile import MrtWriter
from hvbackup.tracking.sidefiles import mrt_path
from hvbackup.tracking.state import Condition, Tracking, TrackingStatus


class TrackedDisk(Filter):
    next: VhdxDisk

    def __init__(self, disk: VhdxDisk, tracking: Tracking):
        super().__init__(disk)
        self.tracking = tracking
        mrt = tracking.mrt
        self._mrt = MrtWriter(mrt_path(disk.path))
        self._region_shift = mrt.region.bit_length() - 1
        self._session_announced = False
        self._written_since_seal = False
        # What the hot path in write() needs, set by _record once the session is announced and
        # dropped by a seal: (marked regions, region shift, epoch array, granule shift, epoch).
        self._fast: tuple | None = None

    @classmethod
    def over(cls, disk: VhdxDisk) -> BlockDevice:
        """The filter over a VHDX just opened for writing, its tracking made ready to record; while
        tracking is off, the VHDX itself. Closes the VHDX if that fails."""
        try:
            tracking = lifecycle.open_for_writing(disk)
            if tracking.condition == Condition.DISABLED:
                return disk
            return cls(disk, tracking)
        except BaseException:
            disk.close()
            raise

    # -- recording ------------------------------------------------------------------------------

    def _record(self, offset: int, length: int) -> None:
        if not length:
            return
        mrt = self.tracking.mrt
        first, last = offset >> self._region_shift, (offset + length - 1) >> self._region_shift
        marked = mrt.marked
        unmarked = not marked[first] or (last != first and not all(marked[first:last + 1]))
        if unmarked or not self._session_announced:
            if not self._session_announced:
                mrt.pending_dwg = uuid.uuid4()
                self.next.set_next_data_write_guid(mrt.pending_dwg)
            marked[first:last + 1] = b"\1" * (last - first + 1)
            self._mrt.commit(mrt)
            self._session_announced = True
        rct = self.tracking.rct
        rct.changes.stamp(offset, length, rct.last_sealed + 1)
        self.tracking.newer_changes = self._written_since_seal = True
        self._fast = (marked, self._region_shift, rct.changes.epochs, rct.changes.shift, rct.last_sealed + 1)

    def write(self, offset: int, data) -> None:
        # The hot path of every tracked writer, written out by hand: a write inside one region
        # already marked since the last save only needs its granules stamped; anything else (the
        # first write of a session or after a seal, an unmarked region, several regions) goes
        # through _record, which makes the mark durable first.
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        length = len(data)
        end = offset + length
        disk = self.next
        if disk.read_only or disk.closed or offset < 0 or end > disk.size:
            self._check_writable()
            self._check_range(offset, length)
        fast = self._fast
        if fast is not None and length:
            marked, region_shift, epochs, granule_shift, epoch = fast
            if marked[offset >> region_shift] and (end - 1) >> region_shift == offset >> region_shift:
                first, last = offset >> granule_shift, (end - 1) >> granule_shift
                if first == last:
                    epochs[first] = epoch
                else:
                    epochs[first:last + 1] = epoch
                disk.write(offset, data)
                return
        self._record(offset, length)
        disk.write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        self._record(offset, length)
        self.next.trim(offset, length)

    # -- tracking --------------------------------------------------------------------------------

    def change_tracker(self) -> TrackedDisk:
        return self

    def seal(self) -> str:
        """Seal a new point and return its ID: later queries against it return what is written after."""
        self._check_range(0, 0)
        lifecycle.save(self.next, self.tracking, seal=True)
        self._mrt.commit(self.tracking.mrt)
        self._written_since_seal = False
        self._fast = None
        return str(self.most_recent_id)

    @property
    def most_recent_id(self) -> RctId:
        return self.tracking.most_recent_id

    def status(self) -> TrackingStatus:
        return self.tracking.status()

    def query(self, change_id: str, offset: int, length: int, max_ranges: int = 1 << 20):
        return self.tracking.query(change_id, offset, length, max_ranges)

    def info(self) -> dict:
        return {**self.next.info(), "change_tracking": self.status().to_dict()}

    def close(self) -> None:
        """Seals a point if anything was written since the last one, then closes the VHDX."""
        if self.closed:
            return
        try:
            if self._written_since_seal:
                self.seal()
        finally:
            self._mrt.close()
            self.next.close()
