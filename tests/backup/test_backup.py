"""The backup engine end to end: real hosts, tracked VHDX disks, a real repository, restores compared
byte for byte with what the guest held when each backup was taken."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess

import pytest

from hvbackup import disks, stack, tracking
from hvbackup.backup import planner, readers
from hvbackup.backup.engine import backup_vm, backup_vms
from hvbackup.backup.geometry import Geometry
from hvbackup.backup.repository import Repository
from hvbackup.backup.restore import restore_disk, restore_vm
from hvbackup.errors import BackupError
from hvbackup.host import SNAPSHOT_TYPE_RECOVERY, Host, checkpoints, refpoints
from hvbackup.host.model import VmState
from hvbackup.units import MiB

CHUNK = MiB


@pytest.fixture
def setup(tmp_path):
    host = Host.init(str(tmp_path / "host"))
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
    return host, repo, tmp_path


def new_vm(host, name="web", sizes=(24 * MiB, 9 * MiB + 512 * 1024)):
    """A running VM whose disks hold the same data whatever its name (a tail chunk on disk 1)."""
    vm = host.create_vm(name, list(sizes), block_size=MiB)
    vm.request_state_change("start")
    fill = random.Random(5)
    for index in range(len(sizes)):
        vm.disk(index).write(index * 3 * MiB + 4096, fill.randbytes(2 * MiB + 777 * 512))
    return vm


def image(vm, index: int) -> bytes:
    disk = vm.disk(index)
    return disk.read(0, disk.size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def backup(repo, vm, **options):
    with repo.session() as session:
        return backup_vm(session, vm, **options)


def restored(repo, point_id: str, index: int, where) -> bytes:
    target = os.path.join(where, f"{point_id}-{index}.raw")
    restore_disk(repo, point_id, index, target, format="raw")
    with open(target, "rb") as f:
        return f.read()


@pytest.mark.parametrize("method", ["virtdisk", "export"])
def test_full_then_incrementals_restore_exactly(setup, method):
    host, repo, tmp = setup
    vm = new_vm(host)
    taken = []
    for round_no in range(3):
        result = backup(repo, vm, method=method)
        taken.append((result, [digest(image(vm, i)) for i in range(2)]))
        vm.disk(0).write(round_no * 5 * MiB + 12345 * 512, os.urandom(300_000))
        vm.disk(1).trim(3 * MiB, 64 << 10)
    kinds = [r.kind for r, _ in taken]
    assert kinds == ["full", "incremental", "incremental"]
    full, incremental = taken[0][0], taken[1][0]
    assert incremental.bytes_read <= 2 * CHUNK + 2 * CHUNK  # the chunks the two writes touched
    assert full.bytes_read >= 4 * MiB
    for result, digests in taken:
        assert result.method == method
        for index in range(2):
            assert digest(restored(repo, result.point_id, index, tmp)) == digests[index]
    assert repo.verify(read_data=True) == []
    # Only the newest reference point is kept; no recovery checkpoint is left.
    assert [r.instance_id for r in vm.reference_points()] == [taken[-1][0].reference_point]
    assert vm.checkpoints() == []


def chunk_lists(repo, result) -> list[list]:
    return [d.chunks.to_json() for d in repo.point(result.point_id).disks]


def test_both_methods_store_the_same_point_whichever_came_before(setup):
    """Three VMs with the same content, backed up by each method and by alternating ones: every
    round's points are identical chunk for chunk, though the export's incrementals are built from
    a differential laid over the base point's chunks and the virtdisk ones read the disk."""
    host, repo, tmp = setup
    orders = {"virtdisk": ["virtdisk"] * 3, "export": ["export"] * 3, "mixed": ["virtdisk", "export", "virtdisk"]}
    vms = {name: new_vm(host, name) for name in orders}
    content = os.urandom(3 * MiB)
    rounds = []
    for round_no in range(3):
        for vm in vms.values():
            vm.disk(0).write(round_no * 7 * MiB + 4096, content[:200_000 * (round_no + 1)])
            vm.disk(1).write(MiB + round_no * 512, content[:MiB])
            vm.disk(1).trim(2 * MiB, 4096 * round_no)
        rounds.append({name: backup(repo, vm, method=orders[name][round_no]) for name, vm in vms.items()})
    for results in rounds:
        assert len({str(chunk_lists(repo, r)) for r in results.values()}) == 1
    assert [r.kind for results in rounds[1:] for r in results.values()] == ["incremental"] * 6
    for name, vm in vms.items():
        assert restored(repo, rounds[-1][name].point_id, 1, tmp) == image(vm, 1)


def test_second_full_of_an_unchanged_vm_stores_almost_nothing(setup):
    host, repo, _ = setup
    vm = new_vm(host)
    backup(repo, vm)
    again = backup(repo, vm, full=True)
    assert again.kind == "full" and again.bytes_read > 0
    assert again.bytes_stored < MiB


