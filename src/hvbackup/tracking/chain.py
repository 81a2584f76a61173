"""Tracking through differencing: a child continues its parent's history, and a merge hands the
child's history back to the parent, so every ID issued before, during and after stays valid.

A merge writes the child's data into the parent. Before the first of those writes, the parent's
.mrt file marks every region the merge will touch and announces the parent's next DataWriteGuid,
so a merge that stops half way leaves the parent over-reporting, never missing, and a resumed merge
finishes the hand-over. ``MergeHandOver`` is what ``disks.merge`` calls at those points.
"""

from __future__ import annotations

import uuid
from typing import Iterable

from hvbackup.disks.device import BlockDevice, Extent
from hvbackup.disks.merge import MergeHooks
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.tracking import mrtfile
from hvbackup.tracking.mrtfile import MrtState, region_size_for
from hvbackup.tracking.rctfile import MAX_RETIRED, EarlierLineage, RctState, Retirement
from hvbackup.tracking.sidefiles import mrt_path, rct_path, read_marker, remove_side_files, write_marker
from hvbackup.tracking.state import Condition, Tracking, load

__all__ = ["MergeHandOver", "inherit"]


def _install(disk: VhdxDisk, rct: RctState) -> None:
    """Give ``disk`` the history ``rct`` as of its current DataWriteGuid, with no marks."""
    rct.data_write_guid = disk.data_write_guid
    rct.save(rct_path(disk.path))
    region = region_size_for(disk.size, rct.changes.granularity)
    mrtfile.create(mrt_path(disk.path), MrtState(rct.lineage, rct.last_sealed, disk.size, region))


def inherit(child: VhdxDisk) -> None:
    """A new child (which copied the parent's marker) continues the parent's history in a lineage of
    its own: the parent's IDs up to now stay valid on the child, and points sealed on one branch
    (another child of the same parent, after a checkpoint was applied) are never mistaken for
    another's. If the parent's tracking cannot answer, the child's is lost too and restarts at its
    first writer."""
    parent, copied = child.parent, read_marker(child)
    if not isinstance(parent, VhdxDisk) or copied is None:
        return
    tracking = load(parent)
    if tracking.condition == Condition.ACTIVE and tracking.lineage == copied:
        rct = tracking.rct
        forked = EarlierLineage(rct.lineage, Retirement.CONTINUED, rct.last_sealed)
        rct.retired = [*rct.retired, forked][-MAX_RETIRED:]
        rct.lineage = uuid.uuid4()
        _install(child, rct)
        write_marker(child, rct.lineage)


class MergeHandOver(MergeHooks):
    """The hooks of one merge: the parent's .mrt marks what the merge will write before it writes,
    the parent takes the child's history once the data is durable, and the child's side files go
    with the child."""

    def __init__(self):
        self._handed: Tracking | None = None

    def before_writes(self, child: BlockDevice, parent: BlockDevice, written: list[Extent]) -> None:
        if isinstance(child, VhdxDisk) and isinstance(parent, VhdxDisk):
            self._handed = _begin(child, parent, written)

    def after_flush(self, parent: BlockDevice) -> None:
        if self._handed is not None:
            # The child's history is a superset of the parent's, as of the parent's new DataWriteGuid.
            _install(parent, self._handed.rct)

    def after_delete(self, child_path: str) -> None:
        remove_side_files(child_path)


def _begin(child: VhdxDisk, parent: VhdxDisk, own: Iterable[Extent]) -> Tracking | None:
    """Before a merge writes into ``parent``: returns the child's tracking to hand over, or None."""
    handed = load(child)
    if handed.condition != Condition.ACTIVE:
        return None
    present = load(parent)
    if present.condition == Condition.ACTIVE:
        mrt = MrtState(present.lineage, present.rct.last_sealed, parent.size,
                       region_size_for(parent.size, present.rct.changes.granularity),
                       pending_dwg=parent.next_data_write_guid)
        if present.mrt.base == mrt.base:
            mrt.marked[:] = present.mrt.marked  # marks a crashed writer of the parent left stay
        shift = mrt.region.bit_length() - 1
        for ext in own:
            first, last = ext.offset >> shift, (ext.end - 1) >> shift
            mrt.marked[first:last + 1] = b"\1" * (last - first + 1)
        mrtfile.create(mrt_path(parent.path), mrt)
    return handed
