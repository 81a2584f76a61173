"""``hvbackup host|vm|checkpoint|refpoint`` as scripts see them: JSON shapes, exit codes and one-line
errors, through the xHyper-VBackup flow (recovery checkpoint, export, convert, differential, import).

Commands run through the entry point in this process; one runs ``python -m hvbackup`` for real."""

from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
import sys
import threading

import pytest

from hvbackup.cli.host import finish
from hvbackup.errors import HostError
from hvbackup.host import Host
from hvbackup.host.jobs import ConcreteJob, JobState
from hvbackup.units import MiB


@pytest.fixture(autouse=True)
def host_dir(monkeypatch, tmp_path):
    """Every command here works on a fresh host path through HVBACKUP_HOST."""
    monkeypatch.setenv("HVBACKUP_HOST", str(tmp_path / "host"))


def error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("hvbackup: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert all(w in result.stderr for w in words), result.stderr
    return result.stderr


@pytest.fixture
def running(hv, hv_json, tmp_path):
    """A host with VM 'web' (16 MiB and 8 MiB disks), running."""
    assert hv_json("host", "init", tmp_path / "host")["vms"] == []
    created = hv_json("vm", "create", "web", "--disk", "16M", "--disk", "8M", "--processors", "2")
    assert set(created) == {"id", "name", "disks"} and created["name"] == "web" and len(created["disks"]) == 2
    assert all(os.path.isfile(p) for p in created["disks"])
    assert hv_json("vm", "start", "web")["state"] == "Running"
    return created


def test_host_init_and_a_missing_host(hv, hv_json, tmp_path, monkeypatch):
    assert hv_json("host", "init", tmp_path / "h2")["directory"] == str(tmp_path / "h2")
    error(hv("host", "init", tmp_path / "h2"), "already a host")
    error(hv("vm", "list", "--host", tmp_path / "nowhere"), "not a host")
    monkeypatch.delenv("HVBACKUP_HOST")
    error(hv("vm", "list"), "--host")


def test_vm_lifecycle(hv, hv_json, running):
    [summary] = hv_json("vm", "list")
    assert (summary["id"], summary["state"], summary["processors"]) == (running["id"], "Running", 2)
    assert hv_json("vm", "save", "web")["state"] == "Saved"
    error(hv("vm", "save", "web"), "Saved")
    assert hv_json("vm", "start", running["id"])["enabled_state"] == 2
    assert hv_json("vm", "pause", "web")["state"] == "Paused"
    assert hv_json("vm", "stop", "web")["state"] == "Off"
    error(hv("vm", "io", "web", "read", "--offset", "0", "--length", "1"), "Off")
    error(hv("vm", "create", "web", "--disk", "1M"), "web")
    error(hv("vm", "start", "nope"), "nope")
    assert "web" in hv("vm", "list").stdout


def test_vm_io_writes_patterns_and_files_and_reads_back(hv, hv_json, running, tmp_path):
    wrote = hv_json("vm", "io", "web", "--disk", "1", "write", "--offset", "1M", "--pattern", "0xAB",
                    "--length", "3M")
    assert wrote == {"disk": 1, "offset": MiB, "length": 3 * MiB,
                     "sha256": hashlib.sha256(b"\xab" * 3 * MiB).hexdigest()}
    read = hv_json("vm", "io", "web", "--disk", "1", "read", "--offset", "1M", "--length", "3M")
    assert read["sha256"] == wrote["sha256"]
    payload = os.urandom(100_000)
    (tmp_path / "in.bin").write_bytes(payload)
    assert hv_json("vm", "io", "web", "write", "--offset", "512", "--file", tmp_path / "in.bin")["length"] == 100_000
    out = tmp_path / "out.bin"
    read = hv_json("vm", "io", "web", "read", "--offset", "512", "--length", "100000", "--out", out)
    assert out.read_bytes() == payload and read["sha256"] == hashlib.sha256(payload).hexdigest()
    error(hv("vm", "io", "web", "write", "--offset", "0", "--pattern", "300", "--length", "1"), "byte")
    error(hv("vm", "io", "web", "write", "--offset", "0", "--length", "1"), "--pattern")
    error(hv("vm", "io", "web", "--disk", "2", "read", "--offset", "0", "--length", "1"), "no disk 2")
    error(hv("vm", "io", "web", "read", "--offset", "16M", "--length", "1"))


def test_checkpoints_create_list_apply_delete(hv, hv_json, running):
    hv_json("vm", "io", "web", "write", "--offset", "0", "--pattern", "1", "--length", "1M")
    made = hv_json("checkpoint", "create", "web", "--name", "before")
    assert made["type"] == "standard" and made["name"] == "before" and made["vm"] == "web"
    assert {"id", "instance_id", "snapshot_type", "created", "consistency_level", "disks"} <= set(made)
    backup = hv_json("checkpoint", "create", "web", "--type", "recovery", "--consistency", "application")
    assert (backup["type"], backup["snapshot_type"], backup["consistency_level"]) == ("recovery", 32768, 1)
    assert backup["virtual_system_type"] == "Microsoft:Hyper-V:Snapshot:Recovery"
    listed = hv_json("checkpoint", "list")
    assert [c["id"] for c in listed] == [made["id"], backup["id"]]
    assert [c["id"] for c in hv_json("checkpoint", "list", "web")] == [made["id"], backup["id"]]

    hv_json("vm", "io", "web", "write", "--offset", "0", "--pattern", "2", "--length", "1M")
    applied = hv_json("checkpoint", "apply", "before")
    assert applied == {"id": made["id"], "vm": "web", "state": "Saved"}
    hv_json("vm", "start", "web")
    read = hv_json("vm", "io", "web", "read", "--offset", "0", "--length", "1M")
    assert read["sha256"] == hashlib.sha256(b"\x01" * MiB).hexdigest()

    assert hv_json("checkpoint", "delete", made["id"]) == {"id": made["id"], "vm": "web", "deleted": True}
    assert hv_json("checkpoint", "delete", backup["id"], "--vm", "web")["deleted"]
    assert hv_json("checkpoint", "list") == []
    error(hv("checkpoint", "delete", made["id"]), made["id"])
    error(hv("checkpoint", "create", "web", "--type", "disk"))


def test_orphaned_recovery_checkpoints_are_listed_and_cleaned(hv, hv_json, running, tmp_path):
    stray = hv_json("checkpoint", "create", "web", "--type", "recovery")
    assert hv_json("checkpoint", "list", "--orphaned") == {"checkpoints": [], "files": [], "damaged": []}  # too young
    vm = Host.open(str(tmp_path / "host")).vm("web")
    document = vm.load()
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2)
    document["checkpoints"][0]["created"] = old.isoformat(timespec="seconds")
    vm.save(document)
    stray_file = os.path.join(os.path.dirname(running["disks"][0]), "left_behind.avhdx")
    with open(stray_file, "wb") as f:
        f.write(b"x")
    orphans = hv_json("checkpoint", "list", "--orphaned")
    assert [c["id"] for c in orphans["checkpoints"]] == [stray["id"]]
    assert [f["path"] for f in orphans["files"]] == [stray_file]
    assert hv_json("checkpoint", "list", "--orphaned", "--older-than", "3d")["checkpoints"] == []
    assert hv_json("checkpoint", "clean") == orphans
    assert hv_json("checkpoint", "list") == [] and not os.path.exists(stray_file)
    assert hv_json("checkpoint", "clean") == {"checkpoints": [], "files": [], "damaged": []}
    assert "nothing orphaned" in hv("checkpoint", "list", "--orphaned").stdout
    error(hv("checkpoint", "list", "--orphaned", "--older-than", "soon"), "age")


