"""The backup application under damage, failure, concurrency and interruption, driven through the CLI
as a user meets it: a repository heals and isolates damage; one failing VM does not take the others
down; each repository keeps its own reference point; Ctrl-C and SIGTERM clean up; restore targets
follow their names; the cost of an incremental follows what changed, not the disk's size."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backup_world import digests, error, file_digest, guest_write, new_vm

from hvbackup import disks
from hvbackup.backup.chunks import chunk_path
from hvbackup.backup.repository import Repository
from hvbackup.host import Host
from hvbackup.units import MiB


def restores_exactly(hv, tmp, point_id: str, expected: list[str]) -> None:
    for index, want in enumerate(expected):
        target = tmp / f"check-{point_id}-{index}-{random.getrandbits(32)}.img"
        result = hv("restore", point_id, "--disk", index, "--to", target)
        assert result.returncode == 0, result.stderr
        assert file_digest(target) == want
        target.unlink()


def chunks_of(repo_dir, point_id: str, index: int = 0) -> list[str]:
    return [name for _, name in Repository.open(str(repo_dir)).point(point_id).disks[index].chunks.items()]


# -- a backup repository heals and isolates damage


def test_a_missing_chunk_is_stored_again_by_the_next_backup(hv, hv_json, where):
    host, tmp = where
    vm = new_vm(host)
    [first] = hv_json("backup", "web")
    lost = chunks_of(tmp / "repo", first["point_id"])[0]
    os.unlink(chunk_path(str(tmp / "repo"), lost))
    result = hv("verify")
    assert result.returncode == 1 and lost in result.stdout and first["point_id"] in result.stdout

    [full] = hv_json("backup", "web", "--full")  # reads the disk: the lost chunk's data is there
    assert full["bytes_stored"] > 0
    assert hv("verify", "--read-data").returncode == 0
    restores_exactly(hv, tmp, first["point_id"], digests(vm))  # the old point is whole again


def test_an_incremental_reads_again_what_its_base_lost(hv, hv_json, where):
    """An unchanged range is taken from the base point, unless the repository lost its chunk: then the
    incremental reads it from the disk and stores it again (and says so)."""
    host, tmp = where
    vm = new_vm(host)
    [first] = hv_json("backup", "web")
    lost = chunks_of(tmp / "repo", first["point_id"])[0]
    os.unlink(chunk_path(str(tmp / "repo"), lost))
    guest_write(vm, 1, 0, os.urandom(4096))  # a change elsewhere
    [second] = hv_json("backup", "web")
    assert second["kind"] == "incremental"
    assert any("missing or damaged in the repository; read again" in note for note in second["notes"])
    assert second["bytes_read"] <= 3 * MiB  # the changed chunk and the lost one, not the disk
    assert hv("verify", "--read-data").returncode == 0
    restores_exactly(hv, tmp, second["point_id"], digests(vm))


def test_an_export_over_a_base_with_lost_chunks_reads_in_full_and_says_why(hv, hv_json, where):
    """The export's differential is laid over the base point's chunks; with one of them lost there is
    nothing to lay it over, so the host exports in full and the lost chunk is stored again."""
    host, tmp = where
    vm = new_vm(host)
    [first] = hv_json("backup", "web", "--method", "export")
    os.unlink(chunk_path(str(tmp / "repo"), chunks_of(tmp / "repo", first["point_id"])[0]))
    guest_write(vm, 1, 0, os.urandom(4096))
    [second] = hv_json("backup", "web", "--method", "export")
    assert second["kind"] == "full" and second["read_in_full"] == {"0": "base-chunks-lost", "1": "base-chunks-lost"}
    assert hv("verify", "--read-data").returncode == 0
    restores_exactly(hv, tmp, first["point_id"], digests(vm)[:1])  # the first point is whole again (disk 0 unchanged)
    restores_exactly(hv, tmp, second["point_id"], digests(vm))


@pytest.mark.parametrize("damage", ["flip", "truncate", "zeros"])
def test_a_damaged_chunk_found_by_verify_is_stored_again_by_the_next_backup(hv, hv_json, where, damage):
    host, tmp = where
    vm = new_vm(host)
    [first] = hv_json("backup", "web")
    expected = digests(vm)
    name = chunks_of(tmp / "repo", first["point_id"])[1]
    path = Path(chunk_path(str(tmp / "repo"), name))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(len(data))
    path.write_bytes(bytes(data))
    # A torn or zeroed file's frame no longer fits it, which the plain check sees; a flipped byte in
    # the data only reading can tell.
    assert hv("verify").returncode == (0 if damage == "flip" else 1)
    found = hv("verify", "--read-data", "--json")
    assert found.returncode == 1
    report = json.loads(found.stdout)
    assert report["damaged_chunks"] == [name] and report["set_aside"] == [name]
    assert [u["point_id"] for u in report["unrestorable"]] == [first["point_id"]]
    assert (tmp / "repo" / "damaged" / "chunks" / name).is_file() and not path.exists()
    text = hv("verify")
    assert text.returncode == 1 and f"chunk {name}" in text.stdout and "back up their VMs" in text.stderr

    guest_write(vm, 1, 5 * MiB, os.urandom(512))
    [second] = hv_json("backup", "web")  # incremental, and it heals the base's lost chunk
    assert second["kind"] == "incremental"
    assert hv("verify", "--read-data").returncode == 0
    restores_exactly(hv, tmp, first["point_id"], expected)


def test_verify_repair_makes_the_repository_sound_and_names_the_unrestorable_points(hv, hv_json, where):
    host, tmp = where
    vm = new_vm(host)
    [old] = hv_json("backup", "web")
    guest_write(vm, 0, 0, os.urandom(16 * MiB))  # disk 0's old data is gone from the VM
    [new] = hv_json("backup", "web")
    gone = sorted(set(chunks_of(tmp / "repo", old["point_id"])) - set(chunks_of(tmp / "repo", new["point_id"])))[0]
    os.unlink(chunk_path(str(tmp / "repo"), gone))
    Path(tmp / "repo" / "points" / "20990101T000000.000000Z-00000000").write_bytes(b"junk")
    assert hv("verify").returncode == 1

    repaired = hv_json("verify", "--repair")
    moved = {p["point_id"] for p in repaired["set_aside_points"]}
    assert moved == {old["point_id"], "20990101T000000.000000Z-00000000"}
    assert repaired["remaining_problems"] == []
    assert hv("verify", "--read-data").returncode == 0
    assert [p["point_id"] for p in hv_json("points")] == [new["point_id"]]
    assert (tmp / "repo" / "damaged" / "points" / old["point_id"]).is_file()  # set aside, not deleted
    text = hv("verify", "--repair")
    assert text.returncode == 0 and "repository is sound" in text.stdout
    [after] = hv_json("backup", "web")
    assert after["kind"] == "incremental" and after["base_point"] == new["point_id"]


def _flip(path: Path, at: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


DAMAGED_MANIFESTS = {
    "flipped byte": _flip,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:30]),
    "empty": lambda p: p.write_bytes(b""),
    "junk": lambda p: p.write_bytes(b"not a manifest at all\n" * 10),
    "a directory": lambda p: (p.unlink(), p.mkdir(), (p / "x").write_text("x")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_MANIFESTS))
def test_one_damaged_point_never_blocks_the_others(hv, hv_json, where, damage):
    host, tmp = where
    vm = new_vm(host)
    [first] = hv_json("backup", "web")
    guest_write(vm, 0, 0, os.urandom(4096))
    [second] = hv_json("backup", "web")
    guest_write(vm, 0, MiB, os.urandom(4096))
    [third] = hv_json("backup", "web")
    DAMAGED_MANIFESTS[damage](tmp / "repo" / "points" / second["point_id"])
    (tmp / "repo" / "points" / "notes.txt").write_text("dropped here by someone")

    listed = hv_json("points")
    good = [p["point_id"] for p in listed if p["damaged"] is None]
    damaged = {p["point_id"] for p in listed if p["damaged"]}
    assert good == [first["point_id"], third["point_id"]] and damaged == {second["point_id"], "notes.txt"}
    text = hv("points")
    assert text.returncode == 0 and "DAMAGED" in text.stdout and second["point_id"] in text.stderr

    guest_write(vm, 1, 0, os.urandom(4096))
    [fourth] = hv_json("backup", "web")
    assert fourth["kind"] == "incremental" and fourth["base_point"] == third["point_id"]
    result = hv("verify")
    assert result.returncode == 1 and second["point_id"] in result.stdout
    error(hv("forget", "--keep-last", "1", "--prune"), "cannot tell which chunks", second["point_id"])
    assert [p["point_id"] for p in hv_json("points") if p["damaged"] is None] == [fourth["point_id"]]
    forgot = hv_json("forget", second["point_id"])
    assert [e["point_id"] for e in forgot["forget"]] == [second["point_id"]]
    assert not (tmp / "repo" / "points" / second["point_id"]).exists()
    pruned = hv_json("forget", "--keep-last", "1", "--prune")["prune"]
    assert pruned["chunks_deleted"] > 0
    restores_exactly(hv, tmp, fourth["point_id"], digests(vm))


def test_forget_by_id_removes_exactly_the_named_points(hv, hv_json, where):
    host, _ = where
    new_vm(host, "web"), new_vm(host, "db")
    points = [p["point_id"] for p in hv_json("backup", "web", "db")]
    [third] = hv_json("backup", "web")
    error(hv("forget", "20990101T000000.000000Z-00000000"), "no restore point")
    error(hv("forget", "not-an-id"), "no point ID or entry of points/ 'not-an-id'")
    error(hv("forget", points[0], "--keep-last", "2"), "not both")
    error(hv("forget"), "keeps nothing")
    assert len(hv_json("points")) == 3  # a refused forget forgets nothing
    assert [e["point_id"] for e in hv_json("forget", *points, "--dry-run")["forget"]] == points
    hv_json("forget", *points)
    assert [p["point_id"] for p in hv_json("points")] == [third["point_id"]]
    error(hv("forget", "--vm", "nosuch", "--keep-last", "1"), "no restore point of a VM", "nosuch")


@pytest.mark.parametrize("dropped", [["tmp"], ["tmp", "points"], ["chunks/00", "chunks/7f", "tmp"], ["chunks"]])
def test_missing_layout_directories_are_recreated_or_reported(hv, hv_json, where, dropped):
    """What a copy tool that drops empty directories leaves: never a traceback."""
    host, tmp = where
    vm = new_vm(host)
    repo = tmp / "repo"
    for sub in dropped:
        shutil.rmtree(repo / sub)
    assert hv_json("points") == []
    assert hv("verify", "--read-data").returncode == 0
    [point] = hv_json("backup", "web")
    for sub in ("tmp", "points", "chunks/00", "chunks/ff"):
        assert (repo / sub).is_dir()
    assert hv("verify", "--read-data").returncode == 0
    restores_exactly(hv, tmp, point["point_id"], digests(vm))
    shutil.rmtree(repo / "tmp")
    assert hv("forget", "--keep-last", "1", "--prune").returncode == 0


# -- one failure does not take the others down


def _break_disk_missing(vm) -> None:
    os.unlink(vm.path_of(vm.config.disks[0].active))


def _break_disk_damaged(vm) -> None:
    path = vm.path_of(vm.config.disks[0].active)
    with open(path, "r+b") as f:  # both headers and both region tables
        for offset in (0, 64 << 10, 128 << 10, 192 << 10, 256 << 10):
            f.seek(offset)
            f.write(os.urandom(4096))


def _break_document(vm) -> None:
    Path(vm.document_path).write_text('{"config": {"name": ')


@pytest.mark.parametrize("breakage", [_break_disk_missing, _break_disk_damaged, _break_document])
def test_each_vm_gets_its_own_result_whatever_fails(hv, where, breakage):
    host, tmp = where
    web, db = new_vm(host, "web"), new_vm(host, "db")
    db_id = db.vm_id
    breakage(db)
    result = hv("backup", "web", "db", "nosuch", "--json")
    assert result.returncode == 2, result.stderr
    reported = json.loads(result.stdout)
    assert [r["vm"] for r in reported] == ["web", "db", "nosuch"]
    assert reported[0]["kind"] == "full" and "error" not in reported[0]
    assert reported[1]["error"].startswith("VM db: ") or db_id in reported[1]["error"]
    assert reported[2]["error"].startswith("VM nosuch: ") and "no VM" in reported[2]["error"]
    assert Repository.open(str(tmp / "repo")).points()[0].vm_name == "web"
    text = hv("backup", "db", "web")
    assert text.returncode == 2 and text.stdout.startswith("web: incremental")
    assert text.stderr.count("\n") == 1 and text.stderr.startswith("hvbackup: error: VM db: ")
    if breakage is not _break_document:
        assert Host.open(str(tmp / "host")).vm("db").checkpoints() == []  # no checkpoint left behind
    restores_exactly(hv, tmp, reported[0]["point_id"], digests(web))


def test_a_full_file_system_under_one_vm_fails_only_that_vm(hv, where, small_fs):
    """db's disk files live on a file system too full for the checkpoint's new AVHDX."""
    host, tmp = where
    new_vm(host, "web")
    db = new_vm(host, "db", sizes=(4 * MiB,))
    disk_dir = Path(db.path_of(db.config.disks[0].active)).parent
    small = small_fs(sum(e.stat().st_size for e in disk_dir.iterdir()) + (512 << 10))
    for entry in disk_dir.iterdir():
        shutil.copy2(entry, small / entry.name)
    shutil.rmtree(disk_dir)
    disk_dir.symlink_to(small)
    result = hv("backup", "web", "db", "--json")
    assert result.returncode == 2
    web_result, db_result = json.loads(result.stdout)
    assert web_result["kind"] == "full"
    assert db_result["vm"] == "db" and "No space left on device" in db_result["error"], db_result
    assert Host.open(str(tmp / "host")).vm("db").checkpoints() == []


# -- concurrency and interruption


def test_a_second_backup_of_a_vm_is_refused_while_the_first_runs(hv, hv_json, where):
    host, tmp = where
    vm = new_vm(host)
    Repository.init(str(tmp / "repo2"), chunk_size=MiB)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hvbackup.host import Host\n"
         "vm = Host.open(sys.argv[1]).vm('web')\n"
         "with vm.exclusive('backed up'):\n    print('holding', flush=True); time.sleep(60)", str(tmp / "host")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        result = hv("backup", "web", "--repo", tmp / "repo2", "--json")
        assert result.returncode == 2
        [refused] = json.loads(result.stdout)
        assert "already being backed up" in refused["error"] and str(holder.pid) in refused["error"]
    finally:
        holder.kill()
        holder.wait()
    assert vm.checkpoints() == [] and Repository.open(str(tmp / "repo2")).points() == []
    assert hv_json("backup", "web", "--repo", tmp / "repo2")[0]["kind"] == "full"


@pytest.mark.parametrize("method", ["virtdisk", "export"])
def test_each_repository_keeps_its_reference_point_and_stays_incremental(hv, hv_json, where, method):
    """A VM backed up alternately into two repositories (a 3-2-1 setup): every backup after the
    first into each repository is incremental."""
    host, tmp = where
    vm = new_vm(host)
    Repository.init(str(tmp / "repo2"), chunk_size=MiB)
    kinds = {"repo": [], "repo2": []}
    for step in range(6):
        repo = ("repo", "repo2")[step % 2]
        guest_write(vm, step % 2, (step + 1) * MiB, os.urandom(50_000))
        [result] = hv_json("backup", "web", "--repo", tmp / repo, "--method", method)
        kinds[repo].append(result["kind"])
        with pytest.MonkeyPatch.context() as m:
            m.setenv("HVBACKUP_REPO", str(tmp / repo))
            restores_exactly(hv, tmp, result["point_id"], digests(vm))
    assert kinds == {"repo": ["full", "incremental", "incremental"], "repo2": ["full", "incremental", "incremental"]}
    assert len(vm.reference_points()) == 2  # one per repository
    assert vm.checkpoints() == []


def _start_backup(tmp, *args) -> subprocess.Popen:
    env = {**os.environ, "HVBACKUP_HOST": str(tmp / "host"), "HVBACKUP_REPO": str(tmp / "repo")}
    return subprocess.Popen([sys.executable, "-m", "hvbackup", "backup", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_checkpoint(vm_dir: Path, process: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads((vm_dir / "vm.json").read_text())["checkpoints"]:
                return True
        except (ValueError, OSError):
            pass
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupting_a_backup_cleans_up_exactly_as_a_failure_does_and_says_so(hv, hv_json, where, sig, code):
    host, tmp = where
    vm = new_vm(host, sizes=(384 * MiB,))
    [first] = hv_json("backup", "web")
    guest_write(vm, 0, 0, os.urandom(320 * MiB))  # seconds of reading to interrupt
    process = _start_backup(tmp, "web")
    assert _wait_for_checkpoint(Path(vm.directory), process), "the backup never took its checkpoint"
    time.sleep(0.05)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "interrupted" in err and "recovery checkpoint was removed" in err and "Traceback" not in err, err
    vm = Host.open(str(tmp / "host")).vm("web")
    assert vm.checkpoints() == []
    assert [p["point_id"] for p in hv_json("points")] == [first["point_id"]]
    assert hv("verify").returncode == 0
    [after] = hv_json("backup", "web")
    assert after["kind"] == "incremental" and after["base_point"] == first["point_id"]


# -- names, passphrases, restore targets


@pytest.mark.parametrize("name", ["../../../../escaped", "a/b", "..", "", " padded"])
def test_a_restored_vm_name_is_validated_before_anything_is_written(hv, hv_json, where, name):
    host, tmp = where
    new_vm(host)
    [point] = hv_json("backup", "web")
    before = sorted(p for p in tmp.rglob("*"))
    error(hv("restore", point["point_id"], "--as", name), "name")
    assert sorted(p for p in tmp.rglob("*")) == before


def test_passphrases_are_never_empty_and_a_missing_one_is_a_clear_error(hv, tmp_path, monkeypatch):
    monkeypatch.setenv("HVBACKUP_PASSPHRASE", "")
    error(hv("repo", "init", tmp_path / "r", "--encrypt"), "passphrase is empty")
    assert not (tmp_path / "r" / "config").exists()
    monkeypatch.setenv("HVBACKUP_PASSPHRASE", "secret")
    assert hv("repo", "init", tmp_path / "r", "--encrypt").returncode == 0
    monkeypatch.setenv("HVBACKUP_PASSPHRASE", "")
    error(hv("points", "--repo", tmp_path / "r"), "passphrase is empty")
    env = {k: v for k, v in os.environ.items() if k != "HVBACKUP_PASSPHRASE"}
    result = subprocess.run([sys.executable, "-m", "hvbackup", "points", "--repo", str(tmp_path / "r")],
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    error(result, "HVBACKUP_PASSPHRASE", "no terminal")


@pytest.mark.parametrize("name, option, format", [
    ("out.vhd", None, "vhd"), ("out.vhdx", None, "vhdx"), ("out.avhdx", None, "vhdx"), ("out.img", None, "raw"),
    ("out.raw", None, "raw"), ("out.bin", "vhd", "vhd"), ("out.disk", "raw", "raw"), ("OUT.VHD", None, "vhd"),
])
def test_a_restore_target_takes_the_format_its_name_says(hv, hv_json, where, name, option, format):
    host, tmp = where
    vm = new_vm(host)
    [point] = hv_json("backup", "web")
    args = ["restore", point["point_id"], "--disk", 1, "--to", tmp / name] + (["-O", option] if option else [])
    result = hv_json(*args)
    assert result["format"] == format and disks.detect_format(str(tmp / name)) == format
    assert file_digest(tmp / name) == digests(vm)[1]


def test_a_restore_target_with_an_unknown_or_lying_name_is_refused(hv, hv_json, where):
    host, tmp = where
    new_vm(host)
    [point] = hv_json("backup", "web")
    error(hv("restore", point["point_id"], "--disk", 0, "--to", tmp / "out.bin"), "-O")
    error(hv("restore", point["point_id"], "--disk", 0, "--to", tmp / "out.vhdx", "-O", "raw"), "out.vhdx")
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith("out")) == []


# -- cost in proportion to the change


def test_a_64_tib_vm_backs_up_in_time_and_memory_that_follow_the_change(tmp_path):
    """Full and incremental backups of a 64 TiB VM with 1 MiB written: bounded memory (the issue's
    500 MB), and times far from the old minutes (bench/bench_scale.py measures them properly)."""
    script = """
import os, sys, time, json
from hvbackup.host import Host
from hvbackup.backup.repository import Repository
from hvbackup.backup.engine import backup_vm
host = Host.init(sys.argv[1] + "/host"); repo = Repository.init(sys.argv[1] + "/repo")
vm = host.create_vm("big", [64 << 40]); vm.request_state_change("start")
vm.disk(0).write(1 << 30, os.urandom(1 << 20)); vm.close_disks()
times = []
for step in range(2):
    start = time.monotonic()
    with repo.session() as s:
        result = backup_vm(s, vm)
    times.append(time.monotonic() - start)
    vm.disk(0).write((5 + step) << 30, os.urandom(1 << 20)); vm.close_disks()
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"times": times, "kind": result.kind, "rss": peak}))
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["kind"] == "incremental"
    assert measured["rss"] < 500 * 1024, measured  # KiB; VmHWM, as ru_maxrss starts at pytest's own peak
    assert max(measured["times"]) < 30, measured
