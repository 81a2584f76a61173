"""The block stack: the passthrough Filter, what ``stack`` composes over a format chain (and what
``disks`` alone does not), and the merge hooks."""

from __future__ import annotations

import os

import pytest

from hvbackup import disks, stack, tracking
from hvbackup.disks import Filter, MergeHooks
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.errors import DiskError
from hvbackup.tracking import TrackedDisk
from hvbackup.units import MiB

PROPERTIES = ("format", "disk_type", "path", "size", "block_size", "logical_sector_size", "physical_sector_size",
              "disk_id", "parent", "read_only", "closed", "write_alignment", "linkage_id")


@pytest.fixture(params=["vhdx", "vhd", "raw"])
def chain(request, tmp_path) -> str:
    """A differencing child with data in its parent (a raw image: the image alone)."""
    fmt = request.param
    base = str(tmp_path / f"base.{fmt}")
    with disks.create(base, 8 * MiB, format=fmt) as disk:
        disk.write(MiB, b"parent" * 1000)
    if fmt == "raw":
        return base
    child = str(tmp_path / f"child.a{fmt}")
    disks.create(child, type="differencing", parent=base).close()
    return child


def test_a_filter_that_overrides_nothing_is_the_disk_below(chain):
    with disks.open(chain) as disk:
        passed = Filter(disk)
        for name in PROPERTIES:
            assert getattr(passed, name) == getattr(disk, name), name
        assert passed.change_tracker() is None and passed.info() == disk.info()
        passed.write(3 * MiB + 7, b"through the filter")
        passed.trim(MiB, 4096)
        passed.flush()
        assert disk.read(3 * MiB + 7, 18) == b"through the filter"
        assert passed.read(0, 8 * MiB) == disk.read(0, 8 * MiB)
        assert list(passed.extents(MiB, 4 * MiB)) == list(disk.extents(MiB, 4 * MiB))
        with pytest.raises(DiskError, match="outside the disk"):  # the disk below checks
            passed.write(8 * MiB - 1, b"xx")
        passed.close()
        assert disk.closed and passed.closed


def test_a_filter_changes_only_what_it_overrides(tmp_path):
    class Doubling(Filter):
        def write(self, offset: int, data) -> None:
            self.next.write(offset, bytes(data) * 2)

    with Doubling(disks.create(str(tmp_path / "d.vhdx"), 8 * MiB)) as disk:
        disk.write(0, b"ab")
        assert disk.read(0, 4) == b"abab" and disk.size == 8 * MiB


def test_stack_open_tracks_a_tracked_vhdx_opened_for_writing_and_disks_never_does(tmp_path):
    path = str(tmp_path / "d.vhdx")
    stack.create(path, 64 * MiB).close()
    with stack.open(path) as untracked:
        assert type(untracked) is VhdxDisk and untracked.change_tracker() is None
    tracking.enable(path)
    with stack.open(path) as disk:
        assert type(disk) is TrackedDisk and disk.change_tracker() is disk and type(disk.next) is VhdxDisk
        assert "change_tracking" in disk.info()
    for read_only in (True, False):
        with disks.open(path, read_only=read_only) as raw, stack.open(path, read_only=True) as reader:
            assert type(raw) is VhdxDisk and type(reader) is VhdxDisk
    disks.create(str(tmp_path / "other.vhd"), MiB).close()
    with stack.open(str(tmp_path / "other.vhd")) as vhd:  # only a VHDX is tracked
        assert vhd.change_tracker() is None


def test_stack_create_continues_the_parent_history_and_disks_create_does_not(tmp_path):
    parent = str(tmp_path / "parent.vhdx")
    stack.create(parent, 64 * MiB).close()
    since = tracking.enable(parent).most_recent_id
    with stack.create(str(tmp_path / "child.avhdx"), type="differencing", parent=parent) as child:
        assert child.change_tracker() is child
        child.write(0, b"x")
    assert tracking.query(str(tmp_path / "child.avhdx"), since)[0] == [(0, 64 * 1024)]
    disks.create(str(tmp_path / "bare.avhdx"), type="differencing", parent=parent).close()
    assert tracking.status(str(tmp_path / "bare.avhdx")).state == "lost"  # the marker came, the history did not


def test_merge_calls_the_hooks_in_order(tmp_path):
    base, child = str(tmp_path / "base.vhd"), str(tmp_path / "child.avhd")
    disks.create(base, 8 * MiB).close()
    with disks.create(child, type="differencing", parent=base) as disk:
        disk.write(2 * MiB, b"c" * 4096)
    calls = []

    class Recording(MergeHooks):
        def before_writes(self, child_disk, parent_disk, written):
            calls.append(("before_writes", child_disk.path, parent_disk.path, not parent_disk.read_only,
                          [(e.offset, e.length) for e in written if e.state == "data"]))

        def after_flush(self, parent_disk):
            calls.append(("after_flush", parent_disk.read(2 * MiB, 1)))

        def after_delete(self, child_path):
            calls.append(("after_delete", child_path, os.path.exists(child_path)))

    assert disks.merge(child, hooks=Recording()) == base
    assert calls == [("before_writes", child, base, True, [(2 * MiB, 4096)]), ("after_flush", b"c"),
                     ("after_delete", child, False)]
