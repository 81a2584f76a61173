"""Tracking survives SIGKILL at random moments: after reopening, no query ever misses a write, and
what it over-reports lies in the regions written since the last seal (what the .mrt marked)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import tracking_crash_workload as workload
from crash_harness import Workload

from hvbackup import stack, tracking
from hvbackup.tracking.mrtfile import MIN_REGION as REGION
from hvbackup.units import MiB

pytestmark = pytest.mark.slow
G = 64 * 1024


def granules(offset: int, length: int) -> set[int]:
    return set(range(offset // G, (offset + length - 1) // G + 1))


def regions(offset: int, length: int) -> set[int]:
    return set(range(offset // REGION, (offset + length - 1) // REGION + 1))


class Journal:
    """What the killed workload did, read back from its journal."""

    def __init__(self, path: Path):
        self.done: list[set[int]] = []          # granules of each write that returned
        self.ids: dict[str, int] = {}           # sealed ID -> writes that returned before it
        self.in_flight: set[int] = set()        # granules of a write that began and did not return
        self.unsealed_regions: set[int] = set() # regions written since the last seal or child
        self.top = None
        self.merge_interrupted = False
        pending = None
        for line in path.read_text().splitlines():
            kind, *rest = line.split(" ")
            if kind == "B":
                pending = (int(rest[0]), int(rest[1]))
                self.unsealed_regions |= regions(*pending)
            elif kind == "W" and pending:
                self.done.append(granules(*pending))
                pending = None
            elif kind == "S" and rest:
                self.ids.setdefault(rest[0], len(self.done))
                self.unsealed_regions = set()
            elif kind == "C":
                self.top = rest[0]
            elif kind == "M":
                self.merge_interrupted = True
            elif kind == "m":
                self.merge_interrupted, self.top = False, None
        if pending:
            self.in_flight = granules(*pending)


def reported(path: str, change_id: str) -> set[int]:
    ranges, covered = tracking.query(path, change_id)
    assert covered == workload.DISK_SIZE
    return set().union(*(granules(o, n) for o, n in ranges)) if ranges else set()


def verify(tmp: Path, journal: Journal) -> None:
    base = str(tmp / "base.vhdx")
    if journal.merge_interrupted and os.path.exists(journal.top):
        stack.merge(journal.top)  # what a user does after a crash: finish the merge
    top = journal.top if journal.top and not journal.merge_interrupted else base
    for opened_for_writing in (False, True):
        if opened_for_writing:
            stack.open(top).close()  # a writer reopens: recovered marks are saved
        status = tracking.status(top)
        assert status.state == "active", status
        for change_id, before in journal.ids.items():
            truth = set().union(*journal.done[before:]) if journal.done[before:] else set()
            answer = reported(top, change_id)
            assert truth <= answer, f"{change_id} misses granules {sorted(truth - answer)[:5]}"
            if not journal.merge_interrupted:
                allowed = truth | journal.in_flight | {
                    g for r in journal.unsealed_regions for g in range(r * REGION // G, (r + 1) * REGION // G)}
                assert answer <= allowed, f"{change_id} over-reports outside marked regions"
    assert stack.check(top).ok


def test_sigkill_during_tracked_writes(tmp_path, sample):
    rng = random.Random(20261125)
    cases = sample(12, 60)
    outcomes = []
    for case in range(cases):
        tmp = tmp_path / f"case{case}"
        tmp.mkdir()
        stack.create(tmp / "base.vhdx", workload.DISK_SIZE, block_size=MiB).close()
        tracking.enable(str(tmp / "base.vhdx"))
        (tmp / "journal").write_text(f"S {tracking.status(str(tmp / 'base.vhdx')).most_recent_id}\n")
        Workload(workload.__file__, tmp, case, cwd=tmp).kill_after(rng.uniform(0.4, 2.5), ready=False)
        journal = Journal(tmp / "journal")
        verify(tmp, journal)
        outcomes.append((len(journal.done), len(journal.ids), journal.merge_interrupted))
        for leftover in tmp.iterdir():
            leftover.unlink()
    # The kills must have landed in real work, not only at start-up.
    assert sum(1 for writes, _, _ in outcomes if writes > 10) >= cases // 2, outcomes