def test_backup_flow_full_differential_and_import(hv, hv_json, running, tmp_path):
    """The xHyper-VBackup sequence from the command line."""
    hv_json("vm", "io", "web", "write", "--offset", "0", "--pattern", "0x11", "--length", "4M")
    first = hv_json("checkpoint", "create", "web", "--type", "recovery")
    full = hv_json("vm", "export", "web", tmp_path / "full", "--checkpoint", first["id"])
    assert set(full) >= {"directory", "definition_file", "virtual_hard_disks"}
    assert full["directory"] == str(tmp_path / "full" / "web") and len(full["virtual_hard_disks"]) == 2
    point = hv_json("refpoint", "convert", first["id"])
    assert {"instance_id", "virtual_disk_identifiers", "resilient_change_tracking_identifiers",
            "virtual_system_identifier", "consistency_level", "reference_point_type"} <= set(point)
    assert point["virtual_system_identifier"] == running["id"] and point["reference_point_type"] == 2
    assert len(point["resilient_change_tracking_identifiers"]) == len(point["virtual_disk_identifiers"]) == 2
    assert hv_json("checkpoint", "list") == []
    assert [p["instance_id"] for p in hv_json("refpoint", "list", "web")] == [point["instance_id"]]

    hv_json("vm", "io", "web", "write", "--offset", "8M", "--pattern", "0x22", "--length", "1M")
    second = hv_json("checkpoint", "create", "web", "--type", "recovery")
    diff = hv_json("vm", "export", "web", tmp_path / "diff", "--checkpoint", second["id"],
                   "--base", point["instance_id"])
    assert all(p.endswith(".avhdx") for p in diff["virtual_hard_disks"])
    newer = hv_json("refpoint", "convert", second["id"])
    destroyed = hv_json("refpoint", "destroy", point["instance_id"])
    assert destroyed == {"instance_id": point["instance_id"], "vm": "web", "destroyed": True}
    assert [p["instance_id"] for p in hv_json("refpoint", "list")] == [newer["instance_id"]]
    error(hv("refpoint", "destroy", point["instance_id"]), point["instance_id"])
    error(hv("refpoint", "convert", "nope"), "nope")

    # restore: the full's disks next to the differential, then import on another host
    for path in full["virtual_hard_disks"]:
        os.link(path, os.path.join(os.path.dirname(diff["virtual_hard_disks"][0]), os.path.basename(path)))
    restore = tmp_path / "restore"
    hv_json("host", "init", restore)
    imported = hv_json("vm", "import", diff["definition_file"], "--new-id", "--name", "web2", "--host", restore)
    assert imported["name"] == "web2" and imported["id"] != running["id"] and len(imported["disks"]) == 2
    hv_json("vm", "start", "web2", "--host", restore)
    expected = hashlib.sha256(b"\x11" * 4 * MiB + bytes(4 * MiB) + b"\x22" * MiB).hexdigest()
    read = hv_json("vm", "io", "web2", "read", "--offset", "0", "--length", "9M", "--host", restore)
    assert read["sha256"] == expected
    error(hv("vm", "import", tmp_path / "nothing.vmcx"), "nothing.vmcx")


