"""``hvbackup backup|points|restore|verify|forget`` as scripts see them: real hosts, VMs and
repositories, restores compared byte for byte with what the guest held at backup time, JSON shapes,
exit codes and one-line errors. Commands run through the entry point in this process."""

from __future__ import annotations

import io
import json
import os

import pytest
from backup_world import SIZES, digests, error, file_digest, guest_write, new_vm
from rich.console import Console

from hvbackup.backup import engine
from hvbackup.backup.repository import Repository
from hvbackup.cli import output
from hvbackup.host import Host
from hvbackup.units import MiB

RESULT_KEYS = {"point_id", "vm", "kind", "method", "bytes_read", "bytes_stored", "seconds", "base_point",
               "reference_point", "notes", "read_in_full"}


@pytest.mark.parametrize("method", ["virtdisk", "export"])
def test_full_then_incremental_restore_bit_identical(hv, hv_json, where, method):
    host, tmp = where
    vm = new_vm(host)
    [full] = hv_json("backup", "web", "--method", method)
    assert set(full) == RESULT_KEYS
    assert (full["vm"], full["kind"], full["method"], full["base_point"]) == ("web", "full", method, None)
    assert full["read_in_full"] == {"0": "no-base", "1": "no-base"}
    assert full["bytes_read"] >= 4 * MiB and full["bytes_stored"] > 0
    at_full = digests(vm)

    guest_write(vm, 0, 9 * MiB + 123 * 512, os.urandom(100_000))
    [incremental] = hv_json("backup", "web", "--method", method)
    assert incremental["kind"] == "incremental" and incremental["base_point"] == full["point_id"]
    assert incremental["bytes_read"] <= 2 * MiB  # only the chunks the write touched
    at_incremental = digests(vm)

    for point, expected in ((full, at_full), (incremental, at_incremental)):
        for index in range(len(SIZES)):
            raw, vhdx = tmp / f"{point['point_id']}-{index}.img", tmp / f"{point['point_id']}-{index}.vhdx"
            restored = hv_json("restore", point["point_id"], "--disk", index, "--to", raw)
            assert restored["format"] == "raw" and restored["virtual_size"] == SIZES[index]
            as_vhdx = hv_json("restore", point["point_id"], "--disk", index, "--to", vhdx, "-O", "vhdx")
            assert as_vhdx["format"] == "vhdx" and as_vhdx["path"] == str(vhdx)
            assert file_digest(raw) == file_digest(vhdx) == expected[index]


def test_backup_prints_a_line_per_vm_with_its_notes(hv, hv_json, where):
    host, _ = where
    web, _ = new_vm(host, "web"), new_vm(host, "db")
    result = hv("backup", "web", "db")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("web: full (virtdisk) read ") and "stored" in lines[0] and "point" in lines[0]
    assert lines[1].startswith("  read in full (no-base): ")  # why the first backup is full
    assert any(line.startswith("db: full (virtdisk)") for line in lines)
    again = hv("backup", "db", "--full", "--method", "export")
    assert again.returncode == 0 and again.stdout == again.stdout.splitlines()[0] + "\n"  # nothing to note
    assert again.stdout.startswith("db: full (export)"), again.stdout
    assert [r["vm"] for r in hv_json("backup", "web", web.vm_id, "web")] == ["web"]
    switched = hv("backup", "web", "--method", "export").stdout.splitlines()
    assert switched[0].startswith("web: incremental (export)") and len(switched) == 1, switched


def test_progress_bars_draw_on_a_terminal(hv, where, monkeypatch):
    host, tmp = where
    new_vm(host, "web"), new_vm(host, "db")
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    monkeypatch.setattr(output, "stderr_is_terminal", lambda: True)
    monkeypatch.setattr(output, "terminal", lambda: terminal)
    result = hv("backup", "web", "db")
    assert result.returncode == 0 and result.stdout.count("full (virtdisk)") == 2, result.stderr
    drawn = terminal.file.getvalue()
    assert "web" in drawn and "db" in drawn and "MiB" in drawn
    point = result.stdout.split("point ")[1].split()[0]
    assert hv("restore", point, "--disk", "0", "--to", tmp / "d0.img").returncode == 0
    assert "disk 0" in terminal.file.getvalue()[len(drawn):]


