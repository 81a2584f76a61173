"""Tracking through differencing: a child continues its parent's history, and a merge hands the
child's history back to the parent, so every ID issued before, during and after stays valid.

A merge writes the child's data into the parent. Before the first of those writes, the parent's
.mrt file marks every region the merge will touch and announces the parent's next DataWriteGuid,
so a merge that stops half way leaves the parent over-reporting, never missing, and a resumed merge
finishes the hand-over.
"""

from __future__ import annotations

import uuid
from typing import Iterable

from hvbackup.disks.device import Extent
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.tracking import mrtfile
from hvbackup.tracking.mrtfile import MrtState, region_size_for
from hvbackup.tracking.rctfile import MAX_RETIRED, EarlierLineage, RctState, Retirement
from hvbackup.tracking.sidefiles import mrt_path, rct_path, read_marker, remove_side_files, write_marker
from hvbackup.tracking.state import Condition, Tracking, load

__all__ = ["begin_merge", "finish_merge", "inherit", "remove_side_files"]


def _install(disk: VhdxDisk, rct: RctState, mrt: MrtState | None = None) -> None:
    """Give ``disk`` the history ``rct`` as of its current DataWriteGuid, with ``mrt`` (or no marks)."""
    rct.data_write_guid = disk.data_write_guid
    rct.save(rct_path(disk.path))
    region = region_size_for(disk.size, rct.changes.granularity)
    mrtfile.create(mrt_path(disk.path), mrt or MrtState(rct.lineage, rct.last_sealed, disk.size, region))


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


def begin_merge(child: VhdxDisk, parent: VhdxDisk, next_guid: uuid.UUID, own: Iterable[Extent]) -> Tracking | None:
    """Before a merge writes into ``parent``: returns the child's tracking to hand over, or None."""
    handed = load(child)
    if handed.condition != Condition.ACTIVE:
        return None
    present = load(parent)
    if present.condition == Condition.ACTIVE:
        mrt = MrtState(present.lineage, present.rct.last_sealed, parent.size,
                       region_size_for(parent.size, present.rct.changes.granularity), pending_dwg=next_guid)
        if present.mrt.base == mrt.base:
            mrt.marked[:] = present.mrt.marked  # marks a crashed writer of the parent left stay
        shift = mrt.region.bit_length() - 1
        for ext in own:
            first, last = ext.offset >> shift, (ext.end - 1) >> shift
            mrt.marked[first:last + 1] = b"\1" * (last - first + 1)
        mrtfile.create(mrt_path(parent.path), mrt)
    return handed


def finish_merge(handed: Tracking, parent: VhdxDisk) -> None:
    """After the merge's data and metadata are durable in ``parent``: the parent takes the child's
    history (a superset of its own), as of its new DataWriteGuid."""
    _install(parent, handed.rct)