def test_a_failed_backup_removes_its_checkpoint_and_keeps_the_base(setup):
    host, repo, tmp = setup
    vm = new_vm(host)
    good = backup(repo, vm)
    vm.disk(0).write(0, os.urandom(MiB))

    def fail(*_):
        raise OSError(28, "No space left on device")

    for method in ("virtdisk", "export"):
        with pytest.raises(BackupError, match="VM web: No space left on device"):  # whatever failed, named
            backup(repo, vm, method=method, progress=fail)
        assert vm.checkpoints() == []
        assert [r.instance_id for r in vm.reference_points()] == [good.reference_point]
        assert [p.point_id for p in repo.points()] == [good.point_id]
    after = backup(repo, vm)
    assert after.kind == "incremental" and after.base_point == good.point_id
    assert restored(repo, after.point_id, 0, tmp) == image(vm, 0)


@pytest.mark.parametrize("method", ["virtdisk", "export"])
def test_changes_made_offline_force_a_full_read_and_say_why(setup, method):
    host, repo, tmp = setup
    vm = new_vm(host)
    backup(repo, vm, method=method)
    vm.request_state_change("stop")
    vm.close_disks()
    # Written behind the host's back: change tracking cannot know what changed.
    active = vm.path_of(vm.config.disks[0].active)
    with disks.open(active) as raw_disk:
        raw_disk.write(5 * MiB, os.urandom(MiB))
    result = backup(repo, vm, method=method)  # an Off VM backs up too
    vm.request_state_change("start")
    # VirtDisk names the cause per disk; the host's export fails as a whole (32775), so every disk
    # of an export is read in full.
    expected = {"virtdisk": {0: readers.CHANGED_OFFLINE},
                "export": {0: readers.TRACKING_LOST, 1: readers.TRACKING_LOST}}[method]
    assert result.read_in_full == expected, result.notes
    assert restored(repo, result.point_id, 0, tmp) == image(vm, 0)
    assert restored(repo, result.point_id, 1, tmp) == image(vm, 1)
    following = backup(repo, vm, method=method)
    assert following.kind == "incremental", following.notes


@pytest.mark.parametrize("first, then", [("virtdisk", "export"), ("export", "virtdisk")])
def test_switching_methods_stays_incremental_and_reads_only_the_change(setup, first, then):
    host, repo, tmp = setup
    vm = new_vm(host)
    base = backup(repo, vm, method=first)
    vm.disk(0).write(9 * MiB + 512, os.urandom(100_000))  # inside one chunk
    result = backup(repo, vm, method=then)
    assert result.kind == "incremental" and result.base_point == base.point_id and result.read_in_full == {}
    assert result.bytes_read == CHUNK and result.notes == []
    assert restored(repo, result.point_id, 0, tmp) == image(vm, 0)


def test_stray_recovery_checkpoints_are_removed_first(setup):
    host, repo, _ = setup
    vm = new_vm(host)
    gone = subprocess.Popen(["true"])
    gone.wait()
    stray = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY, owner_pid=gone.pid)
    result = backup(repo, vm)
    assert any(stray.instance_id in note for note in result.notes)
    assert vm.checkpoints() == []


def test_several_vms_at_once(setup):
    host, repo, tmp = setup
    vms = [new_vm(host, f"vm{i}") for i in range(3)]
    expected = {vm.name: [image(vm, i) for i in range(2)] for vm in vms}
    seen = set()
    with repo.session() as session:
        outcomes = backup_vms(session, vms, progress=lambda name, done, total: seen.add(name))
    assert seen == set(expected)
    for outcome in outcomes:
        assert not isinstance(outcome, BackupError), outcome
        for index in range(2):
            assert restored(repo, outcome.point_id, index, tmp) == expected[outcome.vm][index]


def test_restore_a_vm_into_the_host(setup):
    host, repo, tmp = setup
    vm = new_vm(host)
    result = backup(repo, vm)
    copy = restore_vm(repo, result.point_id, host, name="web-restored")
    assert copy.vm_id != vm.vm_id and copy.name == "web-restored" and copy.state == VmState.OFF
    copy.request_state_change("start")
    assert [image(copy, i) for i in range(2)] == [image(vm, i) for i in range(2)]
    with pytest.raises(Exception, match="already has a VM named"):
        restore_vm(repo, result.point_id, host, name="web-restored")
    # The restored VM is a VM like any other: it backs up.
    assert backup(repo, copy).kind == "full"


def test_restore_refuses_to_overwrite(setup):
    host, repo, tmp = setup
    vm = new_vm(host)
    result = backup(repo, vm)
    target = tmp / "disk.vhdx"
    restore_disk(repo, result.point_id, 0, str(target))
    with disks.open(str(target), read_only=True) as disk:
        assert disk.read(0, disk.size) == image(vm, 0)
    with pytest.raises(Exception, match="already exists"):
        restore_disk(repo, result.point_id, 0, str(target))
    with pytest.raises(Exception, match="no disk 5"):
        restore_disk(repo, result.point_id, 5, str(tmp / "other.vhdx"))


