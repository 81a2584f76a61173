"""A disk's tracking as its files describe it: loaded, checked against the VHDX, recovered after a
crash, and queried.

Loading never writes. What it concludes:

* **disabled**: the VHDX carries no tracking marker.
* **lost**: the marker is there but a side file is missing, damaged or of another lineage.
  Nothing can be answered.
* **changed offline**: the VHDX DataWriteGuid is neither the one the .rct was saved at nor the one
  the last tracked writer announced in the .mrt: a writer that does not track (qemu-io, another
  tool) changed the data.
* **active**: the map is usable. If the .mrt marks regions written after the last save (a writer
  stopped without closing), every granule in them counts as changed in the current epoch.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.errors import TrackingError, TrackingFormatError
from hvbackup.tracking import mrtfile, rctfile
from hvbackup.tracking.ids import RctId
from hvbackup.tracking.mrtfile import MrtState
from hvbackup.tracking.rctfile import RctState, Retirement
from hvbackup.tracking.sidefiles import mrt_path, rct_path, read_marker
from hvbackup.winerror import (
    ERROR_CTLOG_INCONSISTENT_TRACKING_FILE,
    ERROR_CTLOG_VHD_CHANGED_OFFLINE,
    ERROR_INVALID_PARAMETER,
    ERROR_VHD_CHANGE_TRACKING_DISABLED,
    ERROR_VHD_INVALID_CHANGE_TRACKING_ID,
    ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION,
)


class Condition(enum.StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    LOST = "lost"
    CHANGED_OFFLINE = "changed_offline"


@dataclass(frozen=True)
class TrackingStatus:
    """GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE, plus why tracking cannot answer when it cannot."""

    enabled: bool
    newer_changes: bool
    most_recent_id: str | None
    state: str
    problem: str | None = None
    granularity: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


_RETIREMENT_ERRORS = {
    Retirement.CHANGED_OFFLINE: (ERROR_CTLOG_VHD_CHANGED_OFFLINE, "the disk was changed by a writer that does not "
                                 "track changes after this ID was issued"),
    Retirement.LOST: (ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION, "the tracking history this ID belongs to was "
                      "lost"),
}


@dataclass
class Tracking:
    path: str
    size: int
    condition: Condition
    lineage: uuid.UUID | None = None
    rct: RctState | None = None
    mrt: MrtState | None = None
    problem: str | None = None
    problem_code: int | None = None
    newer_changes: bool = False
    recovered: bool = False  # .mrt marks were applied: a writer stopped without saving

    # -- what callers ask ------------------------------------------------------------------------

    @property
    def most_recent_id(self) -> RctId | None:
        return RctId(self.rct.lineage, self.rct.last_sealed) if self.condition == Condition.ACTIVE else None

    def status(self) -> TrackingStatus:
        recent = self.most_recent_id
        return TrackingStatus(
            enabled=self.condition != Condition.DISABLED,
            newer_changes=self.newer_changes or self.condition in (Condition.LOST, Condition.CHANGED_OFFLINE),
            most_recent_id=str(recent) if recent else None,
            state=str(self.condition),
            problem=self.problem,
            granularity=self.rct.changes.granularity if self.rct else None,
        )

    def query(self, change_id: str, offset: int, length: int, max_ranges: int) -> tuple[list[tuple[int, int]], int]:
        """Ranges written after ``change_id`` inside [offset, offset+length), at most ``max_ranges``,
        and how many bytes from ``offset`` the answer covers (the caller continues from there)."""
        if offset < 0 or length < 0 or offset + length > self.size or max_ranges < 1:
            raise TrackingError(ERROR_INVALID_PARAMETER, f"{self.path}: query {offset:#x}+{length:#x} (max_ranges "
                                f"{max_ranges}) does not fit the disk ({self.size} bytes)")
        wanted = RctId.parse(change_id)
        self.check_answerable()
        last = self.rct.last_sealed if wanted.lineage == self.rct.lineage else self._earlier_points(wanted, change_id)
        if not 1 <= wanted.sequence <= last:
            raise TrackingError(ERROR_VHD_INVALID_CHANGE_TRACKING_ID,
                                f"{self.path}: {change_id} was never issued (the most recent ID is "
                                f"{self.most_recent_id})")
        if length == 0:
            return [], 0
        ranges, complete = self.rct.changes.changed_since(wanted.sequence, offset, offset + length, max_ranges)
        return ranges, complete - offset

    def _earlier_points(self, wanted: RctId, change_id: str) -> int:
        """How many points of ``wanted``'s lineage this history shares (it forked from it), or the
        error that lineage's end gives."""
        for earlier in reversed(self.rct.retired):
            if earlier.lineage == wanted.lineage:
                if earlier.reason == Retirement.CONTINUED:
                    return earlier.up_to
                code, why = _RETIREMENT_ERRORS[earlier.reason]
                raise TrackingError(code, f"{self.path}: cannot answer for {change_id}: {why}")
        raise TrackingError(ERROR_VHD_INVALID_CHANGE_TRACKING_ID,
                            f"{self.path}: {change_id} is not an ID of this disk's change tracking")

    def check_answerable(self) -> None:
        if self.condition == Condition.DISABLED:
            raise TrackingError(ERROR_VHD_CHANGE_TRACKING_DISABLED, f"{self.path}: change tracking is off")
        if self.condition == Condition.CHANGED_OFFLINE:
            raise TrackingError(ERROR_CTLOG_VHD_CHANGED_OFFLINE, f"{self.path}: {self.problem}")
        if self.condition == Condition.LOST:
            raise TrackingError(self.problem_code, f"{self.path}: change tracking was lost: {self.problem}")