def test_export_refuses_a_recovery_checkpoint_it_does_not_know(hv, hv_json, running, tmp_path):
    error(hv("vm", "export", "web", tmp_path / "x", "--checkpoint", "nope"), "nope")
    made = hv_json("checkpoint", "create", "web", "--type", "recovery")
    error(hv("vm", "export", "web", tmp_path / "x", "--checkpoint", made["id"], "--base", "nope"), "nope")


def test_a_real_process_with_human_output(tmp_path):
    env = {**os.environ, "HVBACKUP_HOST": str(tmp_path / "host")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "hvbackup", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=60)

    assert run("host", "init", tmp_path / "host").returncode == 0
    assert "created VM web" in run("vm", "create", "web", "--disk", "4M").stdout
    result = run("checkpoint", "apply", "nope")
    assert result.returncode == 2 and result.stderr.startswith("hvbackup: error: ") and "Traceback" not in result.stderr
    assert "web" in run("vm", "list").stdout


def test_ctrl_c_asks_an_export_job_to_stop(monkeypatch):
    def until_cancelled(progress, cancelled):
        while not cancelled():
            threading.Event().wait(0.001)
        raise HostError("the export was cancelled")

    job = ConcreteJob(62, cancellable=True).run(until_cancelled)
    real_wait = job.wait
    def interrupted_wait(timeout=None):
        if timeout == 0.1:  # the polling loop's wait: the user presses Ctrl-C
            raise KeyboardInterrupt
        return real_wait(timeout)

    monkeypatch.setattr(job, "wait", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        finish((4096, job), "exporting", show_progress=False)
    assert job.job_state == JobState.TERMINATED
