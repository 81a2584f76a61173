"""``hvbackup quickstart``: the backup application's main job, end to end, on an embedded default.

The first run makes a host, a repository and a sample VM whose disk holds a real ext4 filesystem;
later runs reuse them. Every run takes a full backup, changes files in the guest's filesystem
through the host's guest I/O path, takes an incremental backup, restores both points to raw images
and checks each one with e2fsck and against the checksums of the files the guest held when it was
taken. Any disagreement is an error (one line, exit 2).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from hvbackup.cli import interrupted_by, signals_set
from hvbackup.cli.output import JSON, emit_json, human_size, plural, progress_bar, say, table
from hvbackup.errors import HvBackupError
from hvbackup.units import MiB

if TYPE_CHECKING:
    from hvbackup.backup.repository import Repository
    from hvbackup.host import Host, Vm

DISK_SIZE = 256 * MiB
VM_NAME = "sample"
LOG, NOTES, DATABASE = "/var/log/app.log", "/home/guest/notes.txt", "/var/lib/app/database.db"
UPLOADS = "/home/guest/uploads"


class QuickstartError(HvBackupError):
    """The quickstart cannot run, or a backup or restored point is not what the guest held."""


def default_directory() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "hvbackup" / "quickstart"


def quickstart(
    directory: Optional[str] = typer.Option(
        None, "--dir", metavar="DIR",
        help="Where the host and repository live (default: $XDG_DATA_HOME/hvbackup/quickstart, else "
             "~/.local/share/hvbackup/quickstart); reused by later runs."),
    json: bool = JSON,
) -> None:
    """Back a sample VM up (full, then incremental after guest writes), restore both points, check them."""
    from hvbackup import guestfs

    work = Path(os.path.abspath(directory)) if directory else default_directory().absolute()
    if os.path.lexists(work) and not os.path.isdir(work):
        raise QuickstartError(f"{work}: not a directory")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QuickstartError(f"cannot make {work}: {exc.strerror}") from None
    if not os.access(work, os.R_OK | os.W_OK | os.X_OK):
        raise QuickstartError(f"{work}: cannot read and write in it (permission denied)")
    started = time.perf_counter()
    steps: list[dict] = []

    def step(name: str, seconds: float, nbytes: int = 0, detail: str = "") -> None:
        steps.append({"step": name, "seconds": round(seconds, 3), "bytes": nbytes,
                      "mib_per_s": round(nbytes / MiB / seconds, 1) if nbytes and seconds else None,
                      "detail": detail})

    host, repo, vm, created = _setup(work)
    step("create host, repo, VM" if created else "open host, repo, VM", time.perf_counter() - started,
         detail=f"{human_size(DISK_SIZE)} VHDX, ext4")
    disk = vm.disk(0)

    held = {}  # the guest's files' checksums when each backup was taken
    with guestfs.image_of(disk) as image:
        held["full"] = guestfs.checksums(image)
        changes = _changes(image, held["full"], run=len(repo.point_ids()) // 2 + 1)
    full = _backup(repo, vm, "export", full=True, json=json)
    step("full backup, export", full.seconds, full.bytes_read, f"{human_size(full.bytes_stored)} new stored")

    t = time.perf_counter()
    written = guestfs.apply_changes(disk, changes)
    with guestfs.image_of(disk) as image:
        held["incremental"] = guestfs.checksums(image)
    if held["incremental"] != _after(held["full"], changes):
        raise QuickstartError("the guest's filesystem does not hold the files just written to it")
    step("guest changes files", time.perf_counter() - t, detail=f"{len(changes)} files, {human_size(written)} to disk")

    incremental = _backup(repo, vm, "virtdisk", full=False, json=json)
    if incremental.kind != "incremental":
        raise QuickstartError(f"the second backup was {incremental.kind}: {'; '.join(incremental.notes)}")
    step("incremental, virtdisk", incremental.seconds, incremental.bytes_read,
         f"{human_size(incremental.bytes_stored)} new stored")

    (work / "restored").mkdir(exist_ok=True)
    restores = []
    for kind, result in (("full", full), ("incremental", incremental)):
        target = work / "restored" / f"{kind}.raw"
        t = time.perf_counter()
        restored = _restore(repo, result.point_id, target, json)
        step(f"restore {kind}", time.perf_counter() - t, restored["bytes_written"], target.name)
        t = time.perf_counter()
        files = _check(target, held[kind], kind)
        step(f"check {kind}", time.perf_counter() - t, detail=f"e2fsck clean, {files} files ok")
        restores.append({"kind": kind, "point_id": result.point_id, "path": str(target), "files": files,
                         "bytes_written": restored["bytes_written"]})

    summary = {"ok": True, "directory": str(work), "created": created, "vm": VM_NAME, "disk_size": DISK_SIZE,
               "seconds": round(time.perf_counter() - started, 3), "guest_bytes_written": written, "steps": steps,
               "backups": [full.to_dict(), incremental.to_dict()], "restores": restores,
               "repository": {"path": repo.path, "points": len(repo.point_ids()),
                              "bytes": _bytes_under(os.path.join(repo.path, "chunks"))}}
    if json:
        emit_json(summary)
    else:
        _print(summary)


def _setup(work: Path) -> tuple[Host, Repository, Vm, bool]:
    """The host, repository and running sample VM under ``work``, made the first time."""
    from hvbackup import disks, guestfs
    from hvbackup.backup.repository import Repository
    from hvbackup.host import Host, VmState

    host_dir, repo_dir = work / "host", work / "repository"
    host = Host.open(str(host_dir)) if (host_dir / "host.json").exists() else Host.init(str(host_dir))
    repo = Repository.open(str(repo_dir)) if (repo_dir / "config").exists() else Repository.init(str(repo_dir))
    created = VM_NAME not in {vm.name for vm in host.vms()}
    vm = host.create_vm(VM_NAME, [DISK_SIZE], notes="hvbackup quickstart sample") if created else host.vm(VM_NAME)
    if vm.state != VmState.RUNNING:
        vm.request_state_change("start")
    ready = work / "sample-ready"  # the guest's filesystem is complete; a run killed before it starts over
    if created or not ready.exists():
        with tempfile.TemporaryDirectory(prefix="hvbackup-quickstart-") as scratch:
            _write_sample_files(os.path.join(scratch, "files"))
            image = os.path.join(scratch, "disk.img")
            guestfs.make_filesystem(os.path.join(scratch, "files"), image, DISK_SIZE)
            with disks.open(image, read_only=True) as source:
                guestfs.write_differences(source, vm.disk(0))
        ready.touch()
        created = True  # the sample's files are new
    return host, repo, vm, created


def _write_sample_files(root: str) -> None:
    """A small system's worth of files: text, a database-like file that compresses, photos that don't."""
    import numpy as np

    rng = np.random.default_rng(2026)
    records = b"".join(b"%08d|customer-%05d|%s\n" % (i, i % 977, b"x" * (i % 50)) for i in range(200_000))
    files = {
        "/etc/hostname": b"sample\n",
        "/etc/motd": b"Backed up by hvbackup.\n",
        NOTES: b"Notes of the sample VM.\n",
        LOG: b"".join(b"2026-01-01T00:00:%02d app started, pid %d\n" % (i % 60, 1000 + i) for i in range(20_000)),
        DATABASE: records[:16 * MiB],
        **{f"/home/guest/photos/photo-{n}.jpg": rng.bytes(2 * MiB) for n in range(1, 5)},
    }
    for path, data in files.items():
        local = os.path.join(root, path.lstrip("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(data)


def _changes(image: str, files: dict[str, str], run: int) -> dict[str, bytes | None]:
    """What this run's guest does: appends to its log and notes, rewrites part of its database,
    saves a new upload and deletes the previous runs' ones."""
    import numpy as np

    from hvbackup import guestfs

    rng = np.random.default_rng(run)
    database = bytearray(guestfs.read_file(image, DATABASE))
    at = int(rng.integers(0, len(database) - MiB)) // 4096 * 4096
    database[at:at + MiB] = (b"run %06d rewrote this record\n" % run * (MiB // 29 + 1))[:MiB]
    changes: dict[str, bytes | None] = {
        LOG: guestfs.read_file(image, LOG) + b"".join(b"run %d: request %d served\n" % (run, i) for i in range(2000)),
        NOTES: guestfs.read_file(image, NOTES) + b"Run %d changed some files.\n" % run,
        DATABASE: bytes(database),
        f"{UPLOADS}/upload-{run}.bin": rng.bytes(MiB),
    }
    changes.update({path: None for path in files if path.startswith(UPLOADS + "/") and path not in changes})
    return changes


def _after(files: dict[str, str], changes: dict[str, bytes | None]) -> dict[str, str]:
    """The checksums the guest's files should have once ``changes`` are made."""
    import hashlib

    result = dict(files)
    for path, data in changes.items():
        if data is None:
            result.pop(path, None)
        else:
            result[path] = hashlib.sha256(data).hexdigest()
    return dict(sorted(result.items()))


def _backup(repo: Repository, vm: Vm, method: str, *, full: bool, json: bool):
    from hvbackup.backup.engine import backup_vm
    from hvbackup.errors import Interrupted

    with progress_bar(f"{'full' if full else 'incremental'} backup ({method})", enabled=not json) as bar, \
            repo.session() as session, signals_set(threading.Event()) as stop:
        try:
            return backup_vm(session, vm, method=method, full=full, cancel=stop,
                             progress=(lambda _vm, done, total: bar(done, total)) if bar else None)
        except Interrupted:  # cleaned up: its checkpoint is gone, nothing was stored
            raise interrupted_by() from None


def _restore(repo: Repository, point_id: str, target: Path, json: bool) -> dict:
    from hvbackup.backup.restore import restore_disk

    target.unlink(missing_ok=True)  # the previous run's
    with progress_bar(f"restore {target.stem}", enabled=not json) as bar:
        return restore_disk(repo, point_id, 0, str(target), format="raw", progress=bar)


def _check(image: Path, held: dict[str, str], kind: str) -> int:
    """e2fsck the restored image and compare its files with what the guest held; the file count."""
    from hvbackup import guestfs

    guestfs.check(str(image))
    found = guestfs.checksums(str(image))
    if found != held:
        wrong = sorted(p for p in found.keys() | held.keys() if found.get(p) != held.get(p))
        raise QuickstartError(f"the restored {kind} point differs from what the guest held in {', '.join(wrong)}")
    return len(found)


def _bytes_under(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(directory) for name in names)


def _print(summary: dict) -> None:
    table(["step", "time", "bytes", "speed", "result"],
          [[s["step"], f"{s['seconds']:.2f} s", human_size(s["bytes"]) if s["bytes"] else "",
            f"{s['mib_per_s']} MiB/s" if s["mib_per_s"] else "", s["detail"]] for s in summary["steps"]])
    repo = summary["repository"]
    say(f"repository: {plural(repo['points'], 'restore point')} in {human_size(repo['bytes'])} of chunks")
    say(f"all good in {summary['seconds']:.1f} s — host, repository and restored images in {summary['directory']}")
