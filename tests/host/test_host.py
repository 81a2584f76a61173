"""The host: VMs, guest I/O, checkpoints (create, apply, destroy), reference points, recovery of
interrupted operations, and orphan clean-up."""

from __future__ import annotations

import datetime
import os

import pytest

from hvbackup import disks, stack, tracking
from hvbackup.errors import HostError
from hvbackup.host import SNAPSHOT_TYPE_RECOVERY, Host, VmState, checkpoints, recovery, refpoints
from hvbackup.units import MiB

G = 64 * 1024


@pytest.fixture
def vm(host):
    vm = host.create_vm("web", [64 * MiB, 32 * MiB])
    vm.request_state_change("start")
    yield vm
    vm.close_disks()


def disk_files(vm) -> list[str]:
    return sorted(os.listdir(vm.path_of("Virtual Hard Disks")))


def test_create_vm_makes_tracked_disks(host):
    vm = host.create_vm("db", [16 * MiB], processors=2, memory_mb=2048, notes="test")
    summary = vm.summary()
    assert summary["state"] == "Off" and summary["processors"] == 2 and len(summary["disks"]) == 1
    assert tracking.status(summary["disks"][0]).state == "active"
    assert Host.open(host.directory).vm("db").vm_id == vm.vm_id
    with pytest.raises(HostError):
        host.create_vm("db", [16 * MiB])


def test_state_changes_follow_hyper_v(vm):
    assert vm.state == VmState.RUNNING
    vm.request_state_change("save")
    assert vm.state == VmState.SAVED and os.path.exists(vm.path_of("runtime-state.vmrs"))
    with pytest.raises(HostError) as info:
        vm.request_state_change("pause")
    assert info.value.return_value == 32775
    vm.request_state_change("start")
    vm.request_state_change("stop")
    with pytest.raises(HostError):
        vm.disk(0).write(0, b"x")  # an Off VM has no guest I/O


def test_checkpoint_freezes_disks_and_writes_go_to_the_avhdx(vm):
    vm.disk(0).write(0, b"A" * MiB)
    checkpoint = checkpoints.create(vm, name="before")
    vm.disk(0).write(0, b"B" * MiB)
    frozen = vm.path_of(checkpoint.disks[0].frozen)
    vm.close_disks()
    with disks.open(frozen, read_only=True) as d:
        assert d.read(0, 1) == b"A"
    assert vm.config.disks[0].active.endswith(".avhdx")
    ranges, _ = tracking.query(vm.path_of(vm.config.disks[0].active), checkpoint.disks[0].rct_id)
    assert ranges == [(0, MiB)]


def test_apply_returns_to_the_checkpoint(vm):
    vm.disk(0).write(0, b"A")
    checkpoint = checkpoints.create(vm)
    vm.disk(0).write(0, b"B")
    checkpoints.apply(vm, checkpoint.instance_id)
    assert vm.state == VmState.SAVED  # taken while running: applied as saved
    vm.request_state_change("start")
    assert vm.disk(0).read(0, 1) == b"A"
    vm.close_disks()
    assert len(disk_files(vm)) == 2 * 3 + 2 * 3  # two disks: base and a new AVHDX, each with .rct/.mrt


def test_destroying_checkpoints_merges_back_in_any_order(vm):
    vm.disk(0).write(0, b"1")
    first = checkpoints.create(vm)
    vm.disk(0).write(MiB, b"2")
    second = checkpoints.create(vm)
    vm.disk(0).write(2 * MiB, b"3")
    checkpoints.destroy(vm, first.instance_id)  # not the newest: later files are re-pointed
    assert [vm.disk(0).read(o, 1) for o in (0, MiB, 2 * MiB)] == [b"1", b"2", b"3"]
    checkpoints.destroy(vm, second.instance_id)
    vm.close_disks()
    assert vm.config.disks[0].chain == [os.path.join("Virtual Hard Disks", "web_disk0.vhdx")]
    assert disk_files(vm) == sorted(f"web_disk{i}.vhdx{s}" for i in (0, 1) for s in ("", ".rct", ".mrt"))
    assert stack.check(vm.path_of(vm.config.disks[0].active)).ok


