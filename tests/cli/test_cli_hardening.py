"""Every command, fed bad input, fails the way docs/cli.md promises: one line on stderr starting
``hvbackup: error:`` that names what was wrong, exit code 2 — never a traceback, never an internal
error, never a nonsense answer.

The bad-input matrix walks the command tree (``hvbackup.cli.app.app``), so a new command or option is
tried automatically: each value parameter gets a role from its metavar (FILE, DIR, SIZE, VM, ID, ...)
and each role its bad values — for paths: missing, a directory where a file belongs, a file where a
directory belongs, a path under a regular file, not a disk, no permission (run as ``nobody`` in one
subprocess that drops privileges after loading everything), on a full file system (a small tmpfs,
root only). Every other parameter gets a good value from a shared world (a host with a running VM,
checkpoints, a reference point, an export, a repository with a restore point, a tracked disk).

The second half holds one test per rule the CLI keeps (ids and paths never wrapped, bad values
refused, no traceback, the suffix chooses the format, host-owned files left to the host, damaged VM
documents reported per VM, VM names checked, help matches behaviour)."""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from hvbackup.units import MiB

NOBODY = 65534
DOCUMENTED_EXIT_CODES = {0, 1, 2, 130, 143}
GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
RCT_ID = re.compile(r"rctX:[0-9a-f]{8}(?::[0-9a-f]{4}){3}:[0-9a-f]{12}:[0-9a-f]{8}")
TYPE_LABEL = re.compile(r"<(?:str|bool|int|float|Path|File\w*|list\[\w+\]|\w+ range)>")
IS_ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def no_defaults_from_the_environment(monkeypatch):
    for name in ("HVBACKUP_HOST", "HVBACKUP_REPO", "HVBACKUP_PASSPHRASE", "HVBACKUP_DEBUG"):
        monkeypatch.delenv(name, raising=False)


def run_cli(*args) -> tuple[int, str, str]:
    """One command line through ``hvbackup.cli.run`` in this process: (exit code, stdout, stderr)."""
    from hvbackup.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run_json(*args):
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def one_line_error(code: int, stderr: str, *words: str) -> str:
    assert "Traceback" not in stderr, stderr
    assert code == 2, f"exit {code}: {stderr}"
    assert stderr.startswith("hvbackup: error: ") and stderr.count("\n") == 1, stderr
    assert "hvbackup: error: internal error" not in stderr, stderr
    assert all(w in stderr for w in words), stderr
    return stderr


# -- the command tree ---------------------------------------------------------------------------------

