"""Shared test options.

``--full`` runs every crash and fuzz case; without it the slow tests run a bounded sample so the
whole suite stays within CI's time budget. Interop tests need qemu-img, qemu-io, vhdiinfo and
libvhdi-python, which ``.ci/run`` installs: a missing tool is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["backup_world"]  # the ``where`` fixture of the backup commands' tests

settings.register_profile(
    "bounded", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "full", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run every slow crash and fuzz case")


def pytest_configure(config: pytest.Config) -> None:
    settings.load_profile("full" if config.getoption("--full") else "bounded")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every case of a slow test can take far longer than CI's per-test bound; give them an hour each.
    if config.getoption("--full"):
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(pytest.mark.timeout(3600))


@pytest.fixture
def full(request: pytest.FixtureRequest) -> bool:
    """True when the whole slow suite was asked for."""
    return bool(request.config.getoption("--full"))


@pytest.fixture
def sample(full: bool):
    """``sample(bounded, complete)``: how many cases a slow test runs."""
    return lambda bounded, complete: complete if full else bounded



@pytest.fixture
def hv(monkeypatch, capsys):
    """``hv(ARGS)`` runs ``hvbackup ARGS`` through its entry point in this process and returns what
    a process would give back (exit code, stdout, stderr)."""
    from hvbackup.cli import main

    def run(*args) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["hvbackup", *map(str, args)])
        with pytest.raises(SystemExit) as exited:
            main()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, exited.value.code, out, err)
    return run


@pytest.fixture
def hv_json(hv):
    """``hv_json(ARGS)`` runs ``hvbackup ARGS --json``, expects success, and returns the parsed output."""
    def run(*args):
        result = hv(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    return run


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(bytes)``: a tmpfs of that size mounted for the test, to run out of space in
    (needs root; skipped otherwise), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size: int) -> Path:
        point = tmp_path / f"small{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
