"""Keeping a repository sound: ``verify`` finds damage, ``repair`` sets it aside, ``prune`` deletes
the chunks no restore point references (docs/repository.md, "Verify", "Repair", "Prune").

Damage is isolated, never spread: a damaged manifest is one damaged point; a chunk that fails its
check is moved out of its name into ``damaged/chunks/``, so the next backup that has its data stores
it again and every point using it is whole once more.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hvbackup.backup import manifest
from hvbackup.backup.chunks import NAME, chunk_dirs, chunk_path
from hvbackup.backup.index import NAME_DTYPE, hex_of, names_from_hex
from hvbackup.backup.lock import RepositoryLock
from hvbackup.backup.repository import DAMAGED, Damaged, Repository
from hvbackup.disks.fileio import sync_directory
from hvbackup.errors import RepositoryCorruptError, RepositoryError, RepositoryLockedError

Progress = Callable[[int, int], None]
LISTED_PER_POINT = 10  # missing chunks named per point; the rest are counted


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    points: int = 0                                           # readable points
    damaged_points: list[Damaged] = field(default_factory=list)
    unrestorable: dict[str, str] = field(default_factory=dict)  # point ID -> why
    damaged_chunks: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)       # chunks moved to damaged/chunks
    not_set_aside: str | None = None                           # why damaged chunks stayed where they are

    def to_dict(self) -> dict:
        return {"problems": self.problems, "points": self.points,
                "damaged_points": [d.to_dict() for d in self.damaged_points],
                "unrestorable": [{"point_id": p, "why": w} for p, w in self.unrestorable.items()],
                "damaged_chunks": self.damaged_chunks, "set_aside": self.set_aside}


def _readable_points(repo: Repository):
    """(point ID, manifest) of every point that reads back; damaged ones are the scan's business."""
    for point_id in repo.point_ids():
        try:
            yield point_id, repo.point(point_id)
        except RepositoryError:
            continue


def referenced(repo: Repository, *, prefix: bool = False) -> np.ndarray:
    """The sorted, unique chunk names the readable manifests reference: full 32-byte names, or their
    first 8 bytes as uint64 with ``prefix``. Memory is one array entry per distinct chunk."""
    found, pending, pending_count = np.empty(0, ">u8" if prefix else NAME_DTYPE), [], 0
    for _, m in _readable_points(repo):
        for disk in m["disks"]:
            names = disk["chunks"].names
            pending.append(np.frombuffer(names.tobytes(), ">u8")[::4].copy() if prefix else names)
            pending_count += len(names)
        if pending_count > 1 << 20:  # merge now and then so duplicates never pile up
            found, pending, pending_count = np.unique(np.concatenate([found, *pending])), [], 0
    return np.unique(np.concatenate([found, *pending]))


def verify(repo: Repository, *, read_data: bool = False, progress: Progress | None = None,
           holding_lock: bool = False) -> Report:
    """Check every manifest and that every chunk it references is there; with ``read_data`` also read
    each referenced chunk and set aside the ones that fail. An empty ``problems`` means sound."""
    report = Report()
    scan = repo.scan()
    report.points, report.damaged_points = len(scan.points), scan.damaged
    for damaged in scan.damaged:
        report.problems.append(f"points/{damaged.name}: {damaged.problem}")
    names = referenced(repo)
    lost = np.array([n for n in names if not os.path.isfile(chunk_path(repo.path, hex_of(n)))], NAME_DTYPE)
    if read_data:
        present = names[~np.isin(names, lost)] if len(lost) else names
        for done, name in enumerate(present, 1):
            try:
                repo.read_chunk(hex_of(name))
            except RepositoryError as exc:
                report.damaged_chunks.append(hex_of(name))
                report.problems.append(str(exc))
            if progress:
                progress(done, len(present))
        if report.damaged_chunks:
            _set_aside(repo, report, holding_lock)
    bad = np.concatenate((lost, names_from_hex(report.damaged_chunks)))
    if len(bad):
        _attribute(repo, bad, report)
    return report


def _attribute(repo: Repository, bad: np.ndarray, report: Report) -> None:
    """Name, per point, the chunks it lacks: those points cannot be restored as they are."""
    damaged = set(report.damaged_chunks)
    for point_id, m in _readable_points(repo):
        lines = []
        for disk in m["disks"]:
            index = disk["chunks"]
            for slot in index.slots_of(bad).tolist():
                name = index.name_at(slot)
                state = "damaged" if name in damaged else "missing"
                lines.append(f"point {point_id} disk {disk['index']}: chunk {name} at offset "
                             f"{slot * repo.chunk_size} is {state}")
        if lines:
            report.unrestorable[point_id] = f"{len(lines)} chunks are missing or damaged"
            report.problems += lines[:LISTED_PER_POINT]
            if len(lines) > LISTED_PER_POINT:
                report.problems.append(f"point {point_id}: and {len(lines) - LISTED_PER_POINT} more chunks "
                                       f"missing or damaged")


