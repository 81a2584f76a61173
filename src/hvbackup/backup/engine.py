"""Backing VMs up: the WMI-based backup flow, each run stored as one restore point.

For each VM:

1. The base: the VM's newest restore point in the repository whose RCT IDs one of the VM's
   reference points still carries. Without one (first backup, ``full``, a reference point removed by
   hand) every disk is read in full. Only one backup of a VM runs at a time (``Vm.exclusive``).
2. CreateSnapshot with SnapshotType 32768: a recovery checkpoint, owned by this process and named
   for the repository. One an interrupted run left behind (its process gone) is removed first;
   ``checkpoint clean`` removes them too.
3. Per disk, the chunks to read: every chunk holding data (full), or those the change list touches
   (incremental), plus any chunk of the base that the repository has lost; the writer takes every
   other slot from the base point's index. A disk whose changes cannot be had — tracking off, lost
   or changed offline, a disk new since the base — is read in full, and the point's ``notes`` say why.
4. ConvertToReferencePoint, then the manifest is committed naming the new reference point, then
   DestroyReferencePoint for the older reference points of this repository (other repositories keep
   theirs): a crash between these steps leaves a base the next run still finds.
5. On failure or interruption: DestroySnapshot; nothing of the run becomes visible in the repository
   and the base reference point stays, so the next incremental still works.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from hvbackup.backup.index import ChunkIndex
from hvbackup.backup.repository import REPOSITORY_ID, Repository
from hvbackup.backup.sources import DiskReader, ExportSource, VirtDiskSource
from hvbackup.backup.writer import Session, Writer
from hvbackup.errors import BackupError, HvBackupError, Interrupted, NeedsFull, RepositoryError
from hvbackup.host import SNAPSHOT_TYPE_RECOVERY, checkpoints, recovery, refpoints
from hvbackup.host.model import ReferencePoint
from hvbackup.host.vm import Vm

METHODS = ("virtdisk", "export")
STAGING_DIRECTORY = "export-staging"
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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Base:
    point: dict                    # the base restore point's manifest
    reference_point: ReferencePoint


def reference_name(repo: Repository) -> str:
    """What the checkpoints, and so the reference points, of backups into ``repo`` are called:
    each repository keeps its own reference point of a VM."""
    return f"hvbackup repository {repo.id}"


def default_staging(vm: Vm, repo: Repository) -> str:
    """Beside the VM's own files on the host, which already hold the same data unencrypted; never
    inside an (encrypted) repository. One per repository, each the base of that repository's next
    differential."""
    return os.path.join(vm.host.directory, STAGING_DIRECTORY, vm.vm_id, repo.id)


def find_base(repo: Repository, vm: Vm) -> _Base | None:
    """The VM's newest restore point whose RCT IDs a reference point of the VM still has: manifests
    are read newest first, and only until it is found. A damaged one is passed over."""
    by_rct = {tuple(r.resilient_change_tracking_identifiers): r for r in vm.reference_points()
              if r.resilient_change_tracking_identifiers}
    if not by_rct:
        return None
    for point_id in reversed(repo.point_ids()):
        try:
            point = repo.point(point_id)
        except RepositoryError:
            continue
        if point["vm_id"] == vm.vm_id and tuple(point["rct_ids"]) in by_rct:
            return _Base(point, by_rct[tuple(point["rct_ids"])])
    return None


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
              staging: str | None = None, progress: Progress | None = None,
              cancel: threading.Event | None = None) -> Result:
    """Back up one VM into the session's repository and return what was stored. ``staging`` is
    where the export method keeps the VM's exported disks (``default_staging``). Setting ``cancel``
    stops the backup at the next chunk; it then cleans up as a failure does and raises Interrupted.
    Every failure is a BackupError naming the VM."""
    name = vm.vm_id
    try:
        name = vm.name
        if method not in METHODS:
            raise BackupError(name, f"unknown method {method!r} (one of {', '.join(METHODS)})")
        with vm.exclusive("backed up"):
            return _backup(session, vm, name, method, full, staging or default_staging(vm, session.repo), progress,
                           cancel or threading.Event())
    except Exception as exc:
        raise _failure(name, exc) from exc


def _backup(session: Session, vm: Vm, name: str, method: str, full: bool, staging: str,
            progress: Progress | None, cancel: threading.Event) -> Result:
    repo = session.repo
    started = time.time()
    base = None if full else find_base(repo, vm)
    notes = [] if base or full else ["no earlier restore point of this VM matches one of its reference points"]
    notes += _remove_stray_checkpoints(vm)
    _check(cancel, name)
    checkpoint = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY, owner_pid=os.getpid(),
                                    name=f"{reference_name(repo)} {time.strftime('%Y-%m-%d %H:%M:%S')}")
    source = None
    try:
        base_ref = base.reference_point if base else None
        if method == "export":
            source = ExportSource(vm, checkpoint, base_ref, staging, cancelled=cancel.is_set)
        else:
            source = VirtDiskSource(vm, checkpoint, base_ref)
        writer = session.writer()
        incremental = _store_disks(writer, source, checkpoint, base, notes, _Meter(name, progress), cancel)
        _check(cancel, name)
        point = refpoints.convert_to_reference_point(vm, checkpoint.instance_id)
    except BaseException as exc:
        if source is not None:
            source.abandon()
        checkpoints.destroy(vm, checkpoint.instance_id)
        if isinstance(exc, (KeyboardInterrupt, Interrupted)) or cancel.is_set():
            raise Interrupted(name, "interrupted; its recovery checkpoint was removed, nothing was stored") from None
        raise
    kind = "incremental" if incremental else "full"
    try:
        point_id = writer.commit({
            "vm_name": name, "vm_id": vm.vm_id, "vm_config": checkpoint.config,
            "reference_point": point.instance_id, "rct_ids": point.resilient_change_tracking_identifiers,
            "consistency": point.consistency_level, "method": method, "kind": kind, "notes": notes,
            "started": started,
        })
    except HvBackupError:
        # The checkpoint is a reference point by now; no restore point names it, so the next run still
        # builds on the old one and removes this one after it succeeds.
        source.abandon()
        raise
    notes += _tidy_after_commit(vm, repo, source, method, staging, point, base)
    return Result(point_id, name, kind, method, writer.bytes_read, writer.bytes_stored, time.time() - started,
                  base.point["point_id"] if incremental else None, point.instance_id, notes)


def _tidy_after_commit(vm: Vm, repo: Repository, source, method: str, staging: str, point: ReferencePoint,
                       base: _Base | None) -> list[str]:
    """What follows a stored point: keep the staged export the next differential needs, drop this
    repository's older reference points. The point is stored whatever happens here, so a failure
    is a note, not a failed backup; the next backup tidies again."""
    notes = []
    try:
        source.finish()
        if method != "export":
            # A staged export only serves as the parent of the next differential of its reference point.
            shutil.rmtree(staging, ignore_errors=True)
        _remove_staging_of_old_layout(vm)
        for older in vm.reference_points():
            if older.instance_id != point.instance_id and _ours(older, repo, base):
                refpoints.destroy_reference_point(vm, older.instance_id)
    except (HvBackupError, OSError) as exc:
        notes.append(f"stored, but tidying up afterwards failed (the next backup tries again): {_describe(exc)}")
    return notes


def _ours(point: ReferencePoint, repo: Repository, base: _Base | None) -> bool:
    """A reference point an earlier backup into this repository left: named for it, or its base."""
    if base is not None and point.instance_id == base.reference_point.instance_id:
        return True
    return (point.element_name or "").startswith(reference_name(repo) + " ")


def _remove_staging_of_old_layout(vm: Vm) -> None:
    """Staged exports from before staging was kept per repository (``<VM ID>/<checkpoint ID>``)."""
    root = os.path.join(vm.host.directory, STAGING_DIRECTORY, vm.vm_id)
    for entry in os.listdir(root) if os.path.isdir(root) else ():
        if not REPOSITORY_ID.fullmatch(entry):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _check(cancel: threading.Event, name: str) -> None:
    if cancel.is_set():
        raise Interrupted(name, "interrupted; nothing was stored")


def backup_vms(session: Session, vms: list[Vm], *, method: str = "virtdisk", full: bool = False,
               staging: str | None = None, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> list[Result | BackupError]:
    """Back several VMs up at once, one thread each, into one session; a VM that fails does not stop
    the others. Per VM, in order: its Result, or the BackupError that says why it failed. ``staging``
    is a root under which each VM's exports go (``<root>/<VM ID>/<repository ID>``).

    Setting ``cancel`` (a signal handler may) stops every backup still running; each cleans up as a
    failure does and is reported as Interrupted. A KeyboardInterrupt in the calling thread sets it."""
    cancel = cancel or threading.Event()

    def one(vm: Vm) -> Result:
        where = os.path.join(staging, vm.vm_id, session.repo.id) if staging else None
        return backup_vm(session, vm, method=method, full=full, staging=where, progress=progress, cancel=cancel)

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
    for owner, checkpoint, why in recovery.find_orphans(vm.host).checkpoints:
        if owner.vm_id == vm.vm_id:
            checkpoints.destroy(vm, checkpoint.instance_id)
            removed.append(f"removed the stray recovery checkpoint {checkpoint.instance_id}: {why}")
    return removed


def _store_disks(writer: Writer, source, checkpoint, base: _Base | None, notes: list[str], meter: _Meter,
                 cancel: threading.Event) -> bool:
    """Put every disk's changed chunks; True when at least one disk was read incrementally."""
    chunk = writer.repo.chunk_size
    plans: list[tuple[DiskReader, list[int]]] = []
    incremental = False
    try:
        for index, disk in enumerate(checkpoint.disks):
            reader = source.open_disk(index)
            plans.append((reader, []))
            size = reader.geometry["virtual_size"]
            previous = _base_index(base, disk.instance_id, size) if base else None
            slots = None
            if previous is not None:
                try:
                    slots = reader.changed_chunks(chunk)
                except NeedsFull as exc:
                    notes.append(f"disk {index}: read in full: {exc}")
            elif base is not None:
                notes.append(f"disk {index}: read in full: the base restore point has no such disk")
            if slots is None:
                slots, previous = reader.data_chunks(chunk), None
            incremental |= previous is not None
            lost = writer.add_disk(index, reader.geometry, previous)
            if lost:
                notes.append(f"disk {index}: {len(lost)} chunks of the base point are missing or damaged in the "
                             f"repository; read again from the disk")
                slots = sorted(set(slots).union(lost))
            plans[-1] = (reader, slots)
        meter.total = sum(_bytes(slots, chunk, r.geometry["virtual_size"]) for r, slots in plans)
        for index, (reader, slots) in enumerate(plans):
            _store_disk(writer, index, reader, slots, meter, cancel)
    finally:
        for reader, _ in plans:
            reader.close()
    return incremental


