"""Which restore points a retention policy keeps: grandfather-father-son, with restic's semantics.

Each VM's points are judged on their own. ``last`` keeps the N newest; ``daily``, ``weekly`` and
``monthly`` keep the newest point of each of the N most recent days (ISO weeks, calendar months)
that have points at all, so a VM backed up irregularly still keeps N of each. Time is UTC. A point
any rule keeps is kept, and says which rules kept it.
"""

from __future__ import annotations

import datetime
from typing import Callable

from hvbackup.backup.manifest import Manifest
from hvbackup.errors import RepositoryError

RULES: dict[str, Callable[[datetime.datetime], tuple]] = {
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],  # ISO year and week: Jan 1 may belong to last year's week
    "monthly": lambda t: (t.year, t.month),
}


def point_time(point: Manifest) -> float:
    """When the point was taken: its end, or its start for a point without one."""
    when = point.ended or point.started
    if not isinstance(when, (int, float)):
        raise RepositoryError(f"point {point.point_id} has no time; retention cannot place it")
    return float(when)


def plan(points: list[Manifest], *, keep_last: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
         keep_monthly: int = 0) -> tuple[list[dict], list[dict]]:
    """Split restore point summaries into (keep, forget), both oldest first. Each entry is
    ``{point_id, vm_id, vm_name, time}``; a kept one also has ``reasons``, e.g. ``["last", "daily"]``."""
    counts = {"last": keep_last, "daily": keep_daily, "weekly": keep_weekly, "monthly": keep_monthly}
    for rule, count in counts.items():
        if not isinstance(count, int) or count < 0:
            raise RepositoryError(f"--keep-{rule} must be a whole number, 0 or more (got {count!r})")
    if not any(counts.values()):
        # Forgetting everything is never what a retention policy means; `repo forget` one by one is.
        raise RepositoryError("the policy keeps nothing: give at least one --keep-* above 0")

    by_vm: dict[str | None, list[Manifest]] = {}
    for point in points:
        by_vm.setdefault(point.vm_id, []).append(point)
    reasons: dict[str, list[str]] = {}
    for vm_points in by_vm.values():
        newest_first = sorted(vm_points, key=lambda p: (point_time(p), p.point_id), reverse=True)
        for point in newest_first[:keep_last]:
            reasons.setdefault(point.point_id, []).append("last")
        for rule, bucket_of in RULES.items():
            seen: set[tuple] = set()
            for point in newest_first:
                if len(seen) == counts[rule]:
                    break
                bucket = bucket_of(datetime.datetime.fromtimestamp(point_time(point), datetime.UTC))
                if bucket not in seen:  # newest first, so the first point of a bucket is its newest
                    seen.add(bucket)
                    reasons.setdefault(point.point_id, []).append(rule)

    keep, forget = [], []
    for point in sorted(points, key=lambda p: (point_time(p), p.point_id)):
        entry = {"point_id": point.point_id, "vm_id": point.vm_id, "vm_name": point.vm_name, "time": point_time(point)}
        if point.point_id in reasons:
            keep.append({**entry, "reasons": reasons[point.point_id]})
        else:
            forget.append(entry)
    return keep, forget
