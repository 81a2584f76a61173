"""Writing restore points: the session that holds the repository's lock, and one writer per point.

A writer starts each disk from its base point's chunk index (or from all zeros), stores the chunks it
is given, and at commit writes the base index with those slots overwritten: what an incremental
costs follows what changed, not the size of the disk. Docs: docs/repository.md, "Writing a restore
point".
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time

import numpy as np

from hvbackup.backup import envelope, manifest
from hvbackup.backup.chunks import MAGIC, chunk_dirs, chunk_path
from hvbackup.backup.index import ChunkIndex
from hvbackup.disks.fileio import sync_directory
from hvbackup.errors import RepositoryError


class Session:
    """Holds the repository lock and what its writers share (the chunks written so far).
    ``session.writer()`` gives one ``Writer`` per restore point; several may fill at once (one per VM
    backed up concurrently), each committing on its own."""

    def __init__(self, repo):
        self.repo = repo
        self._held = contextlib.ExitStack()
        self._mutex = threading.Lock()
        self._written: set[bytes] = set()
        self._dirty_dirs: set[str] = set()
        self.open = False

    def __enter__(self) -> "Session":
        with contextlib.ExitStack() as held:
            held.enter_context(self.repo.locked("write to"))
            # Chunk files only ever appear by renaming a complete, fsynced file; syncing their directories
            # makes every chunk present now durable, so from here a present chunk is a stored chunk.
            for directory in chunk_dirs(self.repo.path):
                sync_directory(directory)
            self._held = held.pop_all()
        self.open = True
        return self

    def __exit__(self, *exc) -> None:
        self.open = False  # no puts after the lock is gone
        self._held.close()

    def writer(self) -> "Writer":
        return Writer(self)

    def is_stored(self, name: bytes) -> bool:
        """Written by this session, or a complete chunk file is in place: one whose frame header
        declares exactly the file's length (a torn or foreign file is written over)."""
        if name in self._written:
            return True
        return envelope.looks_complete(chunk_path(self.repo.path, name.hex()), MAGIC)

    def missing(self, names: np.ndarray) -> np.ndarray:
        """Those of ``names`` the repository has lost: deleted, set aside as damaged by verify, or
        torn (the frame does not fit the file). One open and 24-byte read each."""
        return np.array([name for name in names if not self.is_stored(bytes(name))], names.dtype)

    def store(self, name: bytes, data) -> int:
        """Write one chunk unless it is stored already; returns the bytes it took."""
        if self.is_stored(name):
            return 0
        stored = self.repo.codec.encode(name, data)
        path = chunk_path(self.repo.path, name.hex())
        with self._mutex:
            # Before the rename: a writer that dedups onto this chunk as soon as it appears commits
            # after syncing its directory too.
            self._dirty_dirs.add(os.path.dirname(path))
        try:
            envelope.write_durable(self.repo._sub("tmp"), path, stored)
        except OSError as exc:
            raise RepositoryError(f"cannot store chunk {name.hex()}: {exc.strerror}: {exc.filename or path}") from None
        with self._mutex:
            self._written.add(name)
        return len(stored)

    def sync_chunks(self) -> None:
        """Chunk files were fsynced before their rename; this makes their directory entries durable.
        Every directory this session renamed a chunk into, at every commit: never fewer, whatever
        other writers of the session are doing (at most 256 directories)."""
        with self._mutex:
            dirty = sorted(self._dirty_dirs)
        for directory in dirty:
            sync_directory(directory)


class SingleWriter:
    """``repo.writer()``: a session holding one writer, for the common case of one restore point."""

    def __init__(self, repo):
        self._session = Session(repo)

    def __enter__(self) -> "Writer":
        self._session.__enter__()
        return self._session.writer()

    def __exit__(self, *exc) -> None:
        self._session.__exit__(*exc)


class _Disk:
    def __init__(self, geometry: dict, base: ChunkIndex, needed: set[int]):
        self.geometry = geometry
        self.base = base
        self.changes: dict[int, bytes | None] = {}
        self.needed = needed   # slots whose base chunk is gone: they must be put


