"""Crash and corruption tests of the backup application (issue 5): backups, prunes and restores
SIGKILLed at random moments, and repositories with flipped bytes, truncated, deleted and swapped
files. After each: ``verify(read_data=True)`` reports the damage or ``restore`` refuses it, and no
restore ever produces wrong data without an error. Also a backup into a filesystem that fills up.

Real hosts, real repositories, real processes (tests/backup/backup_crash_workload.py is what gets killed).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import backup_crash_workload as workload
import pytest
from blake3 import blake3
from crash_harness import Workload

from hvbackup import disks
from hvbackup.backup.chunks import NAME, chunk_path
from hvbackup.backup.engine import backup_vm
from hvbackup.backup.readers import export as export_reader
from hvbackup.backup.repository import Repository
from hvbackup.backup.restore import restore_disk, restore_vm
from hvbackup.errors import BackupError, RepositoryError
from hvbackup.host import SNAPSHOT_TYPE_RECOVERY, Host, VmState, recovery
from hvbackup.units import MiB

CHUNK = 64 << 10  # the smallest chunk size: many chunk files, so prunes and restores take long enough to hit
SIZES = [8 * MiB, 6 * MiB + CHUNK // 2]  # disk 1 ends in a tail shorter than a chunk
PASSPHRASE = "x"


# -- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path) -> str:
    with open(path, "rb") as f:
        return sha(f.read())


def image_sha(path: str, format: str) -> str:
    if format == "raw":
        return file_sha(path)
    with disks.open(path, read_only=True) as disk:
        return sha(disk.read(0, disk.size))


def vm_disk_shas(vm) -> list[str]:
    return [workload.disk_hash(vm.disk(i)) for i in range(len(vm.config.disks))]


def restored_sha(repo: Repository, point: str, index: int, where: Path, format: str = "raw") -> str:
    target = where / f"{point}-{index}.{format}"
    restore_disk(repo, point, index, str(target), format=format)
    try:
        return image_sha(str(target), format)
    finally:
        target.unlink()


def spawn(*args) -> Workload:
    return Workload(workload.__file__, *args, env={"HVBACKUP_PASSPHRASE": PASSPHRASE})


def leftover_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# -- a prepared world: one host with two VMs, a plain and an encrypted repository, points with known contents


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two VMs given the same guest writes, each backed up four times (methods alternating, so
    fulls and incrementals) into its own repository, one of them encrypted. ``expected[point]`` is
    the sha256 of each disk of the VM when the point was taken."""
    root = tmp_path_factory.mktemp("world")
    host = Host.init(str(root / "host"))
    plain = Repository.init(str(root / "plain"), chunk_size=CHUNK)
    encrypted = Repository.init(str(root / "encrypted"), chunk_size=CHUNK, passphrase=PASSPHRASE)
    expected: dict[str, list[str]] = {}
    vms = []
    for name in ("a", "b"):
        vm = host.create_vm(name, SIZES, block_size=MiB)
        vm.request_state_change("start")
        vms.append(vm)
    for i in range(4):
        for vm in vms:
            workload.guest_writes(vm, random.Random(i), i + 1)
            # A larger rewrite every time so that forgotten points leave many chunks for prune.
            vm.disk(1).write(MiB, random.Random(100 + i).randbytes(2 * MiB))
            vm.disk(1).flush()
        for vm, repo in zip(vms, (plain, encrypted)):
            shas = vm_disk_shas(vm)
            with repo.session() as session:
                result = backup_vm(session, vm, method=("virtdisk", "export")[i % 2])
            expected[result.point_id] = shas
    for vm in vms:
        vm.close_disks()
    assert {p.kind for p in plain.points()} == {"full", "incremental"}
    return {"root": root, "host": host.directory, "plain": plain.path, "encrypted": encrypted.path,
            "expected": expected}


def open_repo(path: str) -> Repository:
    return Repository.open(path, passphrase=PASSPHRASE if path.endswith("encrypted") else None)