def _set_aside(repo: Repository, report: Report, holding_lock: bool) -> None:
    """Move damaged chunks to damaged/chunks/, under the lock so no writer is relying on them. A
    chunk that reads back now (rewritten meanwhile) stays."""
    try:
        lock = None if holding_lock else RepositoryLock(repo._sub("lock")).__enter__()
    except RepositoryLockedError as exc:
        report.not_set_aside = f"{exc}; run verify --read-data again when it is done"
        return
    try:
        target = repo._sub(DAMAGED, "chunks")
        os.makedirs(target, exist_ok=True)
        for name in report.damaged_chunks:
            try:
                repo.read_chunk(name)
                continue
            except RepositoryCorruptError:
                pass
            os.replace(chunk_path(repo.path, name), os.path.join(target, name))
            report.set_aside.append(name)
        for directory in {os.path.dirname(chunk_path(repo.path, n)) for n in report.set_aside} | {target}:
            sync_directory(directory)
    except OSError as exc:
        report.not_set_aside = f"cannot move damaged chunks to {DAMAGED}/chunks: {exc.strerror}"
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


@dataclass
class Repair:
    verified: Report                                       # what verify found before repairing
    moved_points: dict[str, str] = field(default_factory=dict)  # name in points/ -> why it was set aside
    remaining: list[str] = field(default_factory=list)     # problems a verify finds afterwards

    def to_dict(self) -> dict:
        return {"found": self.verified.to_dict(),
                "set_aside_points": [{"point_id": p, "why": w} for p, w in self.moved_points.items()],
                "set_aside_chunks": self.verified.set_aside, "remaining_problems": self.remaining}


def repair(repo: Repository, *, progress: Progress | None = None) -> Repair:
    """Make the repository sound: damaged chunks, damaged manifests and the points that can no
    longer be restored (they lack chunks) are moved to damaged/, missing directories recreated.
    Nothing is deleted; what was set aside can be moved back by hand."""
    with repo.locked("repair"):
        found = verify(repo, read_data=True, progress=progress, holding_lock=True)
        result = Repair(found)
        moves = {d.name: d.problem for d in found.damaged_points}
        moves.update(found.unrestorable)
        target = repo._sub(DAMAGED, "points")
        try:
            os.makedirs(target, exist_ok=True)
            for name, why in moves.items():
                os.replace(repo._sub("points", name), os.path.join(target, name))
                result.moved_points[name] = why
            sync_directory(repo._sub("points"))
            sync_directory(target)
        except OSError as exc:
            raise RepositoryError(f"cannot set damaged points aside in {target}: {exc.strerror}") from None
        result.remaining = verify(repo, holding_lock=True).problems
    return result


def prune(repo: Repository, progress: Progress | None = None) -> dict:
    """Delete every chunk no manifest references, and the damaged chunks set aside. Under the lock;
    refuses while a manifest is damaged (its chunks might be needed). Memory: 8 bytes per distinct
    referenced chunk. ``progress(done, total)`` counts the 256 chunk directories swept."""
    with repo.locked("prune"):
        damaged = [d for d in repo.scan().damaged if manifest.POINT_ID.match(d.name)]
        if damaged:
            names = ", ".join(d.name for d in damaged)
            raise RepositoryError(f"prune cannot tell which chunks the damaged point(s) {names} need: forget them "
                                  f"(hvbackup forget ID) or set them aside (hvbackup verify --repair) first")
        keep = referenced(repo, prefix=True)
        deleted = freed = kept = 0
        directories = chunk_dirs(repo.path)
        for done, directory in enumerate(directories, 1):
            for entry in os.scandir(directory):
                if not NAME.match(entry.name):
                    continue
                # A prefix match keeps the chunk: a rare collision costs space, never data.
                key = np.array([int(entry.name[:16], 16)], ">u8")
                at = np.searchsorted(keep, key)[0]
                if at < len(keep) and keep[at] == key[0]:
                    kept += 1
                    continue
                freed += entry.stat().st_size
                os.unlink(entry.path)
                deleted += 1
            if progress:
                progress(done, len(directories))
        set_aside = repo._sub(DAMAGED, "chunks")
        for entry in os.scandir(set_aside) if os.path.isdir(set_aside) else ():
            freed += entry.stat().st_size
            os.unlink(entry.path)
    return {"chunks_deleted": deleted, "bytes_freed": freed, "chunks_kept": kept}