def leaf_commands() -> list[tuple[tuple[str, ...], object]]:
    """(path, click command) of every command, e.g. (("disk", "create"), <command>)."""
    import typer

    from hvbackup.cli.app import app

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            yield tuple(path), command
            return
        for name, sub in sorted(subcommands.items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


COMMANDS = dict(leaf_commands())


def value_params(command) -> list:
    """The parameters that take a value (arguments and non-flag options)."""
    return [p for p in command.params if p.name != "help" and not getattr(p, "is_flag", False)]


def is_choice(param) -> bool:
    return isinstance(param.type, click.Choice)


# What a parameter is, from its metavar; the few whose metavar does not say it are named here.
METAVAR_ROLES = {
    "FILE": "in-disk", "SRC": "in-disk", "A": "in-disk", "B": "in-disk", "CHILD": "in-disk",
    "PATH": "new-file", "DST": "new-file", "DIR": "in-dir", "DEST": "new-dir",
    "SIZE": "size", "N": "count", "BYTES": "sector", "BYTE": "byte", "AGE": "age", "TEXT": "text",
    "VM": "vm", "VM...": "vm", "NAME": "vm-name",
    "ID": "id", "CHECKPOINT": "id", "POINT_ID": "id", "[POINT_ID]...": "id",
}
ROLES = {
    ("vm io", "file"): "in-file",
    ("vm io", "out"): "out-file",
    ("vm import", "definition"): "in-doc",
    ("restore", "to"): "new-file",
    ("host init", "directory"): "new-dir",
    ("repo init", "path"): "new-dir",
    ("quickstart", "directory"): "new-dir",
    ("checkpoint create", "name"): "text",  # checkpoint names are free text
}


def role_of(command: tuple[str, ...], param) -> str | None:
    role = ROLES.get((" ".join(command), param.name))
    if role is None and is_choice(param):
        role = "choice"
    return role or METAVAR_ROLES.get(param.metavar)


# The bad values of each role; path kinds are resolved in the world (``World.bad_path``).
BAD = {
    "in-disk": ["missing", "directory", "under-file", "not-a-disk", "no-permission"],
    "in-doc": ["missing", "directory", "under-file", "not-a-disk", "no-permission"],
    "in-file": ["missing", "directory", "under-file", "no-permission"],
    "in-dir": ["missing", "file", "under-file", "empty-dir", "no-permission"],
    "new-file": ["existing", "directory", "under-file", "missing-parent", "no-permission", "full"],
    "out-file": ["directory", "under-file", "missing-parent", "no-permission", "full"],
    "new-dir": ["file", "under-file", "no-permission", "full"],
    "size": ["-1", "1Q", "0.5"],
    "count": ["-1", "x"],
    "sector": ["-1", "x", "1000"],
    "byte": ["256", "x"],
    "age": ["-1d", "soon"],
    "vm": ["nope"],
    "vm-name": ["a/b", "../x", ".x"],
    "id": ["nope", "rctX:zz"],
    "choice": ["bogus"],
    "text": [],
}
PATH_KINDS = {kind for role, kinds in BAD.items() if role.startswith(("in-", "new-", "out-")) for kind in kinds}
# What the error line must mention, besides the option's name or the parameter's metavar.
TOKENS = {"missing": "MISSING", "directory": "A-DIR", "under-file": "PLAIN", "not-a-disk": "PLAIN",
          "existing": "PLAIN", "file": "PLAIN", "empty-dir": "A-DIR", "missing-parent": "NOWHERE",
          "full": "FULL", "no-permission": None}


def matrix():
    for command, click_command in COMMANDS.items():
        for param in value_params(click_command):
            for kind in BAD.get(role_of(command, param) or "", []):
                name = " ".join(command)
                marks = []
                if kind == "full" and not IS_ROOT:
                    marks.append(pytest.mark.skip(reason="mounting a full tmpfs needs root"))
                yield pytest.param(command, param.name, kind, id=f"{name}:{param.name}:{kind}", marks=marks)


CASES = list(matrix())


def test_every_value_parameter_of_every_command_has_a_role():
    unknown = [(" ".join(c), p.name, p.metavar) for c, cmd in COMMANDS.items() for p in value_params(cmd)
               if role_of(c, p) is None]
    assert unknown == [], "give these parameters a metavar the matrix knows, or a role in ROLES"
    assert {("backup",), ("points",), ("restore",), ("verify",), ("forget",), ("repo", "init"), ("host", "init"),
            ("quickstart",), ("disk", "create"), ("vm", "io"), ("checkpoint", "list")} <= set(COMMANDS)
    assert len(CASES) > 150


# -- the world ----------------------------------------------------------------------------------------

@dataclass
class World:
    root: Path
    host: str
    repo: str
    disk: str            # a tracked VHDX outside any host
    since: str           # its change tracking ID
    definition: str      # an exported VM's definition file
    checkpoint: str      # a recovery checkpoint of web
    refpoint: str        # a reference point of web
    point: str           # a restore point of web
    full: Path | None    # a full tmpfs, when root
    counter: itertools.count

    def fresh(self, stem: str) -> str:
        return str(self.root / f"{stem}-{next(self.counter)}")

    def bad_path(self, role: str, kind: str) -> str:
        suffix = ".vhdx" if role in ("in-disk", "new-file") else ""
        w = self.root
        if kind == "no-permission":
            return str(w / ("SECRET.vhdx" if role in ("in-disk", "in-doc", "in-file") else
                            "LOCKED" if role == "in-dir" else f"LOCKED/new{suffix}"))
        if kind == "full":
            return str(self.full / f"new-{next(self.counter)}{suffix}")
        return str({"missing": w / f"MISSING{suffix}", "directory": w / "A-DIR", "empty-dir": w / "A-DIR",
                    "under-file": w / "PLAIN" / f"x{suffix}", "not-a-disk": w / "PLAIN", "existing": w / "PLAIN",
                    "file": w / "PLAIN", "missing-parent": w / "NOWHERE" / f"new{suffix}"}[kind])


def _mount_full_tmpfs(where: Path) -> Path | None:
    if not IS_ROOT:
        return None
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0777", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        with open(where / "filler", "wb") as f:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    return where


@pytest.fixture(scope="module")
def world():
    root = Path(tempfile.mkdtemp(prefix="hvb-hard-"))  # not under pytest's 0700 directory: nobody traverses it
    os.chmod(root, 0o755)
    full = None
    try:
        host, repo = str(root / "host"), str(root / "repo")
        run_json("host", "init", host)
        run_json("vm", "create", "web", "--disk", "8M", "--disk", "4M", "--host", host)
        run_json("vm", "create", "db", "--disk", "4M", "--host", host)
        run_json("vm", "start", "web", "--host", host)
        run_json("vm", "io", "web", "write", "--offset", "0", "--pattern", "1", "--length", "64K", "--host", host)
        first = run_json("checkpoint", "create", "web", "--type", "recovery", "--host", host)["id"]
        definition = run_json("vm", "export", "web", root / "export", "--checkpoint", first,
                              "--host", host)["definition_file"]
        refpoint = run_json("refpoint", "convert", first, "--host", host)["instance_id"]
        checkpoint = run_json("checkpoint", "create", "web", "--type", "recovery", "--host", host)["id"]
        run_json("repo", "init", repo)
        [backed_up] = run_json("backup", "web", "--host", host, "--repo", repo)
        disk = str(root / "disk.vhdx")
        run_json("disk", "create", disk, "--size", "4M")
        since = run_json("disk", "tracking", disk, "on")["most_recent_id"]
        (root / "PLAIN").write_text("not a disk\n")
        (root / "A-DIR").mkdir()
        shutil.copy(disk, root / "SECRET.vhdx")
        os.chmod(root / "SECRET.vhdx", 0)
        (root / "LOCKED").mkdir()
        (root / "LOCKED" / "host.json").write_text("{}")
        os.chmod(root / "LOCKED", 0)
        # nobody may use the host and repository: only what a case makes unreadable is refused
        for tree in (host, repo, root / "export"):
            subprocess.run(["chmod", "-R", "a+rwX", str(tree)], check=True)
        full = _mount_full_tmpfs(root / "FULL")
        yield World(root, host, repo, disk, since, definition, checkpoint, refpoint, backed_up["point_id"], full,
                    itertools.count())
    finally:
        if full is not None:
            subprocess.run(["umount", "-l", str(full)], check=False)
        os.chmod(root / "LOCKED", 0o755) if (root / "LOCKED").exists() else None
        shutil.rmtree(root, ignore_errors=True)


def good_value(world: World, command: str, param) -> str:
    role = role_of(tuple(command.split()), param)
    if param.name == "host_dir":
        return world.host
    if param.name == "repo_path":
        return world.repo
    if command == "disk changes" and param.name == "since":
        return world.since
    if command in ("refpoint destroy",) or (command, param.name) == ("vm export", "base"):
        return world.refpoint
    if role == "id":
        return world.point if command in ("restore", "forget") else world.checkpoint
    if role == "choice":
        first = param.type.choices[0]
        return {"disk tracking": "status", "vm io": "read"}.get(command, first)
    return {"in-disk": world.disk, "in-doc": world.definition, "in-file": str(world.root / "PLAIN"),
            "new-file": world.fresh("new") + ".vhdx", "out-file": world.fresh("out") + ".bin",
            "new-dir": world.fresh("newdir"), "size": "1M", "count": "0", "sector": "512", "byte": "1",
            "age": "1d", "text": "x", "vm": "web", "vm-name": world.fresh("fresh").rsplit("/", 1)[1]}[role]


def command_line(world: World, command: tuple[str, ...], tested: str, bad: str) -> list[str]:
    """``command`` with ``bad`` for the parameter ``tested`` and good values for what it needs besides."""
    name = " ".join(command)
    click_command = COMMANDS[command]
    values: dict[str, str] = {}
    extra: list[str] = []
    for param in value_params(click_command):
        if param.name == tested:
            values[param.name] = bad
        elif param.required or param.name in ("host_dir", "repo_path"):
            values[param.name] = good_value(world, name, param)
    # what a command needs besides its required parameters for the tested one to matter
    if name == "disk create" and tested not in ("parent", "size"):
        extra += ["--size", "1M"]
    if name == "disk create" and tested == "parent":
        extra += ["--type", "differencing"]
    if name == "disk tracking" and tested == "granularity":
        values["action"] = "on"
    if name == "vm io" and tested != "action":
        values["action"] = "write" if tested in ("pattern", "file") else "read"
        if tested not in ("file", "length"):
            extra += ["--length", "1M" if tested == "out" else "1"]
    if name == "vm import":
        extra += ["--new-id"]
    if name == "restore" and tested in ("disk", "to", "format"):
        values.pop("host_dir", None)  # the one-disk form takes no --host
        if tested != "disk":
            extra += ["--disk", "0"]
        if tested != "to":
            extra += ["--to", world.fresh("restored") + ".img"]
    if name == "forget":
        extra += ["--dry-run"] + ([] if tested == "point_ids" or tested.startswith("keep_") else ["--keep-last", "5"])
    if name == "checkpoint list" and tested == "older_than":
        extra += ["--orphaned"]
    argv = list(command)
    for param in value_params(click_command):
        if param.name in values and param.param_type_name == "argument":
            argv.append(values[param.name])
    for param in value_params(click_command):
        if param.name in values and param.param_type_name != "argument":
            argv += [max(param.opts, key=len), values[param.name]]
    return argv + extra


def case(world: World, command: tuple[str, ...], tested: str, kind: str) -> tuple[list[str], str | None]:
    """The command line of one case, and a word its error line must hold (None: the option's name will do)."""
    param = next(p for p in value_params(COMMANDS[command]) if p.name == tested)
    role = role_of(command, param)
    if kind in PATH_KINDS:
        value, token = world.bad_path(role, kind), TOKENS[kind]
        if kind == "no-permission":
            token = "SECRET" if "SECRET" in value else "LOCKED"
    else:
        value, token = kind, kind
    return command_line(world, command, tested, value), token


def check_failure(command, tested: str, argv: list[str], token: str | None, code, stdout: str, stderr: str,
                  path: bool = False) -> None:
    param = next(p for p in value_params(COMMANDS[command]) if p.name == tested)
    # a bad path must be named; a bad value named, or its option
    names = [] if path else [*getattr(param, "opts", []), param.metavar or "", param.name]
    assert "Traceback" not in stderr + stdout, stderr
    assert code in DOCUMENTED_EXIT_CODES, (argv, code, stderr)
    if command == ("disk", "check") and token == "PLAIN" and code == 1:
        # check's answer for a file that is not a disk: the problem, listed, exit 1
        assert stdout.startswith("problem: ") and "PLAIN" in stdout and "not a disk" in stdout, stdout
        return
    assert code == 2, f"{argv} was accepted (exit {code}): {stdout}{stderr}"
    assert stderr.startswith("hvbackup: error: ") and stderr.count("\n") == 1, (argv, stderr)
    assert not stderr.startswith("hvbackup: error: internal error"), (argv, stderr)
    if token:
        mentioned = token in stderr or any(n and n in stderr for n in names)
        assert mentioned, f"{argv}: the error does not say what was wrong: {stderr}"
    if token in ("SECRET", "LOCKED"):
        assert "ermission" in stderr, f"{argv}: the error does not say permission was denied: {stderr}"


@pytest.mark.parametrize("command, tested, kind", [c for c in CASES if c.values[2] != "no-permission"])
def test_bad_input_fails_with_one_line_and_exit_2(world, hv, command, tested, kind):
    argv, token = case(world, command, tested, kind)
    done = hv(*argv)
    check_failure(command, tested, argv, token, done.returncode, done.stdout, done.stderr, kind in PATH_KINDS)


# -- no permission: all such cases in one process that drops to nobody once everything is loaded -------

_AS_NOBODY = r"""
import contextlib, io, json, os, pkgutil, sys, traceback
import hvbackup
from hvbackup.cli import run
for module in pkgutil.walk_packages(hvbackup.__path__, "hvbackup."):
    if not module.name.endswith("__main__"):
        try:
            __import__(module.name)
        except ImportError:
            pass
import encodings, hashlib, tempfile, shutil, uuid, secrets, getpass, concurrent.futures
for module in pkgutil.iter_modules(encodings.__path__, "encodings."):  # codecs load on first use
    try:
        __import__(module.name)
    except ImportError:
        pass
# the command line machinery builds its value checkers lazily: let it load what it needs as root
for warm in (["disk", "info", "/nonexistent"], ["vm", "io", "x", "read", "--disk", "1", "--offset", "0"],
             ["forget", "--keep-last", "1", "--vm", "x", "p"], ["backup", "x", "--method", "export"],
             ["disk", "create", "/nonexistent/x", "--size", "1", "-O", "vhdx", "--logical-sector-size", "512"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run(warm)
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
results = {}
for key, argv in json.load(sys.stdin).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run(argv)
        except BaseException:
            traceback.print_exc()
            code = None
    results[key] = [code, out.getvalue(), err.getvalue()]
json.dump(results, sys.__stdout__)
"""

NO_PERMISSION = [c for c in CASES if c.values[2] == "no-permission"]


@pytest.fixture(scope="module")
def as_nobody(world):
    """{case id: (argv, token, exit code, stdout, stderr)} of every no-permission case, run as nobody."""
    if not IS_ROOT:
        pytest.skip("running as nobody needs root")
    for tree in (world.host, world.repo):  # what root's cases made since the world was built, too
        subprocess.run(["chmod", "-R", "a+rwX", tree], check=True)
    lines = {}
    for c in NO_PERMISSION:
        command, tested, kind = c.values
        lines[c.id] = case(world, command, tested, kind)
    done = subprocess.run([sys.executable, "-c", _AS_NOBODY], input=json.dumps({k: v[0] for k, v in lines.items()}),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    return {k: (*lines[k], *results[k]) for k in lines}


@pytest.mark.parametrize("command, tested, kind", NO_PERMISSION)
def test_a_path_without_permission_fails_with_one_line_and_exit_2(as_nobody, request, command, tested, kind):
    key = request.node.callspec.id
    argv, token, code, stdout, stderr = as_nobody[key]
    check_failure(command, tested, argv, token, code, stdout, stderr, path=True)


def test_bad_input_in_real_processes(world):
    """A few of the cases through the installed entry point: what a user's shell sees."""
    cases = [
        ["disk", "info", world.root / "MISSING.vhdx"],
        ["disk", "info", world.root / "A-DIR"],
        ["disk", "convert", world.disk, world.root / "PLAIN" / "x.vhdx"],
        ["vm", "io", "web", "read", "--offset", "0", "--length", "1", "--out", world.root / "NOWHERE" / "x",
         "--host", world.host],
        ["vm", "io", "web", "write", "--offset", "0", "--file", world.root / "A-DIR", "--host", world.host],
        ["vm", "list", "--host", world.root / "PLAIN"],
        ["host", "init", world.root / "PLAIN" / "h"],
        ["disk", "changes", world.disk, "--since", "nope"],
        ["restore", "nope", "--repo", world.root / "A-DIR"],
    ]
    if world.full is not None:
        cases.append(["disk", "create", world.full / "x.vhdx", "--size", "8M"])
    for argv in cases:
        done = subprocess.run([sys.executable, "-m", "hvbackup", *map(str, argv)], capture_output=True, text=True,
                              timeout=60)
        one_line_error(done.returncode, done.stderr)
        assert done.stdout == ""


# == the rules ==========================================================================================

@pytest.fixture
def host(hv_json, tmp_path, monkeypatch):
    """A host (HVBACKUP_HOST) with VM web (16M and 8M disks), running, and VM db (4M), off."""
    monkeypatch.setenv("HVBACKUP_HOST", str(tmp_path / "host"))
    hv_json("host", "init", tmp_path / "host")
    web = hv_json("vm", "create", "web", "--disk", "16M", "--disk", "8M")
    db = hv_json("vm", "create", "db", "--disk", "4M")
    hv_json("vm", "start", "web")
    return {"dir": tmp_path / "host", "web": web, "db": db}


def _long_named_disk(tmp_path: Path) -> Path:
    deep = tmp_path / ("a-directory-with-a-long-name-" * 3) / ("and-another-one-" * 3)
    deep.mkdir(parents=True)
    return deep / "disk-with-a-long-name-too.vhdx"


def _pty_run(argv: list[str], cwd: Path, columns: int = 80) -> str:
    """Run in a pseudo-terminal ``columns`` wide (stdout a terminal, as a user sees it)."""
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm"}
    process = subprocess.Popen([sys.executable, "-m", "hvbackup", *map(str, argv)], stdin=follower, stdout=follower,
                               stderr=subprocess.PIPE, cwd=cwd, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_ids_and_paths_are_never_wrapped_in_a_pipe_or_narrow_terminal(hv, hv_json, host, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    first = hv_json("checkpoint", "create", "web", "--type", "recovery")
    hv_json("refpoint", "convert", first["id"])
    hv_json("checkpoint", "create", "web", "--type", "recovery", "--name", "a checkpoint with a long name")
    disk = _long_named_disk(tmp_path)
    hv_json("disk", "create", disk, "--size", "4M")
    hv_json("disk", "tracking", disk, "on")
    stray = Path(host["web"]["disks"][0]).parent / "left-behind-by-a-backup-with-a-long-name.avhdx"
    stray.write_bytes(b"x")

    shown = {  # command: what its text output must show, each on one line, from its JSON output
        ("vm", "list"): lambda d: [vm["id"] for vm in d],
        ("checkpoint", "list"): lambda d: [c["id"] for c in d],
        ("refpoint", "list"): lambda d: [p["instance_id"] for p in d]
        + [i for p in d for i in p["resilient_change_tracking_identifiers"]],
        ("checkpoint", "list", "--orphaned"): lambda d: [f["path"] for f in d["files"]],
        ("disk", "check", disk): lambda d: [d["path"]],
        ("disk", "info", disk): lambda d: [d["path"], d["disk_id"]],
        ("disk", "tracking", disk, "status"): lambda d: [d["most_recent_id"]],
    }
    for argv, expected in shown.items():
        text = hv(*argv)
        assert text.returncode == 0, text.stderr
        values = expected(hv_json(*argv))
        assert values and all(values)
        for value in values:
            assert any(value in line for line in text.stdout.splitlines()), \
                f"{argv}: {value} is not whole on one line:\n{text.stdout}"
    assert str(stray) in hv("checkpoint", "list", "--orphaned").stdout.splitlines()[0]
    created = hv("vm", "create", "app", "--disk", "1M").stdout.splitlines()
    [app] = [vm for vm in hv_json("vm", "list") if vm["name"] == "app"]
    assert app["id"] in created[0] and created[1].strip() == app["disks"][0]

    # a real 80-column terminal: the same tables, nothing folded
    listed = _pty_run(["vm", "list", "--host", host["dir"]], tmp_path)
    for vm_id in (host["web"]["id"], host["db"]["id"]):
        assert any(vm_id in line for line in listed.splitlines()), listed
    checked = _pty_run(["disk", "check", disk], tmp_path)
    assert f"{disk}: no problems found" in checked.splitlines(), checked


def test_every_path_printed_is_absolute_and_counts_agree_with_their_nouns(hv, hv_json, host, tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = hv_json("checkpoint", "create", "web", "--type", "recovery")
    export = hv_json("vm", "export", "web", "exports", "--checkpoint", checkpoint["id"])
    assert export["directory"] == str(tmp_path / "exports" / "web")
    for path in [export["definition_file"], *export["virtual_hard_disks"]]:
        assert os.path.isabs(path) and os.path.isfile(path)
    text = hv("vm", "export", "web", "exports2", "--checkpoint", checkpoint["id"])
    shown = [line.split("  ")[0] for line in text.stdout.splitlines()[1:]]
    assert len(shown) == 3 and all(os.path.isabs(p) and os.path.isfile(p) for p in shown), text.stdout

    created = hv("disk", "create", "rel.vhdx", "--size", "1M")
    assert f"created {tmp_path / 'rel.vhdx'}:" in created.stdout
    assert hv_json("disk", "create", "rel2.vhdx", "--size", "1M")["path"] == str(tmp_path / "rel2.vhdx")
    child = hv_json("disk", "create", "child.avhdx", "--type", "differencing", "--parent", "rel.vhdx")
    assert (child["path"], child["parent"]) == (str(tmp_path / "child.avhdx"), str(tmp_path / "rel.vhdx"))
    assert hv_json("disk", "info", "child.avhdx")["path"] == str(tmp_path / "child.avhdx")
    assert hv_json("disk", "check", "rel.vhdx")["path"] == str(tmp_path / "rel.vhdx")
    assert f"{tmp_path / 'rel.vhdx'}: no problems found" in hv("disk", "check", "rel.vhdx").stdout
    converted = hv("disk", "convert", "child.avhdx", "flat.img")
    assert f"converted {tmp_path / 'child.avhdx'} -> {tmp_path / 'flat.img'} " in converted.stdout
    assert hv_json("disk", "merge", "child.avhdx") == {"merged": str(tmp_path / "child.avhdx"),
                                                         "into": str(tmp_path / "rel.vhdx")}
    read = hv_json("vm", "io", "web", "read", "--offset", "0", "--length", "4K", "--out", "out.bin")
    assert read["out"] == str(tmp_path / "out.bin")

    one = hv("vm", "create", "one", "--disk", "1M")
    assert "with 1 disk\n" in one.stdout and "1 disks" not in one.stdout
    assert "with 2 disks" in hv("vm", "import", export["definition_file"], "--new-id", "--name", "copy").stdout
    one_line_error(*_code_err(hv("vm", "io", "web", "--disk", "2", "read", "--offset", "0", "--length", "1")),
                   "has 2 disks")
    hv_json("vm", "start", "one")
    one_line_error(*_code_err(hv("vm", "io", "one", "--disk", "1", "read", "--offset", "0", "--length", "1")),
                   "has 1 disk;")
    hv_json("disk", "tracking", "rel.vhdx", "on")
    since = hv_json("disk", "tracking", "rel.vhdx", "status")["most_recent_id"]
    assert "0 ranges," in hv("disk", "changes", "rel.vhdx", "--since", since).stdout
    from hvbackup import stack

    with stack.open(tmp_path / "rel.vhdx") as d:  # a tracked writer
        d.write(0, b"x")
    assert "1 range," in hv("disk", "changes", "rel.vhdx", "--since", since).stdout


def _code_err(done) -> tuple[int, str]:
    return done.returncode, done.stderr


def test_bad_values_get_a_clear_error_never_a_nonsense_answer(hv, hv_json, host, tmp_path):
    disk = tmp_path / "d.vhdx"
    hv_json("disk", "create", disk, "--size", "64M")
    since = hv_json("disk", "tracking", disk, "on")["most_recent_id"]
    for args, words in [
        (["--offset", "1G"], ["--offset", "past the end"]),
        (["--offset", "64M", "--length", "1"], ["--length", "past the end"]),
        (["--offset", "60M", "--length", "8M"], ["past the end"]),
        (["--length", "65M"], ["past the end"]),
        (["--offset", "-4096"], ["--offset", "not a size"]),
        (["--length", "1.5"], ["--length", "whole number"]),
    ]:
        done = hv("disk", "changes", disk, "--since", since, *args)
        assert "-" not in done.stdout
        one_line_error(done.returncode, done.stderr, *words)
    for malformed in ["bogus", "rctX:", since[:-1], since + "0", since.replace("rctX", "rctY"), "x" * 300, ""]:
        error = one_line_error(*_code_err(hv("disk", "changes", disk, "--since", malformed)), "--since", "malformed")
        assert "full backup" not in error and "ERROR_" not in error
    # well formed, but of another disk: that one does mean a full backup
    other = "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001"
    one_line_error(*_code_err(hv("disk", "changes", disk, "--since", other)), "ERROR_VHD_INVALID_CHANGE_TRACKING_ID",
                   "a full backup is needed")
    assert hv_json("disk", "changes", disk, "--since", since, "--offset", "64M") == []  # an empty area is fine

    for argv, words in [
        (["disk", "tracking", disk, "on", "--granularity", "0"], ["--granularity", "power of two"]),
        (["disk", "tracking", disk, "on", "--granularity", "3K"], ["--granularity", "power of two"]),
        (["disk", "tracking", disk, "on", "--granularity", "512M"], ["--granularity"]),
        (["disk", "create", tmp_path / "z.vhdx", "--size", "0"], ["--size"]),
        (["disk", "create", tmp_path / "z.vhdx", "--size", "1M", "--logical-sector-size", "1024"], ["512 or 4096"]),
        (["disk", "create", tmp_path / "z.vhdx", "--size", "1M", "--parent", disk], ["--parent"]),
        (["disk", "create", tmp_path / "z.avhdx", "--type", "differencing"], ["--parent"]),
        (["disk", "create", tmp_path / "z.avhdx", "--type", "differencing", "--parent", disk, "--size", "1M"],
         ["--size"]),
        (["vm", "create", "x", "--disk", "1M", "--memory", "1.5M"], ["--memory", "whole number of MiB"]),
        (["vm", "create", "x", "--disk", "1M", "--memory", "512K"], ["--memory"]),
        (["vm", "create", "x", "--disk", "0"], ["--disk"]),
        (["vm", "io", "web", "read", "--offset", "16M", "--length", "1"], ["past the end of disk 0"]),
        (["vm", "io", "web", "--disk", "1", "write", "--offset", "8M", "--pattern", "1", "--length", "1"],
         ["past the end of disk 1"]),
        (["vm", "io", "web", "write", "--offset", "0", "--pattern", "-1", "--length", "1"], ["--pattern"]),
        (["vm", "export", "web", tmp_path / "e", "--checkpoint", "x", "--merge"], ["--merge", "--base"]),
        (["checkpoint", "list", "--older-than", "soon"], ["--older-than"]),
        (["checkpoint", "list", "--orphaned", "--older-than", "10y"], ["--older-than"]),
        (["checkpoint", "list", "web", "--orphaned"], ["--orphaned"]),
        (["checkpoint", "clean", "--older-than", "99999999999999999w"], ["--older-than"]),
    ]:
        one_line_error(*_code_err(hv(*argv)), *words)
    assert not (tmp_path / "z.vhdx").exists() and not (tmp_path / "z.avhdx").exists()
    assert not (tmp_path / "e").exists()


def test_no_command_ends_in_a_traceback(hv, hv_json, host, tmp_path):
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(5000))
    (tmp_path / "plain").write_text("x")
    for argv, words in [
        (["--out", tmp_path / "missing" / "out.bin"], ["missing"]),
        (["--out", tmp_path], ["is a directory"]),
        (["--out", tmp_path / "plain" / "out.bin"], ["plain", "not a directory"]),
    ]:
        done = hv("vm", "io", "web", "read", "--offset", "0", "--length", "1M", *argv)
        one_line_error(done.returncode, done.stderr, "--out", *words)
    for source, words in [(tmp_path / "missing.bin", ["No such file"]), (tmp_path, ["Is a directory"]),
                          ("/dev/zero", ["not a regular file"])]:
        one_line_error(*_code_err(hv("vm", "io", "web", "write", "--offset", "0", "--file", source)), "--file",
                       str(source), *words)
    assert hv_json("vm", "io", "web", "write", "--offset", "4K", "--file", payload)["length"] == 5000
    # a read that fails leaves nothing at --out, and what was there stays
    (tmp_path / "kept.bin").write_bytes(b"kept")
    one_line_error(*_code_err(hv("vm", "io", "web", "read", "--offset", "15M", "--length", "2M",
                                 "--out", tmp_path / "kept.bin")))
    one_line_error(*_code_err(hv("vm", "io", "web", "read", "--offset", "15M", "--length", "2M",
                                 "--out", tmp_path / "new.bin")))
    assert (tmp_path / "kept.bin").read_bytes() == b"kept" and not (tmp_path / "new.bin").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
    read = hv_json("vm", "io", "web", "read", "--offset", "4K", "--length", "5000", "--out", tmp_path / "kept.bin")
    assert (tmp_path / "kept.bin").read_bytes() == payload.read_bytes() and read["length"] == 5000
    assert hv_json("vm", "io", "web", "read", "--offset", "0", "--length", "1", "--out", "/dev/null")["length"] == 1
    # and through the real entry point
    done = subprocess.run([sys.executable, "-m", "hvbackup", "vm", "io", "web", "read", "--offset", "0", "--length",
                           "1", "--out", str(tmp_path / "missing" / "x")], capture_output=True, text=True,
                          env={**os.environ, "HVBACKUP_HOST": str(host["dir"])}, timeout=60)
    one_line_error(done.returncode, done.stderr, "--out")


@pytest.mark.parametrize("name, options, expected", [
    ("x.vhdx", [], ("vhdx", "dynamic")),
    ("x.VHDX", [], ("vhdx", "dynamic")),
    ("x.vhd", [], ("vhd", "dynamic")),
    ("x.vhd", ["--type", "fixed"], ("vhd", "fixed")),
    ("x.img", [], ("raw", "fixed")),
    ("x.raw", [], ("raw", "fixed")),
    ("x.bin", ["-O", "vhd"], ("vhd", "dynamic")),
    ("x.bin", ["--format", "raw"], ("raw", "fixed")),
    ("noext", ["-O", "vhdx"], ("vhdx", "dynamic")),
])
def test_the_file_name_suffix_chooses_the_format(hv_json, tmp_path, name, options, expected):
    created = hv_json("disk", "create", tmp_path / name, "--size", "4M", *options)
    assert (created["format"], created["type"]) == expected
    assert hv_json("disk", "info", tmp_path / name)["format"] == expected[0]


def test_differencing_and_converted_disks_take_their_format_from_the_suffix_too(hv, hv_json, tmp_path):
    hv_json("disk", "create", tmp_path / "base.vhd", "--size", "4M")
    hv_json("disk", "create", tmp_path / "base.vhdx", "--size", "4M")
    assert hv_json("disk", "create", tmp_path / "c.avhd", "--type", "differencing",
                   "--parent", tmp_path / "base.vhd")["format"] == "vhd"
    assert hv_json("disk", "create", tmp_path / "c.avhdx", "--type", "differencing",
                   "--parent", tmp_path / "base.vhdx")["format"] == "vhdx"
    for target, options, expected in [("a.vhd", [], "vhd"), ("a.avhdx", [], "vhdx"), ("a.img", [], "raw"),
                                      ("a.raw", [], "raw"), ("a.vhdx", [], "vhdx"), ("a.bin", ["-O", "vhd"], "vhd"),
                                      ("b.bin", ["--format", "vhdx"], "vhdx"),
                                      ("c.bin", ["--output-format", "raw"], "raw")]:
        assert hv_json("disk", "convert", tmp_path / "c.avhdx", tmp_path / target, *options)["format"] == expected
    for argv in [("disk", "create", tmp_path / "u.qcow2", "--size", "1M"),
                 ("disk", "create", tmp_path / "u", "--size", "1M"),
                 ("disk", "convert", tmp_path / "c.avhdx", tmp_path / "u.qcow2")]:
        one_line_error(*_code_err(hv(*argv)), "-O")
    one_line_error(*_code_err(hv("disk", "create", tmp_path / "v.vhdx", "--size", "1M", "-O", "vhd")), "v.vhdx")
    assert not any(p.name.startswith(("u", "v.")) for p in tmp_path.iterdir())
    assert "-O" in hv("disk", "create", "--help").stdout and "-O" in hv("disk", "convert", "--help").stdout


def test_files_a_host_owns_cannot_be_changed_by_disk_commands(hv, hv_json, host, tmp_path):
    hv_json("vm", "io", "web", "write", "--offset", "0", "--pattern", "7", "--length", "1M")
    checkpoint = hv_json("checkpoint", "create", "web", "--type", "recovery")
    base = checkpoint["disks"][0]["frozen"]
    disk_dir = Path(host["web"]["disks"][0]).parent
    active = next(p for p in disk_dir.iterdir() if p.name.startswith("web_disk0_") and p.suffix == ".avhdx")
    frozen = disk_dir / os.path.basename(base)
    (tmp_path / "link.avhdx").symlink_to(active)
    before = hv_json("vm", "io", "web", "read", "--offset", "0", "--length", "1M")["sha256"]
    attempts = [
        ("disk", "merge", active), ("disk", "merge", tmp_path / "link.avhdx"),
        ("disk", "check", active, "--repair"), ("disk", "check", frozen, "--repair"),
        ("disk", "tracking", active, "off"), ("disk", "tracking", frozen, "on"),
        ("disk", "tracking", host["db"]["disks"][0], "off"),
        ("disk", "create", disk_dir / "new.vhdx", "--size", "1M"),
        ("disk", "create", host["dir"] / "vms" / "new.vhdx", "--size", "1M"),
        ("disk", "convert", frozen, disk_dir / "copy.vhdx"),
        ("vm", "io", "web", "read", "--offset", "0", "--length", "1", "--out", frozen),
    ]
    for argv in attempts:
        error = one_line_error(*_code_err(hv(*argv)), "belongs to", "host")
        assert "VM web" in error or "VM db" in error or "host " in error
    assert not (disk_dir / "new.vhdx").exists() and not (disk_dir / "copy.vhdx").exists()
    assert not (host["dir"] / "vms" / "new.vhdx").exists()
    # the VM is unharmed and still tracked; what only reads works on the host's files
    assert hv_json("vm", "io", "web", "read", "--offset", "0", "--length", "1M")["sha256"] == before
    assert hv_json("checkpoint", "list", "web")[0]["id"] == checkpoint["id"]
    assert hv_json("disk", "tracking", active, "status")["state"] == "active"
    assert hv_json("disk", "info", active)["type"] == "differencing"
    assert hv_json("disk", "check", frozen)["ok"]
    hv_json("disk", "map", active)
    hv_json("disk", "changes", frozen, "--since", checkpoint["disks"][0]["rct_id"])
    hv_json("disk", "convert", active, tmp_path / "copy.vhdx")  # a copy out of the host is fine
    # through the host's own commands it works
    hv_json("checkpoint", "delete", checkpoint["id"])
    assert hv_json("vm", "io", "web", "read", "--offset", "0", "--length", "1M")["sha256"] == before


def _damage(path: str, how: str) -> None:
    if how == "truncated":
        Path(path).write_text('{"format_version": 1, "config": ')
    elif how == "missing key":
        document = json.loads(Path(path).read_text())
        del document["state"]
        Path(path).write_text(json.dumps(document))
    elif how == "wrong type":
        document = json.loads(Path(path).read_text())
        document["config"]["disks"] = "none"
        Path(path).write_text(json.dumps(document))
    elif how == "escaping path":
        document = json.loads(Path(path).read_text())
        document["config"]["disks"][0]["chain"] = ["../../../../etc/passwd"]
        Path(path).write_text(json.dumps(document))
    else:
        os.unlink(path)


@pytest.mark.parametrize("how", ["truncated", "missing key", "wrong type", "escaping path", "deleted"])
def test_a_damaged_vm_document_is_reported_for_that_vm_and_the_others_work(hv, hv_json, host, how):
    checkpoint = hv_json("checkpoint", "create", "web", "--type", "recovery")
    point = hv_json("refpoint", "convert", checkpoint["id"])
    hv_json("checkpoint", "create", "web", "--name", "kept")
    db_id = host["db"]["id"]
    _damage(str(host["dir"] / "vms" / db_id / "vm.json"), how)

    listed = hv("vm", "list")
    assert listed.returncode == 0 and listed.stderr.count("\n") == 1
    assert listed.stderr.startswith(f"hvbackup: damaged: VM {db_id}: ") and "vm.json" in listed.stderr
    rows = {line.split()[1]: line for line in listed.stdout.splitlines()[1:]}
    assert "Running" in rows[host["web"]["id"]] and "DAMAGED" in rows[db_id]
    as_json = {entry["id"]: entry for entry in hv_json("vm", "list")}
    assert as_json[host["web"]["id"]]["damaged"] is None and as_json[host["web"]["id"]]["name"] == "web"
    assert as_json[db_id]["state"] == "Damaged" and "vm.json" in as_json[db_id]["damaged"]

    for argv, expect in [(("checkpoint", "list"), "kept"), (("refpoint", "list"), point["instance_id"]),
                         (("checkpoint", "list", "--orphaned"), "nothing orphaned"),
                         (("checkpoint", "clean"), "nothing orphaned")]:
        done = hv(*argv)
        assert done.returncode == 0, done.stderr
        assert expect in done.stdout and db_id in done.stdout + done.stderr
        assert done.stderr.startswith(f"hvbackup: damaged: VM {db_id}: ") and done.stderr.count("\n") == 1
    checkpoints = hv_json("checkpoint", "list")
    assert [c["name"] for c in checkpoints if c["damaged"] is None] == ["kept"]
    assert [c["vm_id"] for c in checkpoints if c["damaged"]] == [db_id]
    assert hv_json("checkpoint", "list", "--orphaned")["damaged"][0]["id"] == db_id
    assert [p["damaged"] is None for p in hv_json("refpoint", "list")] == [True, False]

    # the other VMs work; the damaged one is named when asked for
    hv_json("vm", "io", "web", "write", "--offset", "0", "--pattern", "3", "--length", "4K")
    assert [c["name"] for c in hv_json("checkpoint", "list", "web")] == ["kept"]
    hv_json("vm", "create", "new", "--disk", "1M")
    one_line_error(*_code_err(hv("vm", "start", db_id)), db_id)
    one_line_error(*_code_err(hv("checkpoint", "list", db_id)), db_id)
    one_line_error(*_code_err(hv("vm", "start", "db")), "damaged")


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "", " padded", "tab\there", "a\\b",
                                  "5BFDE23B-CE75-4303-B54F-6C18394F105C", "x" * 101, "é" * 80])
def test_vm_names_are_checked_with_one_clear_error(hv, hv_json, host, tmp_path, name):
    before = sorted(os.listdir(tmp_path))
    one_line_error(*_code_err(hv("vm", "create", name, "--disk", "1M")), "cannot be a VM name")
    checkpoint = hv_json("checkpoint", "create", "web", "--type", "recovery")
    export = hv_json("vm", "export", "web", tmp_path / "e", "--checkpoint", checkpoint["id"])
    one_line_error(*_code_err(hv("vm", "import", export["definition_file"], "--new-id", "--name", name)),
                   "cannot be a VM name")
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "e"])
    assert [vm["name"] for vm in hv_json("vm", "list")] in (["web", "db"], ["db", "web"])
    assert sorted(os.listdir(host["dir"] / "vms")) == sorted([host["web"]["id"], host["db"]["id"]])


