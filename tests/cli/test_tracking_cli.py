"""``hvbackup disk tracking`` and ``hvbackup disk changes`` as scripts see them: exit codes, JSON shapes and
one-line errors that name the Windows error.

Most cases run the command's entry point in this process (a new interpreter costs half a second each);
one runs ``python -m hvbackup`` for real, as tests/cli/test_cli.py does for every other command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hvbackup import stack, tracking
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.units import MiB


def one_line_error(result: subprocess.CompletedProcess, name: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"hvbackup: error: {name}: "), result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    return result.stderr


@pytest.fixture
def vhdx(tmp_path) -> str:
    path = str(tmp_path / "disk.vhdx")
    stack.create(path, 64 * MiB).close()
    return path


def test_tracking_on_status_off(hv, hv_json, vhdx):
    keys = {"enabled", "newer_changes", "most_recent_id", "state", "problem", "granularity"}
    off = hv_json("disk", "tracking", vhdx, "status")
    assert set(off) == keys and (off["enabled"], off["most_recent_id"], off["state"]) == (False, None, "disabled")

    on = hv_json("disk", "tracking", vhdx, "on", "--granularity", "1M")
    assert on["enabled"] and on["state"] == "active" and on["granularity"] == MiB and not on["newer_changes"]
    assert on["most_recent_id"].startswith("rctX:") and len(on["most_recent_id"]) == 50
    assert hv_json("disk", "tracking", vhdx, "on") == on  # already on: nothing changes
    with stack.open(vhdx) as disk:
        disk.write(0, b"x")
        assert disk.status().newer_changes
    status = hv("disk", "tracking", vhdx, "status")
    assert status.returncode == 0 and "active" in status.stdout and "1.0 MiB" in status.stdout

    assert hv_json("disk", "tracking", vhdx, "off")["state"] == "disabled"
    assert hv("disk", "tracking", vhdx, "off").returncode == 0


@pytest.mark.parametrize("args, message", [
    (["status", "--granularity", "1M"], "only 'on'"),
    (["on", "--granularity", "3K"], "power of two"),
    (["sideways"], "sideways"),
])
def test_tracking_usage_errors(hv, vhdx, args, message):
    result = hv("disk", "tracking", vhdx, *args)
    assert result.returncode == 2 and result.stderr.startswith("hvbackup: error:") and message in result.stderr


def test_changing_the_granularity_of_running_tracking_is_refused(hv, vhdx):
    tracking.enable(vhdx, granularity=64 * 1024)
    result = hv("disk", "tracking", vhdx, "on", "--granularity", "1M")
    assert result.returncode == 2 and "switch it off first" in result.stderr
    assert tracking.status(vhdx).granularity == 64 * 1024


def test_changes_json_and_table(hv, hv_json, vhdx):
    since = tracking.enable(vhdx, granularity=MiB).most_recent_id
    with stack.open(vhdx) as disk:
        disk.write(3 * MiB + 5, b"a" * 100)
        disk.write(10 * MiB, b"b" * 3 * MiB)
        disk.trim(40 * MiB, MiB)
    ranges = hv_json("disk", "changes", vhdx, "--since", since)
    assert ranges == [{"offset": 3 * MiB, "length": MiB}, {"offset": 10 * MiB, "length": 3 * MiB},
                      {"offset": 40 * MiB, "length": MiB}]
    part = hv_json("disk", "changes", vhdx, "--since", since, "--offset", "11M", "--length", "30M")
    assert part == [{"offset": 11 * MiB, "length": 2 * MiB}, {"offset": 40 * MiB, "length": MiB}]
    newest = tracking.status(vhdx).most_recent_id
    assert hv_json("disk", "changes", vhdx, "--since", newest) == []

    table = hv("disk", "changes", vhdx, "--since", since)
    assert table.returncode == 0 and "0xa00000" in table.stdout
    assert f"3 ranges, 5.0 MiB changed of 64.0 MiB since {since}" in table.stdout


def test_changes_errors_name_the_windows_error(hv, hv_json, tmp_path, vhdx):
    unknown = "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001"
    error = one_line_error(hv("disk", "changes", vhdx, "--since", unknown), "ERROR_VHD_CHANGE_TRACKING_DISABLED")
    assert "a full backup is needed" in error

    since = tracking.enable(vhdx).most_recent_id
    error = one_line_error(hv("disk", "changes", vhdx, "--since", unknown), "ERROR_VHD_INVALID_CHANGE_TRACKING_ID")
    assert "a full backup is needed" in error
    malformed = one_line_error(hv("disk", "changes", vhdx, "--since", "bogus", "--length", "0"),
                               "Invalid value for --since")
    assert "malformed" in malformed and "full backup" not in malformed
    past = one_line_error(hv("disk", "changes", vhdx, "--since", since, "--offset", "64M", "--length", "1"),
                          "Invalid value for --length")
    assert "past the end of the disk" in past
    one_line_error(hv("disk", "changes", tmp_path / "missing.vhdx", "--since", since), "ERROR_FILE_NOT_FOUND")
    error = one_line_error(hv("disk", "changes", tmp_path / "set.vhds", "--since", since), "ERROR_VHD_SHARED")
    assert "RSVD" in error

    with VhdxDisk.open(vhdx) as foreign:  # a writer that does not track
        foreign.write(0, b"f" * 4096)
    status = hv_json("disk", "tracking", vhdx, "status")
    assert status["state"] == "changed_offline" and status["most_recent_id"] is None and status["problem"]
    text = hv("disk", "tracking", vhdx, "status")
    assert text.returncode == 0 and "full one" in text.stdout
    error = one_line_error(hv("disk", "changes", vhdx, "--since", since), "ERROR_CTLOG_VHD_CHANGED_OFFLINE")
    assert "a full backup is needed" in error

    restarted = hv_json("disk", "tracking", vhdx, "on")
    assert restarted["state"] == "active" and restarted["most_recent_id"] != since
    one_line_error(hv("disk", "changes", vhdx, "--since", since), "ERROR_CTLOG_VHD_CHANGED_OFFLINE")


def test_a_real_process(vhdx):
    since = tracking.enable(vhdx).most_recent_id
    with stack.open(vhdx) as disk:
        disk.write(MiB, b"x")
    command = [sys.executable, "-m", "hvbackup", "disk", "changes", vhdx, "--since"]
    done = subprocess.run([*command, since, "--json"], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout) == [{"offset": MiB, "length": 64 * 1024}]
    failed = subprocess.run([*command, since[:-1] + "f"], capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stdout == "" and failed.stderr.count("\n") == 1
    assert failed.stderr.startswith("hvbackup: error: ERROR_VHD_INVALID_CHANGE_TRACKING_ID: ")
