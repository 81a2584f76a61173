"""Backing VMs up: the WMI-based backup flow, each run stored as one restore point.

For each VM (only one backup of a VM runs at a time, ``Vm.exclusive``):

1. The base: the VM's newest restore point in this repository whose RCT IDs one of the VM's
   reference points still carries, whichever method stored it. None for the first backup, with
   ``full``, or when the reference point is gone.
2. CreateSnapshot with SnapshotType 32768: a recovery checkpoint, owned by this process and named
   for the repository (one an interrupted run left behind is removed first).
3. For each disk of the checkpoint: a reader (``readers``: virtdisk or export) -> the ranges changed
   since the base, or NeedsFull with its reason (noted) and the ranges holding data -> the planner
   (chunk slots; the base point's index copied, changed slots overwritten) -> the writer.
4. Commit: ConvertToReferencePoint, the manifest committed naming it, then DestroyReferencePoint for
   this repository's older reference points (other repositories keep theirs): a crash between
   these steps leaves a base the next run still finds.
5. On failure or interruption: DestroySnapshot; nothing of the run becomes visible in the repository
   and the base reference point stays, so the next incremental still works.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from hvbackup.backup import planner, readers
from hvbackup.backup.manifest import Manifest
from hvbackup.backup.planner import DiskPlan
from hvbackup.backup.readers import BASE_CHUNKS_LOST, FULL_ASKED, NO_BASE, REFERENCE_POINT_GONE, Reader
from hvbackup.backup.readers.export import export_directory
from hvbackup.backup.repository import Repository
from hvbackup.backup.writer import Session, Writer
from hvbackup.errors import BackupError, HvBackupError, Interrupted, NeedsFull, RepositoryError
from hvbackup.host import SNAPSHOT_TYPE_RECOVERY
from hvbackup.host.model import Checkpoint, ReferencePoint
from hvbackup.host.services import VirtualSystemReferencePointService, VirtualSystemSnapshotService, outcome
from hvbackup.host.vm import Vm
from hvbackup.meter import ByteMeter
from hvbackup.workers import run_bounded

METHODS = readers.METHODS
LEGACY_STAGING = "export-staging"  # where earlier versions kept a full export of every VM: removed
READ_AHEAD = 6  # chunks in flight per disk: enough to keep hashing and compression on both cores busy
# Threads that read, hash, compress and write chunks: one per core (the fsyncs run in the repository
# session's own threads, so these never wait for the disk). Measured: docs/benchmarks.md, "Backup pipe
# speed (issue 12)".
WORKERS = max(2, min(8, os.cpu_count() or 2))
Progress = Callable[[str, int, int], None]  # (VM name, bytes done, bytes to do)


@dataclass
class Result:
    point_id: str
    vm: str
    kind: str                      # "full" | "incremental"
    method: str
    bytes_read: int
    bytes_stored: int
    seconds: float
    base_point: str | None
    reference_point: str
    notes: list[str] = field(default_factory=list)
    read_in_full: dict[int, str] = field(default_factory=dict)  # disk index -> NeedsFull reason code

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Base:
    point: Manifest                # the base restore point's manifest
    reference_point: ReferencePoint


def reference_name(repo: Repository) -> str:
    """What the checkpoints, and so the reference points, of backups into ``repo`` are called:
    each repository keeps its own reference point of a VM."""
    return f"hvbackup repository {repo.id}"


def find_base(repo: Repository, vm: Vm) -> _Base | NeedsFull:
    """The VM's newest restore point whose RCT IDs a reference point of the VM still has, or why
    there is none. Manifests are read newest first, and only until it is found; a damaged one is
    passed over."""
    by_rct = {tuple(r.resilient_change_tracking_identifiers): r for r in _reference_points(vm)
              if r.resilient_change_tracking_identifiers}
    earlier = False
    for point_id in reversed(repo.point_ids()):
        try:
            point = repo.point(point_id)
        except RepositoryError:
            continue
        if point.vm_id != vm.vm_id:
            continue
        if tuple(point.rct_ids) in by_rct:
            return _Base(point, by_rct[tuple(point.rct_ids)])
        earlier = True
    if earlier:
        return NeedsFull("no reference point of the VM matches one of its restore points in this repository",
                         reason=REFERENCE_POINT_GONE)
    return NeedsFull("no earlier restore point of this VM in this repository", reason=NO_BASE)


def _reference_points(vm: Vm) -> list[ReferencePoint]:
    return outcome(VirtualSystemReferencePointService(vm.host).get_reference_points(vm))


def _describe(exc: BaseException) -> str:
    """What went wrong (and where, for a file error), for any exception."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    if isinstance(exc, HvBackupError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _failure(vm: str, exc: BaseException) -> BackupError:
    return exc if isinstance(exc, BackupError) else BackupError(vm, _describe(exc))


