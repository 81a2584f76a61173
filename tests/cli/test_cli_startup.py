"""A command loads what it uses: ``--version`` answers before anything is imported, help loads no
layer, and a disk command loads the disk engine but not the host, the backup application or rich.
(The times are measured by bench/bench_startup.py; this holds the cause of them.)"""

from __future__ import annotations

import json
import subprocess
import sys

from hvbackup import __version__

PROBE = """
import json, sys
sys.argv = ["hvbackup", *json.loads(sys.argv[1])]
from hvbackup.cli import main
try:
    main()
except SystemExit:
    pass
watched = ("typer", "click", "numpy", "rich", "hvbackup.disks", "hvbackup.tracking", "hvbackup.host",
           "hvbackup.backup", "hvbackup.virtdisk")
sys.stderr.write(json.dumps(sorted(m for m in watched if m in sys.modules)) + "\\n")
"""


def loaded(*args: str) -> tuple[str, list[str]]:
    """What ``hvbackup ARGS`` printed, and which of the watched modules it loaded."""
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True)
    return done.stdout, json.loads(done.stderr.strip().splitlines()[-1])


def test_version_answers_before_anything_is_loaded():
    for flag in ("--version", "-V"):
        out, modules = loaded(flag)
        assert out == f"hvbackup {__version__}\n"
        assert modules == []


def test_help_loads_no_layer():
    out, modules = loaded("--help")
    assert "Usage: hvbackup" in out
    assert modules == ["click", "typer"]
    _, modules = loaded("backup", "--help")
    assert modules == ["click", "typer"]


def test_a_disk_command_loads_the_disk_engine_only(tmp_path):
    from hvbackup import disks

    disks.create(tmp_path / "d.vhdx", 1 << 30).close()
    out, modules = loaded("disk", "info", str(tmp_path / "d.vhdx"), "--json")
    assert json.loads(out)["format"] == "vhdx"
    assert "hvbackup.disks" in modules and "numpy" in modules
    assert not {"rich", "hvbackup.host", "hvbackup.backup"} & set(modules), modules
