"""The one place that composes a disk's block stack: the format chain (``hvbackup.disks``), then the
change-tracking filter (``hvbackup.tracking``) over a VHDX with tracking on, opened for writing.

Every hvbackup writer that should be tracked opens, creates and merges disks here, so no write
escapes tracking and no format knows tracking exists. A caller that must write behind tracking's
back (repairing a file, a test playing a foreign writer) uses ``hvbackup.disks`` directly.
"""

from __future__ import annotations

import os
from typing import Sequence

from hvbackup import disks, tracking
from hvbackup.disks import BlockDevice, CheckReport
from hvbackup.disks.copy import Progress


def open(path: str | os.PathLike, *, read_only: bool = False) -> BlockDevice:
    """Open a disk file of any format with its parents; for writing, a tracked VHDX comes back
    behind the tracking filter, which records every write and trim and seals a point on close."""
    return _filtered(disks.open(path, read_only=read_only))


def create(path: str | os.PathLike, size: int | None = None, **options) -> BlockDevice:
    """``disks.create`` (same arguments), returned open as ``open`` would: a differencing VHDX of a
    tracked parent continues the parent's tracking history."""
    disk = disks.create(path, size, **options)
    if disk.format == "vhdx" and disk.parent is not None:
        try:
            tracking.inherit(disk)
        except BaseException:
            disk.close()
            raise
    return _filtered(disk)


def merge(child_path: str, *, progress: Progress | None = None, children: Sequence[str] = ()) -> str:
    """``disks.merge`` with change tracking's hand-over: the parent takes the child's history, so
    every ID issued on the child stays answerable on the parent."""
    return disks.merge(child_path, progress=progress, children=children, hooks=tracking.MergeHandOver())


def check(path: str | os.PathLike, *, repair: bool = False) -> CheckReport:
    """``disks.check``, reporting lost change tracking too."""
    return disks.check(path, repair=repair, inspect=tracking.problems)


def _filtered(disk: BlockDevice) -> BlockDevice:
    if disk.read_only or disk.format != "vhdx":
        return disk
    return tracking.TrackedDisk.over(disk)