def _bytes(slots: list[int], chunk: int, size: int) -> int:
    return sum(min(chunk, size - slot * chunk) for slot in slots)


def _base_index(base: _Base, disk_id: str, size: int) -> ChunkIndex | None:
    """The base point's chunk index of this disk, if it has the disk at this size."""
    ids = [d.get("instance_id") for d in base.point.get("vm_config", {}).get("disks", [])]
    for disk, instance_id in zip(base.point["disks"], ids):
        if instance_id == disk_id and disk["geometry"]["virtual_size"] == size:
            return disk["chunks"]
    return None


class _Meter:
    def __init__(self, vm_name: str, progress: Progress | None):
        self.vm_name, self.progress = vm_name, progress
        self.total = self.done = 0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        if self.progress:
            with self._lock:
                self.done += count
                self.progress(self.vm_name, self.done, self.total)


def _store_disk(writer: Writer, index: int, reader: DiskReader, slots: list[int], meter: _Meter,
                cancel: threading.Event) -> None:
    """Read the listed chunks in worker threads (reads, hashing and zstd release the GIL), a few
    ahead; every other slot is the base's, or zeros in a full backup. Returns once every chunk put
    is in place in the repository, so a failure to store one fails the backup before its
    checkpoint becomes a reference point."""
    chunk, size = writer.repo.chunk_size, reader.geometry["virtual_size"]

    def put(slot: int) -> None:
        _check(cancel, meter.vm_name)
        offset = slot * chunk
        length = min(chunk, size - offset)
        writer.put(index, offset, reader.read(offset, length))
        meter.add(length)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        pending: deque = deque()
        try:
            for slot in slots:
                pending.append(pool.submit(put, slot))
                if len(pending) >= READ_AHEAD:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    writer.flush()
