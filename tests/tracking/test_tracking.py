"""Change tracking: IDs, exact answers, sealing, the side files, foreign writers and damage."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tools import libvhdi_read, qemu_check, qemu_io, run

from hvbackup import disks, stack, tracking
from hvbackup.errors import TrackingError, TrackingFormatError
from hvbackup.tracking.changemap import ChangeMap
from hvbackup.tracking.ids import RctId
from hvbackup.tracking.mrtfile import MIN_REGION, MrtState
from hvbackup.tracking.rctfile import EarlierLineage, RctState, Retirement
from hvbackup.units import MiB
from hvbackup.winerror import (
    ERROR_CTLOG_INCONSISTENT_TRACKING_FILE,
    ERROR_CTLOG_VHD_CHANGED_OFFLINE,
    ERROR_VHD_CHANGE_TRACKING_DISABLED,
    ERROR_VHD_INVALID_CHANGE_TRACKING_ID,
    ERROR_VHD_INVALID_TYPE,
    ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION,
)

G = 64 * 1024  # the default granularity


@pytest.fixture
def tracked(tmp_path) -> str:
    path = str(tmp_path / "disk.vhdx")
    stack.create(path, 256 * MiB, block_size=MiB).close()
    tracking.enable(path)
    return path


def first_id(path: str) -> str:
    return tracking.status(path).most_recent_id


def code_of(call) -> int:
    with pytest.raises(TrackingError) as info:
        call()
    return info.value.code


def test_id_round_trip_and_shape():
    text = "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001"
    parsed = RctId.parse(text)
    assert parsed == RctId(uuid.UUID("5bfde23b-ce75-4303-b54f-6c18394f105c"), 1)
    assert str(parsed) == text


@pytest.mark.parametrize("text", ["", "rctX:", "rct:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001",
                                  "rctX:5bfde23b-ce75-4303-b54f-6c18394f105c:00000001",
                                  "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:1", "x" * 300])
def test_malformed_ids_are_invalid(tracked, text):
    assert code_of(lambda: tracking.query(tracked, text)) == ERROR_VHD_INVALID_CHANGE_TRACKING_ID


def test_enabling_seals_the_first_point(tracked):
    status = tracking.status(tracked)
    assert status.enabled and not status.newer_changes and status.state == "active"
    assert RctId.parse(status.most_recent_id).sequence == 1
    assert tracking.query(tracked, status.most_recent_id) == ([], 256 * MiB)
    assert os.path.exists(tracked + ".rct") and os.path.exists(tracked + ".mrt")


def test_writes_are_reported_exactly_at_the_granularity(tracked):
    start = first_id(tracked)
    with stack.open(tracked) as disk:
        disk.write(G - 1, b"ab")                # straddles granules 0 and 1
        disk.write(10 * G + 5, b"c")            # inside granule 10
        disk.trim(100 * G, 3 * G)               # trims count as writes
        disk.write(255 * MiB, bytes(MiB))       # the last MiB, zeros still count
        live, covered = disk.query(start, 0, disk.size)
        assert disk.status().newer_changes
    expected = [(0, 2 * G), (10 * G, G), (100 * G, 3 * G), (255 * MiB, MiB)]
    assert live == expected and covered == 256 * MiB
    assert tracking.query(tracked, start) == (expected, 256 * MiB)


def test_closing_after_writes_seals_and_closing_without_does_not(tracked):
    start = first_id(tracked)
    with stack.open(tracked):
        pass
    assert first_id(tracked) == start
    with stack.open(tracked) as disk:
        disk.write(0, b"x")
    second = first_id(tracked)
    assert RctId.parse(second).sequence == 2 and not tracking.status(tracked).newer_changes
    assert tracking.query(tracked, second)[0] == []
    assert tracking.query(tracked, start)[0] == [(0, G)]


def test_explicit_seal_splits_history(tracked):
    start = first_id(tracked)
    with stack.open(tracked) as disk:
        disk.write(0, b"1")
        middle = disk.seal()
        assert not disk.status().newer_changes
        disk.write(5 * G, b"2")
        assert disk.query(middle, 0, disk.size)[0] == [(5 * G, G)]
        assert disk.query(start, 0, disk.size)[0] == [(0, G), (5 * G, G)]
    assert tracking.query(tracked, middle)[0] == [(5 * G, G)]
    sealed = tracking.seal(tracked)
    assert RctId.parse(sealed).sequence == RctId.parse(middle).sequence + 2 and sealed == first_id(tracked)
    assert tracking.query(tracked, sealed)[0] == []


def test_query_window_clips_and_pages(tracked):
    start = first_id(tracked)
    with stack.open(tracked) as disk:
        for i in range(0, 40, 2):
            disk.write(i * G, b"x")
    ranges, covered = tracking.query(tracked, start, G // 2, 9 * G)
    assert ranges == [(G // 2, G // 2), (2 * G, G), (4 * G, G), (6 * G, G), (8 * G, G)]
    assert covered == 9 * G
    collected, offset = [], 0
    while offset < 256 * MiB:
        page, done = tracking.query(tracked, start, offset, 256 * MiB - offset, max_ranges=3)
        assert len(page) <= 3 and done > 0
        collected += page
        offset += done
    assert collected == tracking.query(tracked, start)[0]


def test_ids_from_the_future_and_other_disks_are_invalid(tracked, tmp_path):
    current = RctId.parse(first_id(tracked))
    future = str(RctId(current.lineage, current.sequence + 1))
    stranger = str(RctId(uuid.uuid4(), 1))
    assert code_of(lambda: tracking.query(tracked, future)) == ERROR_VHD_INVALID_CHANGE_TRACKING_ID
    assert code_of(lambda: tracking.query(tracked, stranger)) == ERROR_VHD_INVALID_CHANGE_TRACKING_ID


def test_disabled_tracking_refuses_queries(tmp_path):
    path = str(tmp_path / "plain.vhdx")
    stack.create(path, 16 * MiB).close()
    assert not tracking.status(path).enabled
    assert code_of(lambda: tracking.query(path, str(RctId(uuid.uuid4(), 1)))) == ERROR_VHD_CHANGE_TRACKING_DISABLED
    with stack.open(path) as disk:
        assert type(disk).__name__ == "VhdxDisk"  # no filter, no side files
    assert not os.path.exists(path + ".rct")


def test_switching_off_ends_the_history(tracked):
    start = first_id(tracked)
    tracking.disable(tracked)
    assert not os.path.exists(tracked + ".rct") and not os.path.exists(tracked + ".mrt")
    assert code_of(lambda: tracking.query(tracked, start)) == ERROR_VHD_CHANGE_TRACKING_DISABLED
    tracking.enable(tracked)
    assert code_of(lambda: tracking.query(tracked, start)) == ERROR_VHD_INVALID_CHANGE_TRACKING_ID


def test_only_vhdx_can_be_tracked(tmp_path):
    path = str(tmp_path / "old.vhd")
    stack.create(path, 16 * MiB, format="vhd").close()
    assert code_of(lambda: tracking.enable(path)) == ERROR_VHD_INVALID_TYPE
    assert code_of(lambda: tracking.seal(path)) == ERROR_VHD_INVALID_TYPE


def test_granularity_is_configurable(tmp_path):
    path = str(tmp_path / "fine.vhdx")
    stack.create(path, 16 * MiB).close()
    assert tracking.enable(path, granularity=4096).granularity == 4096
    start = first_id(path)
    with stack.open(path) as disk:
        disk.write(8192, b"x")
    assert tracking.query(path, start)[0] == [(8192, 4096)]
    tracking.disable(path)
    for wrong in (3000, 2048, 512 * MiB):
        with pytest.raises(TrackingError):
            tracking.enable(path, granularity=wrong)


# -- foreign writers ---------------------------------------------------------------------------

def test_qemu_io_write_is_detected_as_an_offline_change(tracked):
    start = first_id(tracked)
    with stack.open(tracked) as disk:
        disk.write(0, b"ours")
    ours = first_id(tracked)
    qemu_io(tracked, "vhdx", "write -P 0x5a 1M 64k")
    status = tracking.status(tracked)
    assert status.state == "changed_offline" and status.enabled and status.most_recent_id is None
    for old in (start, ours):
        assert code_of(lambda old=old: tracking.query(tracked, old)) == ERROR_CTLOG_VHD_CHANGED_OFFLINE
    # The next tracked writer starts a new history; the old IDs keep their reason.
    with stack.open(tracked) as disk:
        disk.write(2 * MiB, b"new")
    fresh = tracking.status(tracked)
    assert fresh.state == "active" and RctId.parse(fresh.most_recent_id).lineage != RctId.parse(start).lineage
    assert code_of(lambda: tracking.query(tracked, start)) == ERROR_CTLOG_VHD_CHANGED_OFFLINE


def test_a_restart_ends_the_lineages_the_history_continued_from(tmp_path):
    """A child continues its parent's lineage (its IDs hold on the child); when the child is then
    changed offline and restarts, the parent's IDs must fail too — the new map has none of their
    changes — and the restarted history must save and load (it once kept the fork point, larger
    than the new history's first point, and its .rct was refused as damaged)."""
    parent, child = str(tmp_path / "parent.vhdx"), str(tmp_path / "child.avhdx")
    stack.create(parent, 64 * MiB, block_size=MiB).close()
    tracking.enable(parent)
    for offset in (0, MiB):
        with stack.open(parent) as disk:
            disk.write(offset, b"sealed on close")
    inherited = first_id(parent)
    stack.create(child, type="differencing", parent=parent).close()
    assert tracking.query(child, inherited)[0] == []
    with disks.open(child) as disk:
        disk.write(4 * MiB, b"behind tracking's back")
    assert tracking.status(child).state == "changed_offline"
    with stack.open(child) as disk:
        disk.write(8 * MiB, b"restarted")
    restarted = tracking.status(child)
    assert restarted.state == "active" and restarted.problem is None
    assert code_of(lambda: tracking.query(child, inherited)) == ERROR_CTLOG_VHD_CHANGED_OFFLINE


def test_qemu_reads_and_opens_without_writing_change_nothing(tracked):
    with stack.open(tracked) as disk:
        disk.write(0, b"\x11" * 4096)
    qemu_check(tracked, "vhdx")
    assert "read 4096/4096" in qemu_io(tracked, "vhdx", "read -P 0x11 0 4k")
    assert libvhdi_read(tracked, 0, 4096) == b"\x11" * 4096
    run("vhdiinfo", tracked)
    assert tracking.status(tracked).state == "active"


# -- damaged side files ---------------------------------------------------------------------------

@pytest.mark.parametrize("side", [".rct", ".mrt"])
def test_deleted_side_file_means_lost(tracked, side):
    start = first_id(tracked)
    os.unlink(tracked + side)
    status = tracking.status(tracked)
    assert status.state == "lost" and status.enabled and status.most_recent_id is None
    assert code_of(lambda: tracking.query(tracked, start)) == ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION
    with stack.open(tracked) as disk:
        disk.write(0, b"x")
    assert tracking.status(tracked).state == "active"
    assert code_of(lambda: tracking.query(tracked, start)) == ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION


def test_both_side_files_deleted_means_lost(tracked):
    os.unlink(tracked + ".rct")
    os.unlink(tracked + ".mrt")
    assert tracking.status(tracked).state == "lost"


@pytest.mark.parametrize("side", [".rct", ".mrt"])
def test_every_flipped_byte_in_a_side_file_means_lost(tracked, side):
    with stack.open(tracked) as disk:
        disk.write(3 * MiB, b"x")
    start = first_id(tracked)
    path = tracked + side
    original = open(path, "rb").read()
    step = max(1, len(original) // 97)
    checked = 0
    for at in range(0, len(original), step):
        damaged = bytearray(original)
        damaged[at] ^= 0x40
        open(path, "wb").write(damaged)
        status = tracking.status(tracked)
        assert status.state == "lost", f"byte {at} of {side}"
        assert code_of(lambda: tracking.query(tracked, start)) == ERROR_CTLOG_INCONSISTENT_TRACKING_FILE
        checked += 1
    open(path, "wb").write(original)
    assert checked > 10 and tracking.status(tracked).state == "active"


def test_truncated_and_swapped_side_files_mean_lost(tracked, tmp_path):
    other = str(tmp_path / "other.vhdx")
    stack.create(other, 256 * MiB, block_size=MiB).close()
    tracking.enable(other)
    os.replace(other + ".rct", tracked + ".rct")  # another disk's history
    assert tracking.status(tracked).state == "lost"
    with open(other + ".mrt", "r+b") as f:
        f.truncate(100)
    assert tracking.status(other).state == "lost"



def test_damaged_side_files_name_the_rule_they_break():
    size = 256 * MiB
    rct = RctState(uuid.uuid4(), 1, uuid.uuid4(), ChangeMap(size, G), []).pack()
    mrt = MrtState(uuid.uuid4(), 1, size, MIN_REGION).pack()
    for unpack, data, virtual_size, reason in [
        (RctState.unpack, rct[:50], size, "rct.file.truncated"),
        (RctState.unpack, b"X" + rct[1:], size, "rct.header.magic"),
        (RctState.unpack, rct[:-1] + bytes([rct[-1] ^ 1]), size, "rct.file.checksum"),
        (RctState.unpack, rct, size + 512, "rct.header.virtual-size"),
        (MrtState.unpack, mrt[:50], size, "mrt.file.truncated"),
        (MrtState.unpack, b"X" + mrt[1:], size, "mrt.header.magic"),
        (MrtState.unpack, mrt[:-1] + b"\1", size, "mrt.file.checksum"),
        (MrtState.unpack, mrt, size + 512, "mrt.header.geometry"),
    ]:
        with pytest.raises(TrackingFormatError) as caught:
            unpack(data, virtual_size)
        assert caught.value.reason == reason


@given(st.lists(st.integers(0, 4), min_size=1, max_size=300))
def test_rct_round_trips_in_either_encoding(epochs):
    size = len(epochs) * G - 1000  # the last granule is partial
    changes = ChangeMap(size, G, np.array(epochs, dtype=np.uint32))
    saved = RctState(uuid.uuid4(), 3, uuid.uuid4(), changes, [EarlierLineage(uuid.uuid4(), Retirement.LOST),
                                                              EarlierLineage(uuid.uuid4(), Retirement.CONTINUED, 2)])
    loaded = RctState.unpack(saved.pack(), size)
    assert loaded.changes.epochs.tolist() == epochs and loaded.retired == saved.retired
    assert (loaded.lineage, loaded.last_sealed, loaded.data_write_guid) == (saved.lineage, 3, saved.data_write_guid)


def _reference_changes(epochs: list[int], sequence: int, start: int, end: int) -> list[tuple[int, int]]:
    """Runs of granules with an epoch above ``sequence`` meeting [start, end), clipped: by hand."""
    ranges: list[list[int]] = []
    for g, epoch in enumerate(epochs):
        low, high = max(g * G, start), min((g + 1) * G, end)
        if epoch > sequence and low < high:
            if ranges and ranges[-1][1] == low:
                ranges[-1][1] = high
            else:
                ranges.append([low, high])
    return [(a, b - a) for a, b in ranges]


@given(st.lists(st.integers(0, 4), min_size=1, max_size=200), st.integers(1, 9), st.data())
def test_whole_map_passes_agree_across_window_edges(epochs, window, data):
    """Queries, saving and loading walk the map in windows (2^20 granules); with tiny windows every
    run edge falls on or near one. Each answer is checked against a by-hand reading of the map."""
    from hvbackup.tracking import changemap

    size = len(epochs) * G - data.draw(st.integers(0, G - 512)) // 512 * 512
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(changemap, "WINDOW", window)
        changes = ChangeMap(size, G, np.array(epochs, dtype=np.uint32))
        loaded = RctState.unpack(RctState(uuid.uuid4(), 4, uuid.uuid4(), changes, []).pack(), size).changes
        assert loaded.epochs.tolist() == epochs
        sequence = data.draw(st.integers(0, 4))
        start = data.draw(st.integers(0, size - 1))
        end = data.draw(st.integers(start + 1, size))  # an empty window is answered before the map
        expected = _reference_changes(epochs, sequence, start, end)
        assert loaded.changed_since(sequence, start, end, 1 << 20) == (expected, end)
        limit = data.draw(st.integers(1, 5))
        ranges, complete = loaded.changed_since(sequence, start, end, limit)
        assert ranges == expected[:limit]
        assert complete == (end if len(expected) <= limit else min(end, -(-sum(ranges[-1]) // G) * G))


def test_ids_of_a_discarded_branch_are_not_answered_on_another(tracked, tmp_path):
    """Applying a checkpoint: a second child of the same parent is another branch of history."""
    before = first_id(tracked)
    first, second = str(tmp_path / "first.avhdx"), str(tmp_path / "second.avhdx")
    with stack.create(first, type="differencing", parent=tracked) as disk:
        disk.write(0, b"discarded")
    on_first = first_id(first)
    os.unlink(first)
    with stack.create(second, type="differencing", parent=tracked) as disk:
        disk.write(5 * G, b"kept")
    assert code_of(lambda: tracking.query(second, on_first)) == ERROR_VHD_INVALID_CHANGE_TRACKING_ID
    assert tracking.query(second, before)[0] == [(5 * G, G)]  # the parent's IDs still hold
    stack.merge(second)
    assert tracking.query(tracked, before)[0] == [(5 * G, G)]
    assert code_of(lambda: tracking.query(tracked, on_first)) == ERROR_VHD_INVALID_CHANGE_TRACKING_ID
