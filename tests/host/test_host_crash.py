"""The host survives SIGKILL in the middle of guest writes, checkpoint creation, merges (destroy,
convert to reference point): it reopens consistent, every acknowledged guest write is there, and
``checkpoint clean`` removes whatever the dead process left behind."""

from __future__ import annotations

import datetime
import os
import random
import shutil

import host_crash_workload as workload
import pytest
from crash_harness import Workload

from hvbackup import stack, tracking
from hvbackup.host import Host, VmState, recovery
from hvbackup.units import MiB

pytestmark = pytest.mark.slow
PENDING_LOG = "the log holds metadata updates not yet applied"


def expected_slots(journal: str) -> dict[int, set[int]]:
    """For each slot, the sequence numbers it may hold: its last acknowledged write's, or any write
    begun after that (which may or may not have reached the disk)."""
    allowed: dict[int, set[int]] = {}
    with open(journal) as f:
        for line in f:
            kind, seq, slot = line.split()
            seq, slot = int(seq), int(slot)
            if kind == "A":
                allowed[slot] = {seq}
            else:
                allowed.setdefault(slot, {0}).add(seq)
    return allowed


def verify(directory: str) -> dict:
    host = Host.open(directory)  # finishes or undoes what the kill interrupted
    vm = host.vm("crash")
    document = vm.load()
    assert document["intent"] is None
    for files in document["files"].values():
        for name in files:
            assert os.path.exists(vm.path_of(name)), name
            problems = stack.check(vm.path_of(name)).problems
            # A log the kill left pending is what a crash leaves; the next writer replays it.
            assert all(PENDING_LOG in p for p in problems), (name, problems)
    cleaned = recovery.clean(host, max_age=datetime.timedelta(0))
    assert recovery.find_orphans(host, max_age=datetime.timedelta(0)).to_dict() == {"checkpoints": [], "files": [],
                                                                                     "damaged": []}
    for checkpoint in vm.checkpoints():  # what survives the clean still reads
        for d in checkpoint.disks:
            assert os.path.exists(vm.path_of(d.frozen))
    assert tracking.status(vm.path_of(vm.config.disks[0].active)).state == "active"
    if vm.state != VmState.RUNNING:
        vm.request_state_change("start")
    disk = vm.disk(0)
    for slot, allowed in expected_slots(os.path.join(directory, "journal")).items():
        held = int.from_bytes(disk.read(slot * workload.SLOT, 8), "little")
        assert held in allowed, f"slot {slot} holds write {held}, expected one of {sorted(allowed)}"
    vm.close_disks()
    return cleaned.to_dict()


def test_sigkill_during_host_operations(tmp_path, sample):
    rng = random.Random(4)
    cases = sample(10, 40)
    cleaned_something = 0
    for case in range(cases):
        directory = str(tmp_path / f"host{case}")
        host = Host.init(directory)
        vm = host.create_vm("crash", [workload.SLOTS * workload.SLOT], block_size=MiB)
        vm.request_state_change("start")
        Workload(workload.__file__, directory, case).kill_after(rng.uniform(0.6, 3.0), ready=False)
        cleaned = verify(directory)
        cleaned_something += bool(cleaned["checkpoints"] or cleaned["files"])
        shutil.rmtree(directory)
    assert cleaned_something >= cases // 3  # the kills left recovery checkpoints behind, and clean took them
