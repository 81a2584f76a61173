"""GFS retention (hvbackup.backup.retention): which points each rule keeps, per VM, in UTC."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvbackup.backup.manifest import Manifest
from hvbackup.backup.retention import plan
from hvbackup.errors import RepositoryError

DAY = 86400


def at(text: str) -> float:
    """'2026-03-01 12:00' in UTC as epoch seconds."""
    date, clock = text.split()
    y, m, d = map(int, date.split("-"))
    hh, mm = map(int, clock.split(":"))
    return float(calendar.timegm((y, m, d, hh, mm, 0)))


def point(n: int, when: float, vm: str = "vm-a") -> Manifest:
    return Manifest(f"p{n:04d}", "repo", 1 << 20, vm_id=vm, vm_name=vm.upper(), ended=when, started=when - 60)


def kept(keep: list[dict]) -> dict[str, list[str]]:
    return {k["point_id"]: k["reasons"] for k in keep}


def test_keep_last_keeps_the_newest_in_any_input_order():
    points = [point(i, at("2026-03-01 00:00") + i * 3600) for i in range(6)]
    keep, forget = plan(list(reversed(points)), keep_last=2)
    assert kept(keep) == {"p0004": ["last"], "p0005": ["last"]}
    assert [f["point_id"] for f in forget] == ["p0000", "p0001", "p0002", "p0003"]  # oldest first
    assert set(forget[0]) == {"point_id", "vm_id", "vm_name", "time"}
    assert forget[0]["time"] == points[0].ended


def test_daily_keeps_the_newest_of_each_of_the_latest_days_with_points():
    points = [point(0, at("2026-03-01 08:00")), point(1, at("2026-03-01 20:00")),
              point(2, at("2026-03-04 09:00")),                      # days 2 and 3 have none
              point(3, at("2026-03-05 01:00")), point(4, at("2026-03-05 23:59"))]
    keep, forget = plan(points, keep_daily=3)
    assert kept(keep) == {"p0001": ["daily"], "p0002": ["daily"], "p0004": ["daily"]}
    assert {f["point_id"] for f in forget} == {"p0000", "p0003"}


def test_days_are_utc_days():
    # 23:30 and 00:30 UTC the next day are two days, whatever the local time zone says.
    keep, _ = plan([point(0, at("2026-03-01 23:30")), point(1, at("2026-03-02 00:30"))], keep_daily=2)
    assert len(keep) == 2


def test_weekly_uses_iso_weeks_across_a_year_end():
    # 2025-12-29 (Mon) .. 2026-01-04 (Sun) are all ISO week 2026-W01.
    points = [point(0, at("2025-12-22 10:00")),  # W52 of 2025
              point(1, at("2025-12-29 10:00")), point(2, at("2026-01-01 10:00")), point(3, at("2026-01-04 10:00")),
              point(4, at("2026-01-05 10:00"))]  # W02
    keep, _ = plan(points, keep_weekly=3)
    assert kept(keep) == {"p0000": ["weekly"], "p0003": ["weekly"], "p0004": ["weekly"]}


def test_monthly_keeps_the_last_point_of_each_month():
    points = [point(i, at(f"2026-{m:02d}-{d:02d} 12:00")) for i, (m, d) in
              enumerate([(1, 3), (1, 30), (2, 1), (2, 27), (4, 2)])]
    keep, _ = plan(points, keep_monthly=2)
    assert kept(keep) == {"p0003": ["monthly"], "p0004": ["monthly"]}
    keep, _ = plan(points, keep_monthly=10)
    assert set(kept(keep)) == {"p0001", "p0003", "p0004"}


def test_rules_combine_and_each_kept_point_says_why():
    points = [point(i, at("2026-01-01 06:00") + i * DAY) for i in range(40)]
    keep, forget = plan(points, keep_last=1, keep_daily=3, keep_weekly=2, keep_monthly=2)
    reasons = kept(keep)
    assert reasons["p0039"] == ["last", "daily", "weekly", "monthly"]       # 2026-02-09, a Monday
    assert reasons["p0038"] == ["daily", "weekly"] and reasons["p0037"] == ["daily"]  # Sunday ends W06
    assert reasons["p0030"] == ["monthly"]                                  # 2026-01-31
    assert len(keep) + len(forget) == 40 and set(reasons) == {"p0030", "p0037", "p0038", "p0039"}


def test_policies_apply_to_each_vm_on_its_own():
    points = [point(i, at("2026-03-01 00:00") + i * 60, vm="vm-a" if i % 3 else "vm-b") for i in range(9)]
    keep, _ = plan(points, keep_last=1)
    assert {(k["vm_id"], k["point_id"]) for k in keep} == {("vm-a", "p0008"), ("vm-b", "p0006")}
    assert {k["vm_name"] for k in keep} == {"VM-A", "VM-B"}


def test_a_point_without_an_end_is_placed_by_its_start():
    p = point(0, at("2026-03-01 00:00"))
    p.ended = None
    keep, _ = plan([p, point(1, at("2026-02-01 00:00"))], keep_last=1)
    assert kept(keep) == {"p0000": ["last"]} and keep[0]["time"] == p.started


def test_equal_times_break_ties_by_point_id():
    keep, _ = plan([point(2, 1000.0), point(1, 1000.0)], keep_last=1)
    assert kept(keep) == {"p0002": ["last"]}


def test_nothing_to_judge_keeps_and_forgets_nothing():
    assert plan([], keep_last=1) == ([], [])


@pytest.mark.parametrize("policy, words", [
    ({}, "keeps nothing"),
    ({"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}, "keeps nothing"),
    ({"keep_last": -1, "keep_daily": 3}, "--keep-last"),
    ({"keep_weekly": 1.5}, "--keep-weekly"),
])
def test_a_policy_that_keeps_nothing_or_makes_no_sense_is_refused(policy, words):
    with pytest.raises(RepositoryError, match=words):
        plan([point(0, 1000.0)], **policy)


def test_a_point_without_any_time_is_refused():
    with pytest.raises(RepositoryError, match="p0000"):
        plan([Manifest("p0000", "repo", 1 << 20, vm_id="x")], keep_last=1)


# Points of up to three VMs over about a year, some at the same instant.
POINTS = st.lists(st.tuples(st.sampled_from(["vm-a", "vm-b", "vm-c"]),
                            st.integers(at("2025-06-01 00:00"), at("2026-06-01 00:00")) | st.just(1.8e9)),
                  max_size=60).map(lambda items: [point(i, float(t), vm) for i, (vm, t) in enumerate(items)])
COUNT = st.integers(0, 8)


@given(POINTS, COUNT, COUNT, COUNT, COUNT)
def test_plan_properties(points, last, daily, weekly, monthly):
    policy = {"keep_last": last, "keep_daily": daily, "keep_weekly": weekly, "keep_monthly": monthly}
    if not any(policy.values()):
        with pytest.raises(RepositoryError):
            plan(points, **policy)
        return
    keep, forget = plan(points, **policy)
    kept_ids, forgot_ids = [k["point_id"] for k in keep], [f["point_id"] for f in forget]
    assert sorted(kept_ids + forgot_ids) == sorted(p.point_id for p in points)
    assert not set(kept_ids) & set(forgot_ids)
    for entries in (keep, forget):
        assert [e["time"] for e in entries] == sorted(e["time"] for e in entries)
    reasons = kept(keep)
    assert all(r and len(set(r)) == len(r) for r in reasons.values())
    for vm in {p.vm_id for p in points}:
        newest_first = sorted((p for p in points if p.vm_id == vm), key=lambda p: (p.ended, p.point_id),
                              reverse=True)
        assert newest_first[0].point_id in reasons  # any rule above 0 keeps a VM's newest point
        assert {p.point_id for p in newest_first[:last]} == {
            p.point_id for p in newest_first if "last" in reasons.get(p.point_id, [])}
        for rule, count in (("daily", daily), ("weekly", weekly), ("monthly", monthly)):
            by_rule = [p for p in newest_first if rule in reasons.get(p.point_id, [])]
            assert len(by_rule) <= count
        # The number of days that have points bounds what daily keeps, and daily reaches it when it can.
        days = {int(p.ended // DAY) for p in newest_first}
        assert len([p for p in newest_first if "daily" in reasons.get(p.point_id, [])]) == min(daily, len(days))
