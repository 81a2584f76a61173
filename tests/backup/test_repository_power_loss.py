"""Power loss under the repository: backups commit restore points while the power-loss recorder
(tests/powerloss.py) records every file operation in the repository; states a power cut could
leave are built and must verify clean, restore every point committed before the cut bit for bit,
and take the next backup (docs/testing.md, "Power loss")."""

from __future__ import annotations

import hashlib
import random
import shutil

import pytest
from powerloss import Recorder, mutation_shows

from hvbackup.backup.engine import backup_vm
from hvbackup.backup.repository import Repository
from hvbackup.backup.restore import restore_disk
from hvbackup.host import Host
from hvbackup.units import MiB

pytestmark = pytest.mark.slow
SIZES = [4 * MiB, 3 * MiB]


def digest_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def guest_digests(vm) -> list[str]:
    found = [hashlib.sha256(vm.disk(i).read(0, size)).hexdigest() for i, size in enumerate(SIZES)]
    vm.close_disks()
    return found


def record_backups(tmp_path) -> tuple[Recorder, object]:
    """Four backups of a VM whose disks change between them, the repository under the recorder; each
    commit marked with (step, point ID, the guest's disk digests)."""
    host = Host.init(str(tmp_path / "host"))
    vm = host.create_vm("web", SIZES, block_size=MiB)
    vm.request_state_change("start")
    root = tmp_path / "recorded"
    root.mkdir()
    Repository.init(str(root / "repo"), chunk_size=MiB)
    rng = random.Random(12)
    recorder = Recorder(str(root))
    with recorder.recording():
        for step in range(4):
            for _ in range(3):
                vm.disk(rng.randrange(2)).write(rng.randrange(3 * MiB), rng.randbytes(rng.choice([512, 70_000])))
            expected = guest_digests(vm)
            with Repository.open(str(root / "repo")).session() as session:
                point = backup_vm(session, vm).point_id
            recorder.mark((step, point, expected))
    return recorder, vm


def check_repository(directory: str, n: int, recorder: Recorder) -> Repository:
    """Verifies clean; every point committed in the first ``n`` operations restores bit for bit."""
    repo = Repository.open(f"{directory}/repo")
    assert repo.verify(read_data=True) == [], n
    for op in recorder.ops[:n]:
        if op.kind != "mark":
            continue
        _, point, expected = op.label
        assert point in repo.point_ids(), (n, point)
        for index, digest in enumerate(expected):
            restored = f"{directory}/{point}-{index}.raw"
            restore_disk(repo, point, index, restored, format="raw")
            assert digest_of(restored) == digest, (n, point, index)
    return repo


def test_power_cut_during_backups(tmp_path, sample):
    recorder, vm = record_backups(tmp_path)
    rng = random.Random(12)
    for case in range(sample(8, 10_000)):
        n = rng.choice(recorder.sync_points()) if case % 2 else rng.randint(1, len(recorder.ops))
        target = tmp_path / f"cut{case}"
        recorder.state_at(n, rng, str(target))
        repo = check_repository(str(target), n, recorder)
        with repo.session() as session:  # the next backup works on what the cut left
            assert backup_vm(session, vm).point_id in repo.point_ids()
        shutil.rmtree(target)


# The fsyncs the repository's write protocol relies on (docs/repository.md, "Writing a restore
# point"): a chunk file before its rename, the chunk directories before the manifest, the manifest
# before its rename, the points directory before the commit returns.
RELIED_ON = ["backup.writer:_finish", "backup.writer:sync_chunks", "backup.envelope:write_durable",
             "backup.writer:commit"]


@pytest.mark.parametrize("site", RELIED_ON)
def test_each_fsync_the_protocol_relies_on_is_needed(tmp_path, site):
    recorder, _ = record_backups(tmp_path)
    assert site in recorder.sync_sites()
    every_cut = list(range(1, len(recorder.ops) + 1))
    shown = mutation_shows(recorder, site, every_cut, check_repository, str(tmp_path))
    assert shown, f"without the fsyncs at {site}, every power-cut state verified"