# -- help matches behaviour ---------------------------------------------------------------------------

MY_GROUPS = ("disk", "vm", "checkpoint", "refpoint")


@pytest.mark.parametrize("command", sorted(COMMANDS), ids=" ".join)
def test_help_names_values_by_metavar_and_flags_show_no_value(hv, command):
    done = hv(*command, "--help")
    assert done.returncode == 0 and done.stderr == ""
    options = done.stdout.split("\nOptions:\n", 1)[1]
    assert not TYPE_LABEL.search(options), options
    for param in COMMANDS[command].params:
        if getattr(param, "is_flag", False) and param.name != "help":
            flag = max(param.opts, key=len)
            line = next(line for line in options.splitlines() if flag in line)
            after = line.split(flag, 1)[1]
            assert not after.startswith((" <", " [", " TEXT", " VALUE")) or after.startswith("  "), line


@pytest.mark.parametrize("command", sorted(COMMANDS), ids=" ".join)
def test_help_shows_no_python_types_for_arguments(hv, command):
    done = hv(*command, "--help")
    assert not TYPE_LABEL.search(done.stdout), done.stdout


def test_docs_name_every_option_of_these_commands_and_no_other():
    """docs/cli.md's rows for the disk, vm, checkpoint and refpoint commands list exactly the options
    each command takes (--json and --host are said once for all)."""
    docs = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    rows = {}
    for line in docs.splitlines():
        match = re.match(r"\| `((?:create|info|check|convert|map|merge|compare|tracking|changes|host init|vm \w+|"
                         r"checkpoint \w+|refpoint \w+)[^`]*)`", line)
        if match:
            row = match.group(1).replace("\\|", "|")
            words = row.split()
            key = " ".join(words[:2]) if words[0] in ("vm", "checkpoint", "refpoint", "host") else words[0]
            rows.setdefault(key, []).append(row)
    for command, click_command in COMMANDS.items():
        if command[0] not in MY_GROUPS:
            continue
        key = command[1] if command[0] == "disk" else " ".join(command)
        if command[:2] in (("vm", "start"), ("vm", "stop"), ("vm", "save"), ("vm", "pause")):
            key = "vm start|stop|save|pause"
        documented = " ".join(rows.get(key, [])) or " ".join(v for k, vs in rows.items() if k.startswith(key)
                                                             for v in vs)
        assert documented, f"docs/cli.md has no row for {' '.join(command)}"
        taken = {o for p in click_command.params for o in getattr(p, "opts", []) if o.startswith("--")}
        taken -= {"--json", "--host", "--help"}
        named = set(re.findall(r"--[a-z][a-z-]*", documented)) - {"--json", "--host"}
        assert named <= taken, f"{' '.join(command)}: docs name {named - taken}, which it does not take"
        assert taken <= named, f"{' '.join(command)}: docs/cli.md does not mention {taken - named}"