def copy_repo(world, which: str, to: Path) -> str:
    target = to / which  # same basename, so open_repo still knows which one is encrypted
    shutil.copytree(world[which], target)
    return str(target)


def check_points_restore(repo: Repository, expected: dict, where: Path, points=None) -> None:
    for point in points if points is not None else repo.point_ids():
        for index, want in enumerate(expected[point]):
            assert restored_sha(repo, point, index, where) == want, (point, index)


# -- 1. SIGKILL during backups


def read_log(path: str) -> tuple[dict[int, list[str]], dict[int, str], bool]:
    """B lines (n -> disk hashes), C lines (n -> point ID), and whether the last backup begun had
    not reported its commit (the kill fell inside a backup)."""
    begun, committed, inside = {}, {}, False
    if os.path.exists(path):
        for line in Path(path).read_text().splitlines():
            kind, n, *rest = line.split()
            if kind == "B":
                begun[int(n)], inside = rest, True
            else:
                committed[int(n)], inside = rest[0], False
    return begun, committed, inside


def await_recovery_checkpoint(vm, deadline: float) -> None:
    while time.monotonic() < deadline:
        # The document is replaced by rename, so reading it while the workload writes is safe.
        if any(c.snapshot_type == SNAPSHOT_TYPE_RECOVERY for c in vm.checkpoints()):
            return
        time.sleep(0.002)
    raise AssertionError("the workload never took a recovery checkpoint")


