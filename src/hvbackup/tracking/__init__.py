"""Resilient change tracking (RCT) for VHDX disks: which byte ranges changed since a point.

Tracking lives in two side files next to the disk, ``NAME.vhdx.rct`` (the change map and sealed
points) and ``NAME.vhdx.mrt`` (regions written since the map was last saved), and in a marker item
inside the VHDX; docs/tracking.md describes them. Every hvbackup write path records its writes:
``hvbackup.stack`` puts the :class:`TrackedDisk` filter over a tracked VHDX opened for writing,
gives a new differencing child its parent's history (``inherit``) and has a merge hand the child's
history to the parent (``MergeHandOver``).

IDs look like Hyper-V's (``rctX:<lineage GUID>:<sequence>``). A point is sealed when tracking is
switched on, when a writer closes the disk after writing, and on request (``seal``).
"""

from __future__ import annotations

import os

from hvbackup import disks
from hvbackup.disks.device import BlockDevice
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.errors import TrackingError
from hvbackup.tracking import lifecycle, state
from hvbackup.tracking.chain import MergeHandOver, inherit
from hvbackup.tracking.filter import TrackedDisk
from hvbackup.tracking.ids import RctId
from hvbackup.tracking.state import Condition, TrackingStatus
from hvbackup.winerror import ERROR_VHD_CHANGE_TRACKING_DISABLED, ERROR_VHD_INVALID_TYPE

DEFAULT_MAX_RANGES = 1 << 20


def _require_vhdx(path: str) -> None:
    if disks.detect_format(path) != "vhdx":
        raise TrackingError(ERROR_VHD_INVALID_TYPE, f"{path}: change tracking needs a VHDX disk")


def _open_vhdx(path: str, *, read_only: bool) -> VhdxDisk:
    path = os.fspath(path)
    _require_vhdx(path)
    return VhdxDisk.open(path, read_only=read_only)


def enable(path: str, *, granularity: int | None = None) -> TrackingStatus:
    """Switch tracking on (sealing the first point); a disk already tracked is left as it is."""
    with _open_vhdx(path, read_only=False) as disk:
        tracking = state.load(disk)
        if tracking.condition == Condition.DISABLED:
            tracking = lifecycle.start_lineage(disk, granularity)
        elif tracking.condition != Condition.ACTIVE:
            tracking = lifecycle.restart(disk, tracking)
        return tracking.status()


def disable(path: str) -> None:
    """Switch tracking off and delete the side files; every ID issued so far stops working."""
    with _open_vhdx(path, read_only=False) as disk:
        lifecycle.end(disk)


def status(path: str) -> TrackingStatus:
    """Read-only: enabled, newer_changes, most_recent_id, and the state (active, disabled, lost,
    changed_offline)."""
    with _open_vhdx(path, read_only=True) as disk:
        return state.load(disk).status()


def query(path: str, change_id: str, offset: int = 0, length: int | None = None, *,
          max_ranges: int = DEFAULT_MAX_RANGES) -> tuple[list[tuple[int, int]], int]:
    """Read-only: ranges ``(offset, length)`` written after ``change_id`` within the area, and the
    number of bytes of the area the answer covers."""
    with _open_vhdx(path, read_only=True) as disk:
        length = disk.size - offset if length is None else length
        return state.load(disk).query(change_id, offset, length, max_ranges)


def seal(path: str) -> str:
    """Seal a point on a closed disk and return its ID."""
    with TrackedDisk.over(_open_vhdx(path, read_only=False)) as disk:
        tracker = disk.change_tracker()
        if tracker is None:
            raise TrackingError(ERROR_VHD_CHANGE_TRACKING_DISABLED, f"{path}: change tracking is off")
        return tracker.seal()


def problems(disk: BlockDevice) -> list[str]:
    """What ``disks.check`` reports about the tracking of an open disk: that it was lost, if it was."""
    if not isinstance(disk, VhdxDisk):
        return []
    tracking = state.load(disk)
    if tracking.condition != Condition.LOST:
        return []
    return [f"change tracking is lost: {tracking.problem} (the next writer starts a new history; the next "
            f"backup reads the disk in full)"]


__all__ = ["Condition", "MergeHandOver", "RctId", "TrackedDisk", "TrackingStatus", "disable", "enable", "inherit",
           "problems", "query", "seal", "status"]
