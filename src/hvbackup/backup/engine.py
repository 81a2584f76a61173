"""Backing VMs up: the WMI-based backup flow, each run stored as one restore point.

For each VM:

1. The base: the VM's newest restore point in the repository whose RCT IDs one of the VM's reference
   points still carries. Without one (first backup, ``full``, a reference point removed by hand)
   every disk is read in full.
2. CreateSnapshot with SnapshotType 32768: a recovery checkpoint, owned by this process. One an
   interrupted run left behind (its process gone) is removed first; ``checkpoint clean`` removes
   them too.
3. Per disk, the chunks to read: every chunk holding data (full), or those the change list touches
   (incremental); every other chunk is taken from the base point by reference. A disk whose changes
   cannot be had — tracking off, lost or changed offline, a disk new since the base — is read in
   full, and the point's ``notes`` say why.
4. ConvertToReferencePoint, then the manifest is committed naming the new reference point, then
   DestroyReferencePoint for the VM's older ones: a crash between these steps leaves a base the
   next run still finds.
5. On failure: DestroySnapshot; nothing of the run becomes visible in the repository and the base
   reference point stays, so the next incremental still works.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from hvbackup.backup.repository import Repository, Session, Writer
from hvbackup.backup.sources import DiskReader, ExportSource, NeedsFull, VirtDiskSource
from hvbackup.errors import HvBackupError
from hvbackup.host import SNAPSHOT_TYPE_RECOVERY, checkpoints, recovery, refpoints
from hvbackup.host.model import ReferencePoint
from hvbackup.host.vm import Vm

METHODS = ("virtdisk", "export")
STAGING_DIRECTORY = "export-staging"
READ_AHEAD = 6  # chunks in flight per disk: enough to keep hashing and compression on both cores busy
Progress = Callable[[str, int, int], None]  # (VM name, bytes done, bytes to do)


class BackupError(HvBackupError):
    """A VM's backup failed; its checkpoint was removed and its last reference point kept."""


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


def default_staging(vm: Vm) -> str:
    """Beside the VM's own files on the host, which already hold the same data unencrypted; never
    inside an (encrypted) repository."""
    return os.path.join(vm.host.directory, STAGING_DIRECTORY, vm.vm_id)


def find_base(repo: Repository, vm: Vm) -> _Base | None:
    """The VM's newest restore point whose RCT IDs a reference point of the VM still has."""
    by_rct = {tuple(r.resilient_change_tracking_identifiers): r for r in vm.reference_points()}
    for summary in reversed(repo.points()):
        if summary.get("vm_id") == vm.vm_id and tuple(summary.get("rct_ids") or ()) in by_rct:
            return _Base(repo.point(summary["point_id"]), by_rct[tuple(summary["rct_ids"])])
    return None


def backup_vm(session: Session, vm: Vm, *, method: str = "virtdisk", full: bool = False,
              staging: str | None = None, progress: Progress | None = None) -> Result:
    """Back up one VM into the session's repository and return what was stored. ``staging`` is
    where the export method keeps the VM's exported disks (``default_staging``)."""
    if method not in METHODS:
        raise BackupError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    repo = session.repo
    started = time.time()
    base = None if full else find_base(repo, vm)
    notes = [] if base or full else ["no earlier restore point of this VM matches one of its reference points"]
    notes += _remove_stray_checkpoints(vm)
    checkpoint = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY, owner_pid=os.getpid(),
                                    name=f"hvbackup {time.strftime('%Y-%m-%d %H:%M:%S')}")
    source = None
    try:
        base_ref = base.reference_point if base else None
        if method == "export":
            source = ExportSource(vm, checkpoint, base_ref, staging or default_staging(vm))
        else:
            source = VirtDiskSource(vm, checkpoint, base_ref)
        writer = session.writer()
        incremental = _store_disks(writer, source, checkpoint, base, notes, vm.name, progress)
        point = refpoints.convert_to_reference_point(vm, checkpoint.instance_id)
    except BaseException as exc:
        if source is not None:
            source.abandon()
        checkpoints.destroy(vm, checkpoint.instance_id)
        if isinstance(exc, HvBackupError) and not isinstance(exc, BackupError):
            raise BackupError(f"VM {vm.name}: {exc}") from exc
        raise
    kind = "incremental" if incremental else "full"
    try:
        point_id = writer.commit({
            "vm_name": vm.name, "vm_id": vm.vm_id, "vm_config": checkpoint.config,
            "reference_point": point.instance_id, "rct_ids": point.resilient_change_tracking_identifiers,
            "consistency": point.consistency_level, "method": method, "kind": kind, "notes": notes,
            "started": started,
        })
    except HvBackupError as exc:
        # The checkpoint is a reference point by now; no restore point names it, so the next run still
        # builds on the old one and removes this one after it succeeds.
        source.abandon()
        raise BackupError(f"VM {vm.name}: {exc}") from exc
    source.finish()
    if method != "export":
        # A staged export only serves as the parent of the next differential of its reference point.
        shutil.rmtree(staging or default_staging(vm), ignore_errors=True)
    for older in vm.reference_points():
        if older.instance_id != point.instance_id:
            refpoints.destroy_reference_point(vm, older.instance_id)
    return Result(point_id, vm.name, kind, method, writer.bytes_read, writer.bytes_stored, time.time() - started,
                  base.point["point_id"] if incremental else None, point.instance_id, notes)