@pytest.mark.slow
def test_sigkill_during_backups(tmp_path, sample):
    """A workload of guest writes and backups (both methods) is killed again and again. After each
    kill: the repository verifies clean; every restore point restores bit-identical to the VM's disks
    when it was taken; the host reopens; stray recovery checkpoints are cleaned (by
    ``recovery.clean`` or by the next backup); a backup in this process works and restores to the VM's
    current disks; no recovery checkpoints or reference points pile up."""
    rng = random.Random(5)
    host = Host.init(str(tmp_path / "host"))
    vm = host.create_vm("crash", SIZES, block_size=MiB)
    vm.request_state_change("start")
    vm.close_disks()
    repo_dir = str(Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK).path)
    log = str(tmp_path / "log")
    checked: set[str] = set()
    last_marker = 0
    kills_inside_backup = orphans_seen = uncommitted_references = 0
    host_entries = sorted(os.listdir(host.directory))
    cases = sample(12, 60)
    for case in range(1, cases + 1):
        child = spawn("backup", host.directory, repo_dir, log, case)
        if case % 3:
            time.sleep(rng.uniform(0.4, 1.6))  # interpreter start-up and Host.open take about 0.3 s
        else:
            # Aimed: a recovery checkpoint exists only while a backup reads the disks (tens of ms of
            # each backup), so random kills rarely find one. Watch the VM's document for it instead.
            await_recovery_checkpoint(vm, deadline=time.monotonic() + 10)
            time.sleep(rng.uniform(0, 0.03))
        child.kill()
        begun, committed, inside = read_log(log)
        kills_inside_backup += inside

        repo = Repository.open(repo_dir)
        assert repo.verify(read_data=True) == [], case
        assert sorted(os.listdir(Path(repo_dir, "points"))) == repo.point_ids()  # nothing half-written in points/
        for n, point in committed.items():
            assert point in repo.point_ids(), f"backup {n} reported {point} committed, but it is gone"
        for point in repo.point_ids():
            if point in checked:
                continue
            shas = []
            for index in range(len(SIZES)):
                target = tmp_path / f"check{index}.raw"
                restore_disk(repo, point, index, str(target))
                if index == 0:
                    with open(target, "rb") as f:
                        marker = int.from_bytes(f.read(workload.MARKER), "little")
                shas.append(file_sha(target))
                target.unlink()
            # The marker says which backup took the point; its disks must be what that backup saw.
            assert marker in begun, (point, marker)
            assert shas == begun[marker], f"point {point} (backup {marker}) restores other data"
            assert committed.get(marker, point) == point
            assert marker > last_marker, "points out of order"  # workload points only; ours are in `checked`
            last_marker = marker
            checked.add(point)

        host = Host.open(host.directory)  # finishes or undoes what the kill interrupted
        vm = host.vm("crash")
        assert vm.load()["intent"] is None and vm.state == VmState.RUNNING
        strays = [c for owner, c, _ in recovery.find_orphans(host).checkpoints if owner.vm_id == vm.vm_id]
        orphans_seen += bool(strays)
        # Killed between converting its checkpoint and committing: a reference point no restore point
        # names. The next backup builds on the older one and then removes it (checked below).
        uncommitted_references += len(vm.reference_points()) > 1
        if case % 2:
            cleaned = recovery.clean(host)
            assert {c.instance_id for _, c, _ in cleaned.checkpoints} == {c.instance_id for c in strays}
            assert recovery.find_orphans(host).checkpoints == []
        # else: the next backup removes them itself (engine._remove_stray_checkpoints)

        want = vm_disk_shas(vm)
        with repo.session() as session:
            result = backup_vm(session, vm, method=("virtdisk", "export")[case // 2 % 2], full=case % 5 == 0)
        if strays and not case % 2:
            assert sum("stray recovery checkpoint" in note for note in result.notes) == len(strays)
        assert vm.checkpoints() == [], "a recovery checkpoint was left behind"
        assert [r.instance_id for r in vm.reference_points()] == [result.reference_point]
        assert recovery.find_orphans(host).to_dict() == {"checkpoints": [], "files": [], "damaged": []}
        assert [restored_sha(repo, result.point_id, i, tmp_path) for i in range(len(SIZES))] == want
        checked.add(result.point_id)
        assert leftover_files(Path(repo_dir, "tmp")) == []
        # Nothing beside the VMs: not this backup's export, nor one a killed run left.
        assert sorted(os.listdir(host.directory)) == host_entries
        vm.close_disks()  # the next workload opens them
    print(f"{cases} kills, {kills_inside_backup} inside a backup, {orphans_seen} left a recovery checkpoint, "
          f"{uncommitted_references} an uncommitted reference point, {len(checked)} points checked")
    assert len(checked) > cases, "the workload never committed a point: the kills came too early"
    assert kills_inside_backup >= cases // 3, "too few kills landed inside a backup"
    assert orphans_seen >= cases // 6, "the aimed kills left no recovery checkpoint behind"


# -- 2. SIGKILL during prune


def link_or_copy(source: str, destination: str) -> None:
    if os.path.basename(source) == "lock":  # its own inode, so its flock is its own
        shutil.copy2(source, destination)
    else:
        os.link(source, destination)


@pytest.mark.slow
def test_sigkill_during_prune(world, tmp_path, sample):
    """Two of four points forgotten, prune killed at random moments: the repository stays sound,
    the remaining points restore, and a second prune finishes the job."""
    template = tmp_path / "template"
    template.mkdir()
    path = copy_repo(world, "plain", template)
    repo = Repository.open(path)
    points = repo.point_ids()
    for point in points[1:3]:
        repo.forget(point)
    remaining = repo.point_ids()
    before = len(list(Path(path, "chunks").rglob("*")))
    # How long a whole prune takes, on a copy: kills are spread over that window.
    timing = tmp_path / "timing"
    timing.mkdir()
    shutil.copytree(path, timing / "plain", copy_function=link_or_copy)
    duration = spawn("prune", timing / "plain").run_to_the_end()
    after = len(list(Path(timing, "plain", "chunks").rglob("*")))
    assert before - after > 40

    rng = random.Random(6)
    interrupted = mid_sweep = 0
    for case in range(sample(8, 40)):
        where = tmp_path / f"case{case}"
        where.mkdir()
        # Prune only unlinks chunk files and adds new ones, so a hard-linked copy is as good as a copy.
        shutil.copytree(path, where / "plain", copy_function=link_or_copy)
        child = spawn("prune", where / "plain")
        interrupted += child.kill_after(rng.uniform(0, duration * 1.2))
        mid_sweep += before > len(list(Path(where, "plain", "chunks").rglob("*"))) > after
        repo = Repository.open(str(where / "plain"))
        assert repo.verify(read_data=True) == []
        assert repo.point_ids() == remaining
        for point in remaining:
            for index, want in enumerate(world["expected"][point]):
                assert sha(b"".join(data for _, data in repo.read_disk(point, index))) == want
        repo.prune()
        assert len(list(Path(repo.path, "chunks").rglob("*"))) == after
        assert repo.verify(read_data=True) == []
        check_points_restore(repo, world["expected"], where)
        shutil.rmtree(where)
    print(f"{interrupted} kills inside a prune of {duration:.3f} s, {mid_sweep} with some chunks deleted")
    assert interrupted >= 1, f"no kill landed inside a prune (a prune takes {duration:.3f} s)"


# -- 3. SIGKILL during restore


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["restore-disk-raw", "restore-disk-vhdx", "restore-vm"])
def test_sigkill_during_restore(world, tmp_path, sample, mode):
    """A restore killed at random moments leaves either nothing under the target's name or a
    complete, correct result; a host never holds half a VM; running the restore again works."""
    repo = open_repo(world["encrypted"] if mode == "restore-vm" else world["plain"])
    point = repo.point_ids()[-1]
    want = world["expected"][point]
    format = "vhdx" if mode == "restore-disk-vhdx" else "raw"

    def check_vm(host: Host, name: str) -> None:
        vm = host.vm(name)
        assert vm.state == VmState.OFF
        for index, attachment in enumerate(vm.config.disks):
            assert image_sha(vm.path_of(attachment.active), "vhdx") == want[index]

    # Time one whole restore to aim the kills.
    timing = tmp_path / "timing"
    timing.mkdir()
    if mode == "restore-vm":
        timing_host = Host.init(str(timing / "host")).directory
        duration = spawn("restore-vm", repo.path, point, timing_host, "copy").run_to_the_end()
    else:
        duration = spawn("restore-disk", repo.path, point, 0, timing / f"disk.{format}", format).run_to_the_end()

    rng = random.Random(7)
    interrupted = stray_partials = 0
    for case in range(sample(4, 20)):
        where = tmp_path / f"case{case}"
        where.mkdir()
        if mode == "restore-vm":
            host = Host.init(str(where / "host"))
            host.create_vm("other", [MiB])  # a host that already has a VM
            child = spawn("restore-vm", repo.path, point, host.directory, "copy")
        else:
            target = where / f"disk.{format}"
            child = spawn("restore-disk", repo.path, point, 0, target, format)
        interrupted += child.kill_after(rng.uniform(0, duration * 1.2))

        if mode == "restore-vm":
            host = Host.open(host.directory)  # removes a half-built VM's staging directory
            assert not [d for d in os.listdir(Path(host.directory, "vms")) if d.endswith(".partial")]
            names = sorted(vm.name for vm in host.vms())
            assert names in (["other"], ["copy", "other"]), names
            assert recovery.find_orphans(host).to_dict() == {"checkpoints": [], "files": [], "damaged": []}
            if names == ["other"]:
                restore_vm(repo, point, host, name="copy")
            check_vm(Host.open(host.directory), "copy")
        else:
            # Nothing but the target itself is visible; hidden temporary files may remain. (A kill
            # inside disks.create leaves "..NAME.restoring.<random>.partial", which no rerun removes:
            # reported, not fixed here.)
            assert [n for n in leftover_files(where) if not n.startswith(".")] in ([], [target.name])
            assert all(n.startswith(f".{target.name}.") or n.startswith(f"..{target.name}.restoring.")
                       for n in leftover_files(where) if n.startswith("."))
            if target.exists():  # then it is whole and right
                assert image_sha(str(target), format) == want[0]
            else:
                restore_disk(repo, point, 0, str(target), format=format)
                assert image_sha(str(target), format) == want[0]
            assert f".{target.name}.restoring" not in leftover_files(where), "the rerun left its temporary file"
            stray_partials += sum(n.endswith(".partial") for n in leftover_files(where))
        shutil.rmtree(where)
    print(f"{interrupted} kills inside a restore of {duration:.3f} s")
    assert interrupted >= 1, f"no kill landed inside a restore (a restore takes {duration:.3f} s)"
    if stray_partials:
        print(f"{stray_partials} stray .partial files left by killed restores")


# -- 4. corruption
#
# This repository format has no index files (restic's index/, Borg's hints and index): which chunks
# exist is the chunks/ directory itself, and which points exist is points/. The one small file every
# reader depends on the way others depend on an index is `config` (repository ID, chunk size, wrapped
# key), so the config plays the index's part in these cases.
#
# Each case damages one or two files of a shared working copy of the world's repositories and puts
# their bytes back afterwards (copying a repository per case would dominate the run time).


def flip_at(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


def flip_and_reseal(path: Path, at: int) -> None:
    """Change a payload byte and recompute the frame's BLAKE3 checksum: gets past the checksum to
    what the content must satisfy (hash of the name, AEAD tag, zstd, manifest structure)."""
    data = bytearray(path.read_bytes())
    data[24 + at % (len(data) - 56)] ^= 0x01
    data[-32:] = blake3(bytes(data[:-32])).digest()
    path.write_bytes(bytes(data))


DAMAGES = {
    "flip magic": lambda p: flip_at(p, 0),
    "flip version": lambda p: flip_at(p, 8),
    "flip flags": lambda p: flip_at(p, 10),
    "flip length": lambda p: flip_at(p, 17),
    "flip payload start": lambda p: flip_at(p, 30),
    "flip payload middle": lambda p: flip_at(p, p.stat().st_size // 2),
    "flip checksum": lambda p: flip_at(p, -1),
    "flip and reseal": lambda p: flip_and_reseal(p, 7),
    "flip and reseal late": lambda p: flip_and_reseal(p, -3),
    "truncate empty": lambda p: os.truncate(p, 0),
    "truncate header": lambda p: os.truncate(p, 20),
    "truncate half": lambda p: os.truncate(p, p.stat().st_size // 2),
    "truncate last byte": lambda p: os.truncate(p, p.stat().st_size - 1),
    "append byte": lambda p: p.write_bytes(p.read_bytes() + b"\0"),
    "delete": lambda p: p.unlink(),
}


def repo_files(path: str) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(path).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def shared(world, tmp_path_factory):
    """Working copies of both repositories, opened once (scrypt takes a while), and their files."""
    root = tmp_path_factory.mktemp("damaged")
    repos = {which: open_repo(copy_repo(world, which, root)) for which in ("plain", "encrypted")}
    return {which: (repo, repo_files(repo.path)) for which, repo in repos.items()}


@pytest.fixture
def undamaged(shared):
    """``undamaged(which)``: the shared working copy; after the test every file is as it was."""
    used = []

    def get(which: str) -> Repository:
        used.append(which)
        return shared[which][0]

    yield get
    for which in used:
        repo, original = shared[which]
        now = {str(p) for p in Path(repo.path).rglob("*") if p.is_file()}
        for path in now - original.keys():
            os.unlink(path)
        for path, data in original.items():
            if not os.path.exists(path) or Path(path).read_bytes() != data:
                Path(path).write_bytes(data)


def referencing(repo: Repository, name: str) -> set[tuple[str, int]]:
    return {(point, d.index) for point in repo.point_ids() for d in repo.point(point).disks
            if name in d.chunks.to_json()}


def assert_outcome(repo: Repository, world, where: Path, affected: set[tuple[str, int]], points: list[str],
                   *, verify_must_see: bool = True) -> None:
    """Verify reports the damage; every affected (point, disk) refuses to restore and leaves no
    file; every other one reads back exactly."""
    problems = repo.verify(read_data=True)
    if verify_must_see:
        assert problems, "verify found nothing wrong"
    for point in points:
        for index, want in enumerate(world["expected"][point]):
            if (point, index) in affected:
                for format in ("raw", "vhdx"):
                    with pytest.raises(RepositoryError):
                        restore_disk(repo, point, index, str(where / f"{point}-{index}.{format}"), format=format)
                assert leftover_files(where) == [], "a refused restore left a file"
            else:  # through the same checked chunk reader restore uses, without writing a file
                assert sha(b"".join(data for _, data in repo.read_disk(point, index))) == want, (point, index)


@pytest.mark.parametrize("which", ["plain", "encrypted"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_chunk(world, undamaged, tmp_path, which, damage):
    repo = undamaged(which)
    points = repo.point_ids()
    # A chunk of the first point that the last one no longer uses: some points lose it, some do not.
    first, last = ({c for d in repo.point(p).disks for _, c in d.chunks.items()} for p in (points[0], points[-1]))
    name = sorted(first - last)[0]
    affected = referencing(repo, name)
    assert affected and len(affected) < len(points) * len(SIZES)
    DAMAGES[damage](Path(chunk_path(repo.path, name)))
    assert_outcome(repo, world, tmp_path, affected, points)


@pytest.mark.parametrize("which", ["plain", "encrypted"])
def test_chunk_renamed_onto_another(world, undamaged, tmp_path, which):
    """A chunk file moved onto another chunk's name: the content no longer hashes to the name (plain)
    or the AEAD tag, which binds the name, fails (encrypted); the moved-away name is missing."""
    repo = undamaged(which)
    points = repo.point_ids()
    disks0 = repo.point(points[0]).disks
    source, destination = disks0[1].chunks.name_at(MiB // CHUNK), disks0[0].chunks.name_at(0)
    assert source and destination and source != destination
    os.rename(chunk_path(repo.path, source), chunk_path(repo.path, destination))
    assert_outcome(repo, world, tmp_path, referencing(repo, source) | referencing(repo, destination), points)


@pytest.mark.parametrize("which", ["plain", "encrypted"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_manifest(world, undamaged, tmp_path, which, damage):
    repo = undamaged(which)
    points = repo.point_ids()
    victim = points[1]
    DAMAGES[damage](Path(repo.path, "points", victim))
    # A deleted manifest is indistinguishable from a forgotten point (there is no index to miss it
    # from), so verify cannot report it; restore refuses the point ("no restore point").
    assert_outcome(repo, world, tmp_path, {(victim, i) for i in range(len(SIZES))}, points,
                   verify_must_see=damage != "delete")
    if damage != "delete":
        with pytest.raises(RepositoryError):
            repo.prune()  # never deletes chunks a damaged manifest may still need


@pytest.mark.parametrize("which", ["plain", "encrypted"])
def test_manifest_renamed_onto_another(world, undamaged, tmp_path, which):
    """The point ID inside a manifest (and, encrypted, its AEAD binding) must match its file name."""
    repo = undamaged(which)
    points = repo.point_ids()
    os.rename(Path(repo.path, "points", points[0]), Path(repo.path, "points", points[2]))
    assert_outcome(repo, world, tmp_path, {(p, i) for p in points[0:3:2] for i in range(len(SIZES))}, points)


def reseal_config(path: Path, edit) -> None:
    """Rewrite the config's JSON through ``edit`` with a valid checksum (what a hand edit would be)."""
    data = path.read_bytes()
    config = json.loads(data[24:-32])
    edit(config)
    payload = json.dumps(config, indent=1).encode()
    header = data[:16] + len(payload).to_bytes(8, "little")
    path.write_bytes(header + payload + blake3(header + payload).digest())


CONFIG_EDITS = {
    "chunk size": lambda c: c.update(chunk_size=2 * CHUNK),
    "id": lambda c: c.update(id="0" * 32),
    "hash": lambda c: c.update(hash="sha256"),
    "format": lambda c: c.update(format=2),
    "salt": lambda c: c.update(encryption={**(c["encryption"] or {}), "salt": "0" * 64}),
}


@pytest.mark.parametrize("which", ["plain", "encrypted"])
@pytest.mark.parametrize("damage", [d for d in sorted(DAMAGES) if "reseal" not in d]
                         + [f"edit {e}" for e in sorted(CONFIG_EDITS)])
def test_damaged_config(world, undamaged, tmp_path, which, damage):
    """A damaged config refuses to open with a RepositoryError. One edited with a valid checksum
    either refuses to open (encrypted: the wrapped key is bound to the ID and chunk size) or every
    point refuses to restore (the manifests carry the repository ID and chunk size)."""
    path = undamaged(which).path
    config = Path(path, "config")
    if damage.startswith("edit "):
        reseal_config(config, CONFIG_EDITS[damage[5:]])
    else:
        DAMAGES[damage](config)
    try:
        repo = open_repo(path)
    except RepositoryError as exc:
        assert str(exc)
        return
    assert which == "plain" and damage in ("edit chunk size", "edit id"), "a damaged config opened"
    points = repo.point_ids()
    assert_outcome(repo, world, tmp_path, {(p, i) for p in points for i in range(len(SIZES))}, points)


# -- a full filesystem


@pytest.mark.parametrize("method, full_part", [("virtdisk", "repository"), ("export", "repository"),
                                               ("export", "export")])
def test_backup_into_a_full_filesystem(tmp_path, small_fs, monkeypatch, method, full_part):
    """A backup that runs out of space (storing chunks, or the host exporting the changes) fails
    with a clear BackupError, removes its recovery checkpoint and the export, keeps the last
    reference point, and leaves the repository sound; once there is room again the next backup
    works and restores exactly."""
    host = Host.init(str(tmp_path / "host"))
    vm = host.create_vm("big", SIZES, block_size=MiB)
    vm.request_state_change("start")
    in_small = full_part == "repository"
    # Room for the first, sparse export (about 8.4 MiB) and not the second; or too little for the chunks.
    small = small_fs(6 * MiB if in_small else 12 * MiB)
    repo = Repository.init(str((small if in_small else tmp_path) / "repo"), chunk_size=CHUNK)
    exporting = small / "exporting"
    if not in_small:
        monkeypatch.setattr(export_reader, "export_directory", lambda vm: str(exporting))
    workload.guest_writes(vm, random.Random(1), 1)
    with repo.session() as session:
        first = backup_vm(session, vm, method=method)
    first_shas = vm_disk_shas(vm)
    for index, size in enumerate(SIZES):  # incompressible data, more than the filesystem holds
        vm.disk(index).write(0, random.Random(index).randbytes(size))
        vm.disk(index).flush()
    with pytest.raises(BackupError, match="No space left on device") as failed:
        with repo.session() as session:
            backup_vm(session, vm, method=method)
    assert ("cannot store chunk" if in_small else "exporting") in str(failed.value)
    assert vm.checkpoints() == []
    assert [r.instance_id for r in vm.reference_points()] == [first.reference_point]
    assert repo.point_ids() == [first.point_id]
    assert repo.verify(read_data=True) == []
    assert leftover_files(Path(repo.path, "tmp")) == []
    assert not exporting.exists()
    repo.prune()  # the chunks the failed backup stored are garbage now

    subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
    want = vm_disk_shas(vm)
    with repo.session() as session:
        second = backup_vm(session, vm, method=method)
    assert second.kind == "incremental", second.notes
    assert vm.checkpoints() == [] and [r.instance_id for r in vm.reference_points()] == [second.reference_point]
    out = tmp_path / "out"
    out.mkdir()
    assert [restored_sha(repo, second.point_id, i, out) for i in range(len(SIZES))] == want
    assert [restored_sha(repo, first.point_id, i, out) for i in range(len(SIZES))] == first_shas
    vm.close_disks()


def test_every_chunk_name_is_a_name(world):
    """The corruption cases pick files by name; make sure the layout is what they assume."""
    for which in ("plain", "encrypted"):
        names = [p.name for p in Path(world[which], "chunks").rglob("*") if p.is_file()]
        assert names and all(NAME.match(n) for n in names)