class Writer:
    """Stores one restore point: ``add_disk``, ``put`` what changed, then ``commit``. Usable while
    its session holds the lock; nothing is visible before commit."""

    def __init__(self, session: Session):
        self.repo = session.repo
        self._session = session
        self._mutex = threading.Lock()
        self._disks: dict[int, _Disk] = {}
        self._committed = False
        self.bytes_read = self.bytes_stored = 0

    def _check_open(self) -> None:
        if self._committed or not self._session.open:
            raise RepositoryError("the writer is not open: use it inside 'with repo.writer() as w', before commit")

    def add_disk(self, index: int, geometry: dict, base: ChunkIndex | None = None) -> list[int]:
        """Start disk ``index`` from ``base`` (an earlier point's index of the same disk) or from zeros.
        Returns the slots whose base chunk the repository has lost: the caller must ``put`` them."""
        self._check_open()
        if index != len(self._disks):
            raise RepositoryError(f"disks are added in order: expected disk {len(self._disks)}, got {index}")
        geometry = manifest.check_geometry(index, geometry)
        count = manifest.chunk_count(geometry["virtual_size"], self.repo.chunk_size)
        if base is None:
            base = ChunkIndex.empty(count)
        elif base.count != count:
            raise RepositoryError(f"disk {index}: the base index has {base.count} chunks, the disk {count}")
        needed = base.slots_of(self._session.missing(base.distinct_names())).tolist() if base.data_slots else []
        self._disks[index] = _Disk(geometry, base, set(needed))
        return needed

    def _slot(self, disk_index: int, offset: int) -> tuple[_Disk, int, int]:
        self._check_open()
        disk = self._disks.get(disk_index)
        if disk is None:
            raise RepositoryError(f"no disk {disk_index} (add_disk first)")
        size, chunk = disk.geometry["virtual_size"], self.repo.chunk_size
        if offset % chunk or not 0 <= offset < size:
            raise RepositoryError(f"offset {offset} is not a chunk boundary inside disk {disk_index}")
        return disk, offset // chunk, min(chunk, size - offset)

    def put(self, disk_index: int, offset: int, data) -> str | None:
        """Store the chunk at ``offset`` (a whole chunk, or the disk's tail); returns its name, None for zeros."""
        disk, slot, length = self._slot(disk_index, offset)
        if len(data) != length:
            raise RepositoryError(f"disk {disk_index} offset {offset}: {len(data)} bytes given, {length} expected")
        name, stored = None, 0
        if np.frombuffer(data, np.uint8).any():
            name = self.repo.codec.name(data)
            stored = self._session.store(name, data)
        with self._mutex:
            disk.changes[slot] = name
            disk.needed.discard(slot)
            self.bytes_read += len(data)
            self.bytes_stored += stored
        return name.hex() if name else None

    def commit(self, fields: dict | None = None) -> str:
        """Make every new chunk durable, then write the manifest atomically; returns the point ID."""
        fields = manifest.caller_fields(fields or {})
        self._check_open()
        for index, disk in self._disks.items():
            if disk.needed:
                missing = min(disk.needed) * self.repo.chunk_size
                raise RepositoryError(f"disk {index}: the chunk at offset {missing} is lost from the repository "
                                      f"and was not put again")
        now = time.time()
        # Sortable by time, so listing points in name order lists them oldest first.
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        point_id = f"{stamp}.{int(now % 1 * 1e6):06d}Z-{secrets.token_hex(4)}"
        doc = {"point_id": point_id, "repository_id": self.repo.id, "chunk_size": self.repo.chunk_size,
               **fields, "ended": fields["ended"] or now, "bytes_read": self.bytes_read,
               "bytes_stored": self.bytes_stored,
               "disks": [{"index": i, "geometry": d.geometry, "chunks": d.base.overwritten(d.changes)}
                         for i, d in sorted(self._disks.items())]}
        try:
            # The chunks' directory entries become durable before the manifest that references them exists.
            self._session.sync_chunks()
            envelope.write_durable(self.repo._sub("tmp"), self.repo._sub("points", point_id),
                                   manifest.encode(doc, self.repo._keys))
            sync_directory(self.repo._sub("points"))
        except OSError as exc:
            raise RepositoryError(f"cannot commit the restore point: {exc.strerror}: "
                                  f"{exc.filename or self.repo._sub('points')}") from None
        self._committed = True
        return point_id