def test_a_failed_vm_is_reported_and_the_others_are_stored(hv, where, monkeypatch):
    host, _ = where
    new_vm(host, "web"), new_vm(host, "db")
    real = engine.backup_vm

    def failing_db(session, vm, **options):
        if vm.name == "db":
            raise engine.BackupError("db", "the disk went away")
        return real(session, vm, **options)

    monkeypatch.setattr(engine, "backup_vm", failing_db)
    result = hv("backup", "web", "db", "--json")
    assert result.returncode == 2
    web, db = json.loads(result.stdout)
    assert web["vm"] == "web" and web["kind"] == "full"
    assert db == {"vm": "db", "error": "VM db: the disk went away"}
    text = hv("backup", "db", "web")
    assert text.returncode == 2 and text.stderr == "hvbackup: error: VM db: the disk went away\n"
    assert text.stdout.startswith("web: incremental")


def test_points_lists_and_filters(hv, hv_json, where, monkeypatch):
    host, _ = where
    web, db = new_vm(host, "web"), new_vm(host, "db")
    assert hv_json("points") == []
    [first] = hv_json("backup", "web")
    hv_json("backup", "db", "web", "--method", "export")
    listed = hv_json("points")
    assert sorted(p["vm_name"] for p in listed) == ["db", "web", "web"]  # the last two were taken at once
    assert listed[0]["point_id"] == first["point_id"]
    assert {"point_id", "vm_name", "vm_id", "kind", "method", "started", "ended", "bytes_read", "bytes_stored",
            "notes", "disks"} <= set(listed[0])
    assert [d["index"] for d in listed[0]["disks"]] == [0, 1] and "chunks" not in listed[0]["disks"][0]
    assert [p["method"] for p in hv_json("points", "--vm", "web")] == ["virtdisk", "export"]
    assert [p["vm_id"] for p in hv_json("points", "--vm", db.vm_id)] == [db.vm_id]
    error(hv("points", "--vm", "nobody"), "no restore point of a VM", "'nobody'")
    table = hv("points", "--vm", "web").stdout
    assert first["point_id"] in table and "virtdisk" in table and "export" in table and "MiB" in table
    assert web.vm_id not in table


def test_restore_a_whole_vm(hv, hv_json, where, tmp_path):
    host, _ = where
    vm = new_vm(host)
    [point] = hv_json("backup", "web")
    expected = digests(vm)
    guest_write(vm, 0, 0, b"\xff" * 4096)  # the live VM moves on

    error(hv("restore", point["point_id"]), "already has a VM named 'web'", "--as")
    copy = hv_json("restore", point["point_id"], "--as", "web-copy")
    assert set(copy) == {"point_id", "id", "name", "state", "disks"}
    assert copy["name"] == "web-copy" and copy["state"] == "Off" and copy["id"] != vm.vm_id
    assert [file_digest(p) for p in copy["disks"]] == expected
    restored = Host.open(str(tmp_path / "host")).vm("web-copy")
    restored.request_state_change("start")
    assert digests(restored) == expected

    Host.init(str(tmp_path / "other"))
    text = hv("restore", point["point_id"], "--host", tmp_path / "other")
    assert text.returncode == 0 and "restored" in text.stdout and vm.vm_id in text.stdout  # keeps its ID there
    restored = Host.open(str(tmp_path / "other")).vm("web")
    restored.request_state_change("start")
    assert digests(restored) == expected


def test_restore_refuses_mixed_or_incomplete_forms(hv, hv_json, where, tmp_path):
    host, _ = where
    new_vm(host)
    [point] = hv_json("backup", "web")
    pid = point["point_id"]
    error(hv("restore", pid, "--disk", "0"), "--to")
    error(hv("restore", pid, "--to", tmp_path / "x.img"), "--disk")
    error(hv("restore", pid, "--disk", "0", "--to", tmp_path / "x.img", "--as", "x"), "not both")
    error(hv("restore", pid, "--disk", "0", "--to", tmp_path / "x.img", "--host", tmp_path / "host"), "not both")
    error(hv("restore", pid, "-O", "raw"), "--disk")
    error(hv("restore", pid, "--disk", "2", "--to", tmp_path / "x.img"), "no disk 2")
    (tmp_path / "taken.img").write_bytes(b"mine")
    error(hv("restore", pid, "--disk", "0", "--to", tmp_path / "taken.img"), "already exists")
    assert (tmp_path / "taken.img").read_bytes() == b"mine"
    error(hv("restore", "20990101T000000.000000Z-00000000", "--disk", "0", "--to", tmp_path / "y.img"),
          "no restore point")
    error(hv("restore", "not-a-point", "--as", "z"), "not a point ID")
    assert not os.path.exists(tmp_path / "x.img") and not os.path.exists(tmp_path / "y.img")