def test_reference_point_keeps_rct_ids_and_answers_later_changes(vm):
    vm.disk(0).write(0, b"A" * MiB)
    backup = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY, owner_pid=os.getpid())
    point = refpoints.convert_to_reference_point(vm, backup.instance_id)
    assert point.virtual_disk_identifiers == [d.instance_id for d in backup.disks]
    assert point.resilient_change_tracking_identifiers == [d.rct_id for d in backup.disks]
    assert vm.checkpoints() == [] and [r.instance_id for r in vm.reference_points()] == [point.instance_id]
    vm.disk(0).write(5 * MiB, b"B")
    nxt = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY, owner_pid=os.getpid())
    frozen = vm.path_of(nxt.disks[0].frozen)
    assert tracking.query(frozen, point.resilient_change_tracking_identifiers[0])[0] == [(5 * MiB, G)]
    refpoints.destroy_reference_point(vm, point.instance_id)
    assert vm.reference_points() == []


def test_only_recovery_checkpoints_become_reference_points(vm):
    standard = checkpoints.create(vm)
    with pytest.raises(HostError) as info:
        refpoints.convert_to_reference_point(vm, standard.instance_id)
    assert info.value.return_value == 32775


def test_stray_recovery_checkpoints_and_unrecorded_files_are_cleaned(vm, host):
    vm.disk(0).write(0, b"A")
    gone = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY, owner_pid=2 ** 22 + 12345)
    live = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY, owner_pid=os.getpid())
    unowned = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    vm.close_disks()
    stray = os.path.join("Virtual Hard Disks", "web_disk0_LEFTOVER.avhdx")
    stack.create(vm.path_of(stray), type="differencing", parent=vm.path_of(vm.config.disks[0].active)).close()
    found = recovery.find_orphans(host)
    assert [c.instance_id for _, c, _ in found.checkpoints] == [gone.instance_id]
    assert [f for _, f in found.files] == [stray]
    assert [c.instance_id for _, c, _ in recovery.find_orphans(host, max_age=datetime.timedelta(0)).checkpoints] \
        == [gone.instance_id, unowned.instance_id]
    recovery.clean(host)
    assert [c.instance_id for c in vm.checkpoints()] == [live.instance_id, unowned.instance_id]
    assert not os.path.exists(vm.path_of(stray))
    assert vm.disk(0).read(0, 1) == b"A"


def test_an_interrupted_checkpoint_creation_is_undone_on_open(vm, host):
    vm.close_disks()
    document = vm.load()
    leftover = os.path.join("Virtual Hard Disks", "web_disk0_HALF.avhdx")
    stack.create(vm.path_of(leftover), type="differencing", parent=vm.path_of(vm.config.disks[0].active)).close()
    document["intent"] = {"op": "create_checkpoint", "files": [leftover]}
    vm.save(document)
    Host.open(host.directory)
    assert not os.path.exists(vm.path_of(leftover)) and vm.load()["intent"] is None


CONCURRENT_WORKER = """
import sys
from hvbackup.host import Host, checkpoints
host = Host.open(sys.argv[1])
vm = host.vm("web")
for i in range(12):
    c = checkpoints.create(vm, name=f"{sys.argv[2]}-{i}")
    if i % 3:
        checkpoints.destroy(vm, c.instance_id)
"""


def test_concurrent_processes_are_serialised(host):
    import subprocess
    import sys

    vm = host.create_vm("web", [16 * MiB])
    workers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WORKER, host.directory, name]) for name in "ab"]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    names = sorted(c.name for c in vm.checkpoints())
    assert names == sorted(f"{w}-{i}" for w in "ab" for i in range(0, 12, 3))
    document = vm.load()
    assert document["intent"] is None
    recorded = {f for files in document["files"].values() for f in files}
    on_disk = {os.path.join("Virtual Hard Disks", f) for f in disk_files(vm) if f.endswith(("vhdx", "avhdx"))}
    assert recorded == on_disk
    for name in recorded:
        assert stack.check(vm.path_of(name)).ok