def backup_vm(session: Session, vm: Vm, *, method: str = "virtdisk", full: bool = False,
              progress: Progress | None = None, cancel: threading.Event | None = None) -> Result:
    """Back up one VM into the session's repository and return what was stored. Setting ``cancel``
    stops the backup at the next chunk; it then cleans up as a failure does and raises Interrupted.
    Every failure is a BackupError naming the VM."""
    name = vm.vm_id
    try:
        name = vm.name
        if method not in METHODS:
            raise BackupError(name, f"unknown method {method!r} (one of {', '.join(METHODS)})")
        report = (lambda done, total: progress(name, done, total)) if progress else None
        meter = ByteMeter(report, cancel or threading.Event())
        with vm.exclusive("backed up"):
            return _backup(session, vm, name, method, full, meter)
    except Exception as exc:
        raise _failure(name, exc) from exc


def _backup(session: Session, vm: Vm, name: str, method: str, full: bool, meter: ByteMeter) -> Result:
    repo = session.repo
    started = time.time()
    base = NeedsFull("a full backup was asked for", reason=FULL_ASKED) if full else find_base(repo, vm)
    if isinstance(base, _Base) and method == "export" and not planner.base_is_intact(session, base.point):
        # The export's differential is laid over the base point's chunks: every one must be there.
        base = NeedsFull("chunks of the base point are missing from the repository", reason=BASE_CHUNKS_LOST)
    notes = _remove_stray_checkpoints(vm)
    _check(meter, name)
    snapshots = VirtualSystemSnapshotService(vm.host)
    checkpoint = outcome(snapshots.create_snapshot(
        vm, {"element_name": f"{reference_name(repo)} {time.strftime('%Y-%m-%d %H:%M:%S')}"},
        SNAPSHOT_TYPE_RECOVERY, owner_pid=os.getpid()))
    try:
        writer = session.writer()
        read_in_full, count = _read_disks(writer, method, vm, checkpoint, base, notes, meter, name)
        _check(meter, name)
        point = outcome(snapshots.convert_to_reference_point(vm, checkpoint.instance_id))
    except BaseException as exc:
        outcome(snapshots.destroy_snapshot(vm, checkpoint.instance_id))
        if isinstance(exc, (KeyboardInterrupt, Interrupted)) or meter.cancelled:
            raise Interrupted(name, "interrupted; its recovery checkpoint was removed, nothing was stored") from None
        raise
    kind = "incremental" if isinstance(base, _Base) and len(read_in_full) < count else "full"
    # If the commit fails, the checkpoint is a reference point no restore point names: the next run
    # still builds on the old one and removes this one after it succeeds.
    point_id = writer.commit({
        "vm_name": name, "vm_id": vm.vm_id, "vm_config": checkpoint.config,
        "reference_point": point.instance_id, "rct_ids": point.resilient_change_tracking_identifiers,
        "consistency": point.consistency_level, "method": method, "kind": kind, "notes": notes,
        "started": started,
    })
    notes += _tidy_after_commit(vm, repo, point, base)
    return Result(point_id, name, kind, method, writer.bytes_read, writer.bytes_stored, time.time() - started,
                  base.point.point_id if kind == "incremental" else None, point.instance_id, notes, read_in_full)


def _read_disks(writer: Writer, method: str, vm: Vm, checkpoint: Checkpoint, base: _Base | NeedsFull,
                notes: list[str], meter: ByteMeter, name: str) -> tuple[dict[int, str], int]:
    """One reader per disk of the checkpoint, each let go of before the checkpoint is converted
    (the conversion merges the files they read). Returns the disks read in full, and how many disks."""
    disks = readers.opener(method)(vm, checkpoint, base.reference_point if isinstance(base, _Base) else None,
                                   meter.cancel)
    try:
        read_in_full = _store_disks(writer, disks, checkpoint, base, notes, meter, name)
    except BaseException:
        readers.close_all(disks, failed=True)
        raise
    readers.close_all(disks, failed=False)
    return read_in_full, len(disks)


def _store_disks(writer: Writer, disks: list[Reader], checkpoint: Checkpoint, base: _Base | NeedsFull,
                 notes: list[str], meter: ByteMeter, name: str) -> dict[int, str]:
    """Each disk's changes, or all its data, planned into chunk slots and stored; returns the
    disks read in full and why (their reason codes)."""
    chunk = writer.repo.chunk_size
    read_in_full: dict[int, str] = {}
    plans: list[DiskPlan] = []
    for index, (disk, reader) in enumerate(zip(checkpoint.disks, disks)):
        try:
            plan = _incremental_plan(reader, disk.instance_id, base, chunk)
        except NeedsFull as exc:
            read_in_full[index] = exc.reason
            if isinstance(base, _Base):  # without a base every disk is read in full for the one reason
                notes.append(f"disk {index}: read in full ({exc.reason}): {exc}")
            plan = planner.full(reader, chunk)
        lost = writer.add_disk(index, reader.geometry, plan.base)
        if lost:
            notes.append(f"disk {index}: {len(lost)} chunks of the base point are missing or damaged in the "
                         f"repository; read again from the disk")
            planner.add_lost(plan, lost)
        plans.append(plan)
        meter.grow(planner.slot_bytes(plan, chunk, reader.geometry.virtual_size))
    if not isinstance(base, _Base) and base.reason != FULL_ASKED:  # asked for: nothing to note
        notes.insert(0, f"read in full ({base.reason}): {base}")
    for index, (reader, plan) in enumerate(zip(disks, plans)):
        _store_disk(writer, index, reader, plan, meter, name)
    return read_in_full


