"""Starting, restarting and ending a tracking lineage, and saving a writer's state at a seal.

Order matters for crash safety. Starting writes the .rct and .mrt files first and the VHDX marker
last: until the marker names the new lineage, the side files do not count. Ending removes the marker
first, then the side files.
"""

from __future__ import annotations

import uuid

from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.tracking import mrtfile
from hvbackup.tracking.changemap import ChangeMap, choose_granularity
from hvbackup.tracking.mrtfile import MrtState, region_size_for
from hvbackup.tracking.rctfile import EarlierLineage, RctState, Retirement
from hvbackup.tracking.sidefiles import mrt_path, rct_path, remove_side_files, write_marker
from hvbackup.tracking.state import Condition, Tracking, load


def start_lineage(disk: VhdxDisk, granularity: int | None,
                  retired: list[EarlierLineage] = ()) -> Tracking:
    """A new history whose first point (sequence 1) is sealed now."""
    granularity = choose_granularity(disk.size, granularity)
    lineage = uuid.uuid4()
    rct = RctState(lineage, 1, disk.data_write_guid, ChangeMap(disk.size, granularity), list(retired))
    rct.save(rct_path(disk.path))
    mrt = MrtState(lineage, 1, disk.size, region_size_for(disk.size, granularity))
    mrtfile.create(mrt_path(disk.path), mrt)
    write_marker(disk, lineage)
    disk.flush()
    return Tracking(disk.path, disk.size, Condition.ACTIVE, lineage, rct, mrt)


def restart(disk: VhdxDisk, tracking: Tracking) -> Tracking:
    """Replace a lost or offline-changed history with a new one; its IDs keep failing with the
    reason it ended."""
    reason = Retirement.CHANGED_OFFLINE if tracking.condition == Condition.CHANGED_OFFLINE else Retirement.LOST
    # The lineages this history continued from end here too: the new map holds none of their changes.
    retired = [EarlierLineage(e.lineage, reason) if e.reason == Retirement.CONTINUED else e
               for e in tracking.rct.retired] if tracking.rct else []
    if tracking.lineage is not None and tracking.lineage.int:
        retired.append(EarlierLineage(tracking.lineage, reason))
    granularity = tracking.rct.changes.granularity if tracking.rct else None
    return start_lineage(disk, granularity, retired)


def end(disk: VhdxDisk) -> None:
    write_marker(disk, None)
    disk.flush()
    remove_side_files(disk.path)


def save(disk: VhdxDisk, tracking: Tracking, *, seal: bool) -> None:
    """Make the in-memory map the saved one (sealing a new point if asked), then clear the .mrt.
    The disk's data is flushed first, so the DataWriteGuid recorded is the one on disk."""
    disk.flush()
    rct = tracking.rct
    if seal:
        rct.last_sealed += 1
        tracking.newer_changes = False
    rct.data_write_guid = disk.data_write_guid
    rct.save(rct_path(disk.path))
    region = region_size_for(disk.size, rct.changes.granularity)
    # The announced DataWriteGuid stays announced: the VHDX may take it only at a later write.
    pending = tracking.mrt.pending_dwg if tracking.mrt else None
    tracking.mrt = MrtState(rct.lineage, rct.last_sealed, disk.size, region, pending_dwg=pending)
    tracking.recovered = False


def open_for_writing(disk: VhdxDisk) -> Tracking:
    """The tracking of a disk a writer has just opened, made ready to record: a lost or offline
    history restarted, a crash's recovered marks saved, a missing .mrt file recreated."""
    tracking = load(disk)
    if tracking.condition in (Condition.LOST, Condition.CHANGED_OFFLINE):
        return restart(disk, tracking)
    if tracking.condition == Condition.ACTIVE and (tracking.recovered or tracking.mrt.base != tracking.rct.last_sealed):
        save(disk, tracking, seal=False)
        mrtfile.create(mrt_path(disk.path), tracking.mrt)
    return tracking