def host_files(host) -> dict[str, int]:
    """Every file under the host directory and its size (bytes allocated: a sparse disk counts what it holds)."""
    found = {}
    for root, _, names in os.walk(host.directory):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, host.directory)] = os.stat(path).st_blocks * 512
    return found


def test_an_export_backup_leaves_the_host_nothing_but_the_vms_own_files(setup):
    host, repo, _ = setup
    vm = new_vm(host)
    os.makedirs(os.path.join(host.directory, "export-staging", vm.vm_id, repo.id))  # an older version's
    backup(repo, vm, method="virtdisk")
    vm.close_disks()
    before = host_files(host)
    assert not os.path.exists(os.path.join(host.directory, "export-staging"))
    for _ in range(2):
        vm.disk(0).write(5 * MiB, os.urandom(MiB))
        assert backup(repo, vm, method="export").kind == "incremental"
        vm.close_disks()
        after = host_files(host)
        assert sorted(after) == sorted(before)  # the same files: the VM's disks, tracking and documents
        assert sum(after.values()) <= sum(before.values()) + 2 * MiB  # grown by what the guest wrote, no copy


def test_why_a_disk_is_read_in_full_is_a_reason_code(setup):
    host, repo, _ = setup
    vm = new_vm(host)
    assert backup(repo, vm).read_in_full == {0: readers.NO_BASE, 1: readers.NO_BASE}
    assert backup(repo, vm, full=True).read_in_full == {0: readers.FULL_ASKED, 1: readers.FULL_ASKED}
    for point in vm.reference_points():
        refpoints.destroy_reference_point(vm, point.instance_id)
    assert backup(repo, vm).read_in_full == {0: readers.REFERENCE_POINT_GONE, 1: readers.REFERENCE_POINT_GONE}
    # Tracking lost: its side files deleted while the VM is off.
    vm.request_state_change("stop")
    vm.close_disks()
    active = vm.path_of(vm.config.disks[1].active)
    for side in ("rct", "mrt"):
        os.unlink(f"{active}.{side}")
    result = backup(repo, vm)
    assert result.read_in_full == {1: readers.TRACKING_LOST} and result.kind == "incremental", result.notes
    # A disk replaced by a larger one (the same attachment): resized.
    for method, size in (("virtdisk", 12 * MiB), ("export", 14 * MiB)):
        os.unlink(active)
        stack.create(active, size, block_size=MiB).close()
        tracking.enable(active)
        result = backup(repo, vm, method=method)
        assert result.read_in_full[1] == readers.RESIZED, result.notes
        assert repo.point(result.point_id).disks[1].geometry.virtual_size == size


def test_the_planner_cuts_ranges_at_chunk_boundaries():
    class Whole:
        whole = True
        geometry = Geometry(10 * CHUNK + 512, MiB, 512, 4096)

    class Differential(Whole):
        whole = False

    base = repo_index = None
    changes = readers.merged([(CHUNK - 512, 1024), (3 * CHUNK, 10), (3 * CHUNK + 5, 100), (10 * CHUNK, 512)])
    assert changes == [(CHUNK - 512, 1024), (3 * CHUNK, 105), (10 * CHUNK, 512)]
    assert planner.incremental(Whole(), changes, base, CHUNK).slots == [0, 1, 3, 10]
    patched = planner.incremental(Differential(), changes, repo_index, CHUNK)
    assert patched.patches == {0: [(CHUNK - 512, 512)], 1: [(CHUNK, 512)], 3: [(3 * CHUNK, 105)],
                               10: [(10 * CHUNK, 512)]}
    assert planner.slot_bytes(patched, CHUNK, Whole.geometry.virtual_size) == 3 * CHUNK + 512


def test_a_failure_after_the_commit_is_a_note_on_a_stored_point(setup, monkeypatch):
    """Once the point is committed the backup has succeeded: a failure tidying up afterwards (here,
    destroying the older reference point) is noted and the next backup tidies again."""
    from hvbackup.host import refpoints

    host, repo, tmp = setup
    vm = new_vm(host)
    first = backup(repo, vm)
    vm.disk(0).write(0, os.urandom(MiB))

    def refuse(*_):
        raise OSError(5, "Input/output error", "vm.json")

    monkeypatch.setattr(refpoints, "destroy_reference_point", refuse)
    second = backup(repo, vm)
    assert second.kind == "incremental" and any("tidying up afterwards failed" in n for n in second.notes)
    assert [p.point_id for p in repo.points()] == [first.point_id, second.point_id]
    monkeypatch.undo()
    third = backup(repo, vm)
    assert third.kind == "incremental" and [r.instance_id for r in vm.reference_points()] == [third.reference_point]
    assert restored(repo, third.point_id, 0, tmp) == image(vm, 0)