def backup_vms(session: Session, vms: list[Vm], *, method: str = "virtdisk", full: bool = False,
               staging: str | None = None, progress: Progress | None = None) -> list[Result | BackupError]:
    """Back several VMs up at once, one thread each, into one session; a VM that fails does not stop
    the others. Per VM, in order: its Result, or the BackupError that says why it failed."""
    def one(vm: Vm) -> Result:
        where = os.path.join(staging, vm.vm_id) if staging else None
        return backup_vm(session, vm, method=method, full=full, staging=where, progress=progress)

    with ThreadPoolExecutor(max_workers=max(1, len(vms))) as pool:
        futures = [pool.submit(one, vm) for vm in vms]
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


def _store_disks(writer: Writer, source, checkpoint, base: _Base | None, notes: list[str], vm_name: str,
                 progress: Progress | None) -> bool:
    """Put every disk's chunks; True when at least one disk was read incrementally."""
    chunk = writer.repo.chunk_size
    plans = []
    for index, disk in enumerate(checkpoint.disks):
        reader = source.open_disk(index)
        try:
            previous = _base_disk(base, disk.instance_id, reader.geometry["virtual_size"]) if base else None
            to_read = None
            if previous is not None:
                try:
                    to_read = reader.changed_chunks(chunk)
                except NeedsFull as exc:
                    notes.append(f"disk {index}: read in full: {exc}")
            elif base is not None:
                notes.append(f"disk {index}: read in full: the base restore point has no such disk")
            if to_read is None:
                to_read, previous = reader.data_chunks(chunk), None
        except BaseException:
            reader.close()
            raise
        plans.append((reader, to_read, previous))
    meter = _Meter(vm_name, sum(len(p[1]) for p in plans) * chunk, progress)
    try:
        for index, (reader, to_read, previous) in enumerate(plans):
            writer.add_disk(index, reader.geometry)
            _store_disk(writer, index, reader, to_read, previous, meter)
    finally:
        for reader, _, _ in plans:
            reader.close()
    return any(previous is not None for _, _, previous in plans)


def _base_disk(base: _Base, disk_id: str, size: int) -> list | None:
    """The base point's chunk list of this disk, if it has the disk at this size."""
    ids = [d.get("instance_id") for d in base.point.get("vm_config", {}).get("disks", [])]
    for disk, instance_id in zip(base.point["disks"], ids):
        if instance_id == disk_id and disk["geometry"]["virtual_size"] == size:
            return disk["chunks"]
    return None


class _Meter:
    def __init__(self, vm_name: str, total: int, progress: Progress | None):
        self.vm_name, self.total, self.progress = vm_name, total, progress
        self.done = 0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        if self.progress:
            with self._lock:
                self.done += count
                self.progress(self.vm_name, self.done, self.total)


def _store_disk(writer: Writer, index: int, reader: DiskReader, to_read: list[int], previous: list | None,
                meter: _Meter) -> None:
    """Read the listed chunks in worker threads (reads, hashing and zstd release the GIL), a few
    ahead; every other chunk is the base's, or zeros in a full backup."""
    chunk, size = writer.repo.chunk_size, reader.geometry["virtual_size"]
    wanted = set(to_read)
    for slot in range(-(-size // chunk)):
        if slot not in wanted:
            writer.reuse(index, slot * chunk, previous[slot] if previous is not None else None)

    def put(slot: int) -> None:
        offset = slot * chunk
        length = min(chunk, size - offset)
        writer.put(index, offset, reader.read(offset, length))
        meter.add(length)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
        pending = []
        for slot in to_read:
            pending.append(pool.submit(put, slot))
            if len(pending) >= READ_AHEAD:
                pending.pop(0).result()
        for future in pending:
            future.result()
