"""The ``hvbackup`` command as users and scripts run it: real processes, exit codes, JSON, stderr."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hvbackup.units import MiB


def hv(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvbackup", *args], capture_output=True, text=True, cwd=cwd)


def hv_json(*args: str, cwd=None):
    result = hv(*args, "--json", cwd=cwd)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout), result.returncode


def test_create_info_map(tmp_path):
    info, _ = hv_json("disk", "create", str(tmp_path / "a.vhdx"), "--size", "1G", "--block-size", "2M")
    again, _ = hv_json("disk", "info", str(tmp_path / "a.vhdx"))
    for key in ("format", "type", "virtual_size", "block_size", "logical_sector_size", "physical_sector_size",
                "disk_id", "parent", "file_size", "log_pending"):
        assert key in again
    described = (again["format"], again["type"], again["virtual_size"], again["block_size"])
    assert described == ("vhdx", "dynamic", 1 << 30, 2 * MiB)
    assert again["disk_id"] == info["disk_id"] and again["log_pending"] is False
    child, _ = hv_json("disk", "create", str(tmp_path / "b.avhdx"), "--type", "differencing",
                       "--parent", str(tmp_path / "a.vhdx"))
    assert child["type"] == "differencing" and child["parent"].endswith("a.vhdx")
    extents, _ = hv_json("disk", "map", str(tmp_path / "b.avhdx"))
    assert extents == [{"offset": 0, "length": 1 << 30, "state": "unallocated", "depth": 1}]
    vhd, _ = hv_json("disk", "create", str(tmp_path / "c.vhd"), "--size", "100M", "--format", "vhd", "--type", "fixed")
    assert (vhd["format"], vhd["type"], vhd["virtual_size"]) == ("vhd", "fixed", 100 * MiB)


def test_convert_compare_merge_and_exit_codes(tmp_path):
    from hvbackup import disks

    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    with disks.create(base, 64 * MiB) as d:
        d.write(0, b"a" * MiB)
    with disks.create(child, type="differencing", parent=base) as c:
        c.write(10 * MiB, b"c" * 4096)
    assert hv("disk", "convert", str(child), str(tmp_path / "flat.vhd")).returncode == 0
    assert hv("disk", "convert", str(child), str(tmp_path / "flat.img"), "-O", "raw").returncode == 0
    same, code = hv_json("disk", "compare", str(child), str(tmp_path / "flat.vhd"))
    assert code == 0 and same["identical"]
    with disks.open(tmp_path / "flat.img") as raw:
        raw.write(10 * MiB + 100, b"X")
    differ, code = hv_json("disk", "compare", str(child), str(tmp_path / "flat.img"))
    assert code == 1 and differ["first_difference"] == 10 * MiB + 100
    text = hv("disk", "compare", str(child), str(tmp_path / "flat.img"))
    assert text.returncode == 1 and str(10 * MiB + 100) in text.stdout
    merged, code = hv_json("disk", "merge", str(child))
    assert code == 0 and not child.exists()
    assert hv("disk", "compare", str(base), str(tmp_path / "flat.vhd")).returncode == 0
    report, code = hv_json("disk", "check", str(base))
    assert code == 0 and report["ok"]


@pytest.mark.parametrize("args, message", [
    (["disk", "info", "{tmp}/missing.vhdx"], "cannot open"),
    (["disk", "info", "{tmp}"], "directory"),
    (["disk", "create", "{tmp}/x.vhdx", "--size", "10Q"], "not a size"),
    (["disk", "create", "{tmp}/x.vhdx", "--size", "1G", "--block-size", "3M"], "power of two"),
    (["disk", "create", "{tmp}/x.vhdx"], "--size"),
    (["disk", "merge", "{tmp}/plain.vhdx"], "not a differencing disk"),
    (["disk", "convert", "{tmp}/plain.vhdx", "{tmp}/plain.vhdx"], "already exists"),
    (["disk", "frobnicate"], "No such command"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, args, message):
    from hvbackup import disks

    disks.create(tmp_path / "plain.vhdx", MiB).close()
    result = hv(*(a.format(tmp=tmp_path) for a in args))
    assert result.returncode == 2
    assert result.stderr.startswith("hvbackup: error:") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_check_reports_problems_with_exit_1(tmp_path):
    from hvbackup import disks

    path = tmp_path / "d.vhdx"
    disks.create(path, 4 * MiB).close()
    data = bytearray(path.read_bytes())
    data[64 * 1024 + 30] ^= 1  # header 1
    path.write_bytes(bytes(data))
    report, code = hv_json("disk", "check", str(path))
    assert code == 1 and report["problems"] == ["one of the two headers is damaged"]
    repaired, code = hv_json("disk", "check", str(path), "--repair")
    assert code == 0 and repaired["repaired"] == ["rewrote the damaged header"]


def test_quickstart_backs_up_restores_and_checks_then_reuses_its_directory(tmp_path):
    work = tmp_path / "qs"
    first, code = hv_json("quickstart", "--dir", str(work))
    assert code == 0 and first["ok"] and first["created"]
    kinds = [(b["kind"], b["method"]) for b in first["backups"]]
    assert kinds == [("full", "export"), ("incremental", "virtdisk")]
    full, incremental = first["backups"]
    assert incremental["base_point"] == full["point_id"] and incremental["bytes_read"] < full["bytes_read"]
    assert [r["kind"] for r in first["restores"]] == ["full", "incremental"]
    assert all(r["files"] > 0 and (work / "restored" / f"{r['kind']}.raw").exists() for r in first["restores"])
    assert first["guest_bytes_written"] > 0
    again, code = hv_json("quickstart", "--dir", str(work))
    assert code == 0 and not again["created"] and again["repository"]["points"] == 4
    assert again["backups"][0]["bytes_stored"] == 0  # the guest's disk is what the last incremental stored


def test_quickstart_fails_with_one_line_on_a_damaged_repository(tmp_path):
    work = tmp_path / "qs"
    text = hv("quickstart", "--dir", str(work))
    assert text.returncode == 0 and "all good" in text.stdout and "incremental" in text.stdout
    for chunk in (work / "repository" / "chunks").rglob("*"):
        if chunk.is_file():
            data = chunk.read_bytes()
            chunk.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    result = hv("quickstart", "--dir", str(work))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("hvbackup: error:") and result.stderr.count("\n") == 1, result.stderr


def test_quickstart_check_refuses_files_the_guest_did_not_hold(tmp_path):
    from hvbackup import guestfs
    from hvbackup.cli.quickstart import QuickstartError, _check

    (tmp_path / "src" / "etc").mkdir(parents=True)
    (tmp_path / "src" / "etc" / "hostname").write_bytes(b"guest\n")
    image = tmp_path / "fs.img"
    guestfs.make_filesystem(str(tmp_path / "src"), str(image), 16 * MiB)
    held = guestfs.checksums(str(image))
    assert _check(image, held, "full") == 1
    with pytest.raises(QuickstartError, match="/etc/hostname"):
        _check(image, {"/etc/hostname": "0" * 64}, "full")
    with pytest.raises(QuickstartError, match="/etc/motd"):
        _check(image, held | {"/etc/motd": "0" * 64}, "full")


def test_help_without_a_command():
    result = hv()
    assert result.returncode == 0 and "disk" in result.stdout and "quickstart" in result.stdout