def test_verify_finds_a_missing_chunk(hv, hv_json, where):
    host, tmp = where
    new_vm(host)
    hv_json("backup", "web")
    assert hv_json("verify", "--read-data") == {"points": 1, "read_data": True, "problems": [], "damaged_points": [],
                                                "unrestorable": [], "damaged_chunks": [], "set_aside": [],
                                                "not_set_aside": []}
    sound = hv("verify")
    assert sound.returncode == 0 and "sound" in sound.stdout
    victim = next(e.path for d in sorted((tmp / "repo" / "chunks").iterdir()) for e in os.scandir(d))
    os.unlink(victim)
    damaged = hv("verify")
    assert damaged.returncode == 1 and "cannot be restored" in damaged.stderr and "back up their VMs" in damaged.stderr
    assert damaged.stdout.count("\n") == 1 and os.path.basename(victim) in damaged.stdout
    result = hv("verify", "--json")
    assert result.returncode == 1 and len(json.loads(result.stdout)["problems"]) == 1


def test_forget_keeps_by_policy_and_prunes(hv, hv_json, where):
    host, tmp = where
    web, _ = new_vm(host, "web"), new_vm(host, "db")
    for _ in range(3):
        guest_write(web, 0, 0, os.urandom(MiB))  # each point holds its own first chunk: prune has work
        hv_json("backup", "web", "db")
    before = hv_json("points")
    newest = {vm: [p["point_id"] for p in before if p["vm_name"] == vm][-1] for vm in ("web", "db")}

    plan = hv_json("forget", "--keep-last", "1", "--dry-run")
    assert plan["dry_run"] is True and plan["prune"] is None
    assert {k["point_id"]: k["reasons"] for k in plan["keep"]} == {newest["web"]: ["last"], newest["db"]: ["last"]}
    assert len(plan["forget"]) == 4 and set(plan["forget"][0]) == {"point_id", "vm_id", "vm_name", "time"}
    assert len(hv_json("points")) == 6

    only_web = hv_json("forget", "--vm", "web", "--keep-last", "2", "--keep-daily", "1")
    assert [k["reasons"] for k in only_web["keep"]] == [["last"], ["last", "daily"]]
    assert len(only_web["forget"]) == 1 and only_web["forget"][0]["vm_name"] == "web"
    assert len(hv_json("points")) == 5

    done = hv_json("forget", "--keep-last", "1", "--prune")
    assert {k["point_id"] for k in done["keep"]} == set(newest.values()) and len(done["forget"]) == 3
    assert done["prune"]["chunks_deleted"] > 0 and done["prune"]["bytes_freed"] > 0
    assert [p["point_id"] for p in hv_json("points")] == sorted(newest.values())
    assert hv("verify", "--read-data").returncode == 0

    text = hv("forget", "--keep-weekly", "4", "--prune")
    assert text.returncode == 0 and text.stdout.count("keep ") == 2 and "(weekly)" in text.stdout
    assert "0 forgotten" in text.stdout and "pruned 0 chunks" in text.stdout
    [after] = hv_json("backup", "web")
    assert after["kind"] == "incremental"  # the kept point still serves as the base

    with Repository.open(str(tmp / "repo")).session():  # as a running backup holds it
        error(hv("forget", "--keep-last", "1"), "locked")
    assert len(hv_json("points")) == 3


def test_failures_are_one_line(hv, where, monkeypatch, tmp_path):
    host, _ = where
    new_vm(host)
    error(hv("backup", "nobody"), "nobody")
    error(hv("forget"), "keeps nothing")
    error(hv("forget", "--keep-last", "-1"), "--keep-last")
    error(hv("points", "--repo", tmp_path / "nowhere"), "not a repository")
    error(hv("backup", "web", "--method", "rsvd"), "rsvd")
    monkeypatch.delenv("HVBACKUP_REPO")
    error(hv("verify"), "--repo")
    monkeypatch.delenv("HVBACKUP_HOST")
    error(hv("backup", "web", "--repo", tmp_path / "repo"), "--host")


def test_an_encrypted_repository_takes_the_passphrase_from_the_environment(hv, hv_json, where, monkeypatch):
    host, tmp = where
    new_vm(host)
    Repository.init(str(tmp / "secret"), passphrase="correct horse", chunk_size=MiB)
    monkeypatch.setenv("HVBACKUP_PASSPHRASE", "correct horse")
    [point] = hv_json("backup", "web", "--repo", tmp / "secret")
    assert [p["point_id"] for p in hv_json("points", "--repo", tmp / "secret")] == [point["point_id"]]
    monkeypatch.setenv("HVBACKUP_PASSPHRASE", "wrong")
    error(hv("verify", "--repo", tmp / "secret"))