def test_help_text_says_what_the_command_does(hv):
    def help_of(*command):
        return " ".join(hv(*command, "--help").stdout.split())

    create = help_of("disk", "create")
    assert "suffix" in create and "-O" in create and "never replaced" in create
    assert "replaced if it exists" in help_of("vm", "io")
    assert "--base" in help_of("vm", "export") and "DEST/<VM name>/" in help_of("vm", "export")
    for command in (("vm", "list"), ("checkpoint", "list"), ("refpoint", "list"), ("checkpoint", "clean")):
        assert "damaged" in help_of(*command)
    assert "With --orphaned:" in help_of("checkpoint", "list")


@pytest.mark.parametrize("sig, code", [(2, 130), (15, 143)])
def test_an_interrupted_export_leaves_nothing_and_says_so(tmp_path, sig, code):
    """SIGINT and SIGTERM clean up exactly as a failure does: an export stopped part way removes the
    directories and files it made (and only those), and the command says it stopped."""
    import time

    from hvbackup.host import SNAPSHOT_TYPE_RECOVERY, Host, checkpoints

    host = Host.init(str(tmp_path / "host"))
    vm = host.create_vm("web", [512 * MiB])
    vm.request_state_change("start")
    vm.disk(0).write(0, os.urandom(400 * MiB))
    vm.close_disks()
    checkpoint = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    destination = tmp_path / "exports" / "nightly"
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "keep.txt").write_text("was here before")
    process = subprocess.Popen([sys.executable, "-m", "hvbackup", "vm", "export", "web", str(destination),
                                "--checkpoint", checkpoint.instance_id, "--host", host.directory],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not destination.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the export ended before it could be interrupted"
    time.sleep(0.1)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert err.count("\n") == 1 and "stopped and undone" in err and "Traceback" not in err, err
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["keep.txt"]
    assert [c.instance_id for c in vm.checkpoints()] == [checkpoint.instance_id]  # the export's input stays
