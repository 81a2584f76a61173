"""Keeping a repository sound: ``verify`` finds damage, ``repair`` sets it aside, ``prune`` deletes
the chunks no restore point references (docs/repository.md, "Verify", "Repair", "Prune").

Damage is isolated, never spread: a damaged manifest is one damaged point; a chunk that fails its
check is moved out of its name into ``damaged/chunks/``, so the next backup that has its data stores
it again and every point using it is whole once more.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hvbackup.backup import envelope, manifest
from hvbackup.backup.chunks import MAGIC, NAME, chunk_dirs, chunk_path
from hvbackup.backup.index import NAME_DTYPE, hex_of, names_from_hex
from hvbackup.backup.lock import RepositoryLock
from hvbackup.backup.manifest import Manifest
from hvbackup.backup.repository import DAMAGED, Damaged, Repository
from hvbackup.disks.fileio import sync_directory
from hvbackup.errors import HvBackupError, RepositoryCorruptError, RepositoryError

Progress = Callable[[int, int], None]
LISTED_PER_POINT = 10  # missing chunks named per point; the rest are counted


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    points: int = 0                                             # readable points
    damaged_points: list[Damaged] = field(default_factory=list)
    unrestorable: dict[str, str] = field(default_factory=dict)  # point ID -> why
    damaged_chunks: list[str] = field(default_factory=list)    # present, but fail their check
    set_aside: list[str] = field(default_factory=list)         # of those, moved to damaged/chunks
    not_set_aside: dict[str, str] = field(default_factory=dict)  # of those, left in place -> why

    def to_dict(self) -> dict:
        return {"problems": self.problems, "points": self.points,
                "damaged_points": [d.to_dict() for d in self.damaged_points],
                "unrestorable": [{"point_id": p, "why": w} for p, w in self.unrestorable.items()],
                "damaged_chunks": self.damaged_chunks, "set_aside": self.set_aside,
                "not_set_aside": [{"chunk": c, "why": w} for c, w in self.not_set_aside.items()]}


class _Names:
    """Distinct chunk names gathered manifest by manifest: one array entry per distinct chunk (or its
    first 8 bytes as an integer with ``prefix``), merged now and then so duplicates never pile up."""

    def __init__(self, prefix: bool):
        self.prefix = prefix
        self._found, self._pending, self._count = np.empty(0, np.uint64 if prefix else NAME_DTYPE), [], 0

    def add(self, m: Manifest) -> None:
        for disk in m.disks:
            names = disk.chunks.names
            # Big-endian 8-byte prefixes, made native so sorting and searching run at full speed.
            self._pending.append(np.frombuffer(names.tobytes(), ">u8")[::4].astype(np.uint64) if self.prefix
                                 else names)
            self._count += len(names)
        if self._count > 1 << 20:
            self._found, self._pending, self._count = self.sorted(), [], 0

    def sorted(self) -> np.ndarray:
        return np.unique(np.concatenate([self._found, *self._pending]))


def referenced(repo: Repository, *, prefix: bool = False) -> np.ndarray:
    """The sorted, distinct chunk names that points/ and damaged/points/ reference: full 32-byte
    names, or their first 8 bytes as integers with ``prefix``. Fails closed: a damaged manifest in
    points/ (it may reference anything) raises, naming every such point."""
    names, damaged = _Names(prefix), []
    for name, m in repo.manifests():
        if isinstance(m, Damaged):
            if manifest.POINT_ID.fullmatch(name):
                damaged.append(name)
        elif not damaged:
            names.add(m)
    if damaged:
        raise RepositoryError(f"cannot tell which chunks the damaged point(s) {', '.join(damaged)} need: forget "
                              f"them (hvbackup forget ID) or set them aside (hvbackup verify --repair) first")
    for _, m in repo.manifests(set_aside=True):  # set aside, not given up: their chunks stay
        if not isinstance(m, Damaged):
            names.add(m)
    return names.sorted()


def verify(repo: Repository, *, read_data: bool = False, progress: Progress | None = None,
           holding_lock: bool = False) -> Report:
    """Check every manifest and that every chunk it references is there and complete; with
    ``read_data`` also read each referenced chunk and set aside the ones that fail. An empty
    ``problems`` means sound."""
    report, names = Report(), _Names(prefix=False)
    for name, m in repo.manifests():
        if isinstance(m, Damaged):
            report.damaged_points.append(m)
            report.problems.append(f"points/{name}: {m.problem}")
        else:
            report.points += 1
            names.add(m)
    distinct = names.sorted()
    lost, damaged = [], []
    for name in distinct:
        path = chunk_path(repo.path, hex_of(name))
        if not os.path.isfile(path):
            lost.append(name)
        elif not envelope.looks_complete(path, MAGIC):
            damaged.append(hex_of(name))  # torn or foreign: its frame does not fit the file
    if read_data:
        whole = distinct[~np.isin(distinct, np.concatenate((np.array(lost, NAME_DTYPE), names_from_hex(damaged))))]
        for done, name in enumerate(whole, 1):
            try:
                repo.read_chunk(hex_of(name))
            except RepositoryError:
                damaged.append(hex_of(name))
            if progress:
                progress(done, len(whole))
        if damaged:
            damaged = _set_aside(repo, damaged, report, holding_lock)
    report.damaged_chunks = sorted(damaged)
    for name in report.damaged_chunks:
        where = "set aside in damaged/chunks" if name in report.set_aside else "in place"
        report.problems.append(f"chunk {name} is damaged ({where})")
    bad = np.concatenate((np.array(lost, NAME_DTYPE), names_from_hex(report.damaged_chunks)))
    if len(bad):
        _attribute(repo, bad, report)
    return report


def _attribute(repo: Repository, bad: np.ndarray, report: Report) -> None:
    """Name, per point, the chunks it lacks: those points cannot be restored as they are."""
    damaged = set(report.damaged_chunks)
    for point_id, m in repo.manifests():
        if isinstance(m, Damaged):
            continue
        lines = []
        for disk in m.disks:
            index = disk.chunks
            for slot in index.slots_of(bad).tolist():
                name = index.name_at(slot)
                state = "damaged" if name in damaged else "missing"
                lines.append(f"point {point_id} disk {disk.index}: chunk {name} at offset "
                             f"{slot * repo.chunk_size} is {state}")
        if lines:
            report.unrestorable[point_id] = f"{len(lines)} chunks are missing or damaged"
            report.problems += lines[:LISTED_PER_POINT]
            if len(lines) > LISTED_PER_POINT:
                report.problems.append(f"point {point_id}: and {len(lines) - LISTED_PER_POINT} more chunks "
                                       f"missing or damaged")


def _set_aside(repo: Repository, damaged: list[str], report: Report, holding_lock: bool) -> list[str]:
    """Move damaged chunks to damaged/chunks/, under the lock so no writer is relying on them.
    Returns those still damaged: a chunk that reads back now (a passing read error) is not."""
    still = []
    try:
        lock = None if holding_lock else RepositoryLock(repo._sub("lock")).__enter__()
    except RepositoryError as exc:
        report.not_set_aside = {name: f"{exc}; run verify --read-data again when it is done" for name in damaged}
        return damaged
    target = repo._sub(DAMAGED, "chunks")
    try:
        for name in damaged:
            try:
                repo.read_chunk(name)
                continue
            except RepositoryCorruptError:
                still.append(name)
            try:
                os.makedirs(target, exist_ok=True)
                os.replace(chunk_path(repo.path, name), os.path.join(target, name))
                report.set_aside.append(name)
            except FileNotFoundError:
                continue  # gone meanwhile: a missing chunk, stored again by the next backup
            except OSError as exc:
                report.not_set_aside[name] = f"cannot move it to {target}: {exc.strerror}"
        for directory in {os.path.dirname(chunk_path(repo.path, n)) for n in report.set_aside}:
            sync_directory(directory)
        if report.set_aside:
            sync_directory(target)
    except HvBackupError as exc:
        for name in still:
            report.not_set_aside.setdefault(name, str(exc))
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    return still


@dataclass
class Repair:
    verified: Report                                       # what verify found before repairing
    moved_points: dict[str, str] = field(default_factory=dict)  # name in points/ -> why it was set aside
    remaining: list[str] = field(default_factory=list)     # what is still wrong afterwards

    def to_dict(self) -> dict:
        return {"found": self.verified.to_dict(),
                "set_aside_points": [{"point_id": p, "why": w} for p, w in self.moved_points.items()],
                "set_aside_chunks": self.verified.set_aside, "remaining_problems": self.remaining}


def repair(repo: Repository, *, progress: Progress | None = None) -> Repair:
    """Make the repository sound: damaged chunks, damaged manifests and the points that can no
    longer be restored (they lack chunks) are moved to damaged/, missing directories recreated.
    Nothing is deleted; what was set aside can be moved back by hand. What could not be set aside
    is reported as remaining."""
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
        result.remaining += [f"chunk {name} is damaged and still in place: {why}"
                             for name, why in found.not_set_aside.items()]
    return result


def prune(repo: Repository, progress: Progress | None = None) -> dict:
    """Delete every chunk no manifest references, and the damaged chunks set aside. Under the lock;
    refuses while a manifest in points/ is damaged (its chunks might be needed). Memory: 8 bytes per
    distinct referenced chunk. ``progress(done, total)`` counts the 256 chunk directories swept."""
    with repo.locked("prune"):
        keep = referenced(repo, prefix=True)
        deleted = freed = kept = 0
        directories = chunk_dirs(repo.path)
        for done, directory in enumerate(directories, 1):
            for entry in os.scandir(directory):
                if not NAME.fullmatch(entry.name):
                    continue
                # A prefix match keeps the chunk: a rare collision costs space, never data.
                key = np.uint64(int(entry.name[:16], 16))
                at = np.searchsorted(keep, key)
                if at < len(keep) and keep[at] == key:
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
            (shutil.rmtree if entry.is_dir(follow_symlinks=False) else os.unlink)(entry.path)
    return {"chunks_deleted": deleted, "bytes_freed": freed, "chunks_kept": kept}