def load(disk: VhdxDisk) -> Tracking:
    """Read and check the disk's tracking; apply .mrt marks in memory. Writes nothing."""
    path, size = disk.path, disk.size
    lineage = read_marker(disk)
    if lineage is None:
        return Tracking(path, size, Condition.DISABLED)

    def lost(code: int, problem: str, rct: RctState | None = None) -> Tracking:
        return Tracking(path, size, Condition.LOST, lineage, rct, problem=problem, problem_code=code)

    try:
        rct = rctfile.read(rct_path(path), size)
    except FileNotFoundError:
        return lost(ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION, "its .rct file is missing")
    except (TrackingFormatError, OSError) as exc:
        return lost(ERROR_CTLOG_INCONSISTENT_TRACKING_FILE, f"its .rct file is unusable: {exc}")
    if rct.lineage != lineage:
        return lost(ERROR_CTLOG_INCONSISTENT_TRACKING_FILE, "its .rct file belongs to another tracking history")

    try:
        mrt = mrtfile.read(mrt_path(path), size)
    except FileNotFoundError:
        return lost(ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION, "its .mrt file is missing", rct)
    except (TrackingFormatError, OSError) as exc:
        return lost(ERROR_CTLOG_INCONSISTENT_TRACKING_FILE, f"its .mrt file is unusable: {exc}", rct)
    if mrt.lineage != lineage:
        return lost(ERROR_CTLOG_INCONSISTENT_TRACKING_FILE, "its .mrt file belongs to another tracking history", rct)
    if disk.data_write_guid not in (rct.data_write_guid, mrt.pending_dwg):
        return Tracking(path, size, Condition.CHANGED_OFFLINE, lineage, rct,
                        problem="the disk was changed by a writer that does not track changes "
                                "(its DataWriteGuid is not one hvbackup recorded)")
    if mrt.base > rct.last_sealed:
        return lost(ERROR_CTLOG_INCONSISTENT_TRACKING_FILE, "its .mrt file is newer than its .rct file", rct)

    tracking = Tracking(path, size, Condition.ACTIVE, lineage, rct, mrt)
    if mrt.base == rct.last_sealed:
        shift = rct.changes.shift
        for region in mrt.marked_regions():
            first = region * mrt.region >> shift
            end = min(len(rct.changes.epochs), (region + 1) * mrt.region >> shift)
            rct.changes.stamp_granules(first, end, rct.last_sealed + 1)
            tracking.recovered = True
    tracking.newer_changes = tracking.recovered or rct.unsealed_changes
    return tracking
