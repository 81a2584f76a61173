"""Power loss, not only a killed process: the disk workload of the crash tests runs in this process
under the power-loss recorder (tests/powerloss.py), and at its sync boundaries and between them,
states a power cut could leave — unsynced writes lost, reordered or torn at 512 B / 4 KiB, names not
yet made durable undone — are built, opened (replaying the log) and checked: every acknowledged
write reads back, nothing never written appears, `disk check` and qemu-img find nothing."""

from __future__ import annotations

import random
import shutil

import crash_workload as workload
import pytest
from powerloss import Recorder, mutation_shows
from test_crash import KINDS, prepare, verify

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", KINDS)
def test_power_cut_during_disk_writes(tmp_path, kind, sample):
    seed = 9000 + KINDS.index(kind)
    root = tmp_path / "recorded"
    root.mkdir()
    path = prepare(root, kind)
    recorder = Recorder(str(root))
    with recorder.recording():
        workload.run(path, seed, recorder.mark)
    syncs = recorder.sync_points()
    assert len(syncs) > 20, "the workload must sync often enough to be worth cutting"
    rng = random.Random(seed)
    for case in range(sample(12, 3400)):  # --full: 3 kinds x 3400 states
        n = rng.choice(syncs) if case % 2 else rng.randint(1, len(recorder.ops))
        target = tmp_path / f"cut{case}"
        recorder.state_at(n, rng, str(target))
        acked = recorder.acknowledged(n)
        verify(str(target / "disk.vhdx"), kind, seed, -1 if acked is None else acked)
        shutil.rmtree(target)  # a full run makes thousands; only a failing one is kept


# The fsyncs the disk engine's design relies on, by the function that asks for them (docs/disks.md,
# "What is written when"): a metadata commit flushes payload data and then its log entry before
# anything points at them; a flush() makes acknowledged writes durable. (docs/testing.md, "Power
# loss", says what the two other sites, journal:_apply and header:update, still need shown.)
RELIED_ON = ["disks.vhdx.journal:commit", "disks.vhdx.disk:flush"]


@pytest.mark.parametrize("site", RELIED_ON)
def test_each_fsync_the_design_relies_on_is_needed(tmp_path, site):
    """Mutation by mutation: the same recording without the syncs asked for at ``site`` must leave a
    state that fails verification, or the power-loss test above could not see that fsync go."""
    root = tmp_path / "recorded"
    root.mkdir()
    path = prepare(root, "dynamic")
    recorder = Recorder(str(root))
    with recorder.recording():
        workload.run(path, 9000, recorder.mark)
    assert site in recorder.sync_sites()

    def check(directory: str, n: int, mutated: Recorder) -> None:
        acked = mutated.acknowledged(n)
        verify(f"{directory}/disk.vhdx", "dynamic", 9000, -1 if acked is None else acked)

    # A missing sync shows when a write after it lands and one before it does not: cut after writes.
    after_writes = [n for n, op in enumerate(recorder.ops, 1) if op.kind == "write"]
    assert mutation_shows(recorder, site, after_writes, check, str(tmp_path)), f"without {site}'s fsyncs all verify"