def _incremental_plan(reader: Reader, disk_id: str, base: _Base | NeedsFull, chunk: int) -> DiskPlan:
    """The disk's changes since the base, planned over the base point's index; NeedsFull when
    they cannot be had."""
    if not isinstance(base, _Base):
        raise base
    previous = planner.base_index(base.point, disk_id, reader.geometry)
    return planner.incremental(reader, reader.changes(base.reference_point), previous, chunk)


def _store_disk(writer: Writer, index: int, reader: Reader, plan: DiskPlan, meter: ByteMeter, name: str) -> None:
    """Build and put the planned chunks in worker threads (reads, hashing and zstd release the GIL),
    a few ahead; every other slot is the base's, or zeros in a full read. Returns once every chunk
    put is in place in the repository, so a failure to store one fails the backup before its
    checkpoint becomes a reference point."""
    chunk = writer.repo.chunk_size

    def put(slot: int) -> None:
        _check(meter, name)
        data = planner.chunk_at(reader, plan, slot, chunk, writer.repo)
        writer.put(index, slot * chunk, data)
        meter.add(len(data))

    run_bounded(put, plan.slots, workers=WORKERS, ahead=READ_AHEAD)
    writer.flush()


def _tidy_after_commit(vm: Vm, repo: Repository, point: ReferencePoint, base: _Base | NeedsFull) -> list[str]:
    """What follows a stored point: drop this repository's older reference points, and what a killed
    export backup of the VM (or an older version's export staging) left on the host. The point is
    stored whatever happens here, so a failure is a note, not a failed backup; the next backup
    tidies again."""
    notes = []
    try:
        for leftover in (export_directory(vm), os.path.join(vm.host.directory, LEGACY_STAGING)):
            shutil.rmtree(leftover, ignore_errors=True)
        service = VirtualSystemReferencePointService(vm.host)
        for older in _reference_points(vm):
            if older.instance_id != point.instance_id and _ours(older, repo, base):
                outcome(service.destroy_reference_point(vm, older.instance_id))
    except (HvBackupError, OSError) as exc:
        notes.append(f"stored, but tidying up afterwards failed (the next backup tries again): {_describe(exc)}")
    return notes


def _ours(point: ReferencePoint, repo: Repository, base: _Base | NeedsFull) -> bool:
    """A reference point an earlier backup into this repository left: named for it, or its base."""
    if isinstance(base, _Base) and point.instance_id == base.reference_point.instance_id:
        return True
    return (point.element_name or "").startswith(reference_name(repo) + " ")


def _check(meter: ByteMeter, name: str) -> None:
    if meter.cancelled:
        raise Interrupted(name, "interrupted; nothing was stored")


def backup_vms(session: Session, vms: list[Vm], *, method: str = "virtdisk", full: bool = False,
               progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Result | BackupError]:
    """Back several VMs up at once, one thread each, into one session; a VM that fails does not stop
    the others. Per VM, in order: its Result, or the BackupError that says why it failed.

    Setting ``cancel`` (a signal handler may) stops every backup still running; each cleans up as a
    failure does and is reported as Interrupted. A KeyboardInterrupt in the calling thread sets it."""
    cancel = cancel or threading.Event()

    def one(vm: Vm) -> Result:
        return backup_vm(session, vm, method=method, full=full, progress=progress, cancel=cancel)

    # Not a bounded map: every VM runs at once, and the caller's thread stays free to catch Ctrl-C.
    pool = ThreadPoolExecutor(max_workers=max(1, len(vms)))
    futures = []
    try:
        for vm in vms:
            futures.append(pool.submit(one, vm))
    except KeyboardInterrupt:
        cancel.set()
    while not all(f.done() for f in futures):
        try:
            wait(futures, timeout=0.5)
        except KeyboardInterrupt:
            cancel.set()  # and wait again: the backups are cleaning up
    pool.shutdown()
    outcomes: list[Result | BackupError] = []
    for future in futures:
        try:
            outcomes.append(future.result())
        except BackupError as exc:
            outcomes.append(exc)
    return outcomes


def _remove_stray_checkpoints(vm: Vm) -> list[str]:
    """Recovery checkpoints an interrupted backup left on this VM (its process is gone) are removed
    before a new one is taken, so they never pile up."""
    removed = []
    snapshots = VirtualSystemSnapshotService(vm.host)
    for owner, checkpoint, why in outcome(snapshots.find_orphans()).checkpoints:
        if owner.vm_id == vm.vm_id:
            outcome(snapshots.destroy_snapshot(vm, checkpoint.instance_id))
            removed.append(f"removed the stray recovery checkpoint {checkpoint.instance_id}: {why}")
    return removed
