"""The change-tracking filter: a block device over a writable VHDX that records every write and
trim before passing it down.

The order of one write: mark its region in the .mrt file (durably, only if not yet marked since the
last save), stamp its granules in the in-memory map, then write the data. The first write of a
session also announces, in the same .mrt commit, the DataWriteGuid the VHDX is about to take, so a
crash afterwards is not mistaken for a foreign writer. Closing after writing seals a point.
"""

from __future__ import annotations

import uuid
from typing import Iterator

from hvbackup.disks.device import BlockDevice, Extent
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.tracking import lifecycle
from hvbackup.tracking.ids import RctId
from hvbackup.tracking.mrtfile import MrtWriter
from hvbackup.tracking.sidefiles import mrt_path
from hvbackup.tracking.state import Condition, Tracking, TrackingStatus


class TrackedDisk(BlockDevice):
    def __init__(self, inner: VhdxDisk, tracking: Tracking):
        self.inner, self.tracking = inner, tracking
        for name in ("format", "disk_type", "path", "size", "block_size", "logical_sector_size",
                     "physical_sector_size", "disk_id", "parent", "read_only"):
            setattr(self, name, getattr(inner, name))
        self.closed = False
        mrt = tracking.mrt
        self._mrt = MrtWriter(mrt_path(inner.path))
        self._region_shift = mrt.region.bit_length() - 1
        self._session_announced = False
        self._written_since_seal = False
        # What the hot path in write() needs, set by _record once the session is announced and
        # dropped by a seal: (marked regions, region shift, epoch array, granule shift, epoch).
        self._fast: tuple | None = None

    @classmethod
    def open(cls, inner: VhdxDisk) -> BlockDevice:
        """Wrap a disk just opened for writing; a disk whose tracking is off is returned as it is."""
        try:
            tracking = lifecycle.open_for_writing(inner)
            if tracking.condition == Condition.DISABLED:
                return inner
            return cls(inner, tracking)
        except BaseException:
            inner.close()
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
                self.inner.set_next_data_write_guid(mrt.pending_dwg)
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
        if self.read_only or self.closed or offset < 0 or end > self.size:
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
                self.inner.write(offset, data)
                return
        self._record(offset, length)
        self.inner.write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        self._record(offset, length)
        self.inner.trim(offset, length)

    # -- tracking --------------------------------------------------------------------------------

    def seal(self) -> str:
        """Seal a new point and return its ID: later queries against it return what is written after."""
        self._check_range(0, 0)
        lifecycle.save(self.inner, self.tracking, seal=True)
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

    # -- the rest passes through ---------------------------------------------------------------

    def readinto(self, offset: int, buffer) -> None:
        self.inner.readinto(offset, buffer)

    def _write(self, offset: int, data: memoryview) -> None:
        self.inner.write(offset, data)

    def _trim(self, offset: int, length: int) -> None:
        self.inner.trim(offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def start_flush(self) -> None:
        self.inner.start_flush()

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        return self.inner.extents(start, end - start)

    @property
    def write_alignment(self) -> int:
        return self.inner.write_alignment

    def info(self) -> dict:
        return {**self.inner.info(), "change_tracking": self.status().to_dict()}

    def _close(self) -> None:
        try:
            if self._written_since_seal:
                self.seal()
        finally:
            self._mrt.close()
            self.inner.close()

    def __getattr__(self, name: str):
        # Format-specific calls (data_write_guid, metadata, ...) reach the VHDX underneath.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
