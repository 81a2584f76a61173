"""Writing restore points: the session that holds the repository's lock, and one writer per point.

A writer starts each disk from its base point's chunk index (or from all zeros), stores the chunks it
is given, and at commit writes the base index with those slots overwritten: what an incremental
costs follows what changed, not the size of the disk. Docs: docs/repository.md, "Writing a restore
point".

A chunk is put in two halves: the putting thread hashes, compresses, (encrypts) and writes it to a
new file in ``tmp/``; the session's sync threads fsync that file and only then rename it into
``chunks/``. So the threads that do the CPU work never wait for the disk, the fsyncs of many files
are in flight at once (the file system commits them together), and at most ``SYNC_AHEAD`` written
files wait for theirs. ``commit`` waits for every chunk its point names; a session waits for all of
them before it lets go of the lock, so nothing is renamed into place by a process that no longer
holds it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from hvbackup import durable
from hvbackup.backup import envelope, manifest
from hvbackup.backup.chunks import MAGIC, chunk_dirs, chunk_path
from hvbackup.backup.geometry import Geometry
from hvbackup.backup.index import ChunkIndex
from hvbackup.disks.fileio import sync_directory
from hvbackup.errors import RepositoryError

SYNC_THREADS = 4  # fsyncs in flight at once: measured, docs/benchmarks.md "Backup pipe speed (issue 12)"
SYNC_AHEAD = 32   # chunk files written and waiting for their fsync; a put waits beyond that


def all_zero(data) -> bool:
    """A piece of data almost always has a non-zero byte among its first few: look there first."""
    if any(memoryview(data).cast("B")[:64].tobytes()):
        return False
    return not np.frombuffer(data, np.uint8).any()


class Session:
    """Holds the repository lock and what its writers share (the chunks written so far, and those
    on their way). ``session.writer()`` gives one ``Writer`` per restore point; several may fill at
    once (one per VM backed up concurrently), each committing on its own."""

    def __init__(self, repo):
        self.repo = repo
        self._held = contextlib.ExitStack()
        self._mutex = threading.Lock()
        self._written: set[bytes] = set()
        self._syncing: dict[bytes, Future] = {}  # written to tmp/, waiting for fsync and rename
        self._dirty_dirs: set[str] = set()
        self._sync_pool: ThreadPoolExecutor | None = None
        self._room = threading.BoundedSemaphore(SYNC_AHEAD)
        self.open = False

    def __enter__(self) -> "Session":
        with contextlib.ExitStack() as held:
            held.enter_context(self.repo.locked("write to"))
            # Chunk files only ever appear by renaming a complete, fsynced file; syncing their directories
            # makes every chunk present now durable, so from here a present chunk is a stored chunk.
            for directory in chunk_dirs(self.repo.path):
                sync_directory(directory)
            self._sync_pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="hvbackup-sync")
            held.callback(self._drain)
            self._held = held.pop_all()
        self.open = True
        return self

    def __exit__(self, *exc) -> None:
        self.open = False  # no puts after the lock is gone
        self._held.close()

    def _drain(self) -> None:
        """Every chunk file on its way is renamed into place (or removed) before the lock goes."""
        pool, self._sync_pool = self._sync_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

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

    def _stored_or_coming(self, name: bytes) -> tuple[bool, Future | None]:
        """Under the mutex: whether this session stored the chunk or is storing it (then its future)."""
        if name in self._written:
            return True, None
        on_its_way = self._syncing.get(name)
        return on_its_way is not None, on_its_way

    def store(self, name: bytes, data) -> tuple[int, Future | None]:
        """Write one chunk unless it is stored already or on its way. Returns the bytes it takes and,
        while it is not yet in place, a future that says when it is (its exception if it failed)."""
        with self._mutex:
            known, on_its_way = self._stored_or_coming(name)
        if known:
            return 0, on_its_way
        path = chunk_path(self.repo.path, name.hex())
        if envelope.looks_complete(path, MAGIC):
            return 0, None
        future: Future = Future()
        with self._mutex:  # another thread may have claimed it since the first look
            known, on_its_way = self._stored_or_coming(name)
            if known:
                return 0, on_its_way
            self._syncing[name] = future
        try:
            parts = self.repo.codec.encode_parts(name, data)
            length = sum(len(part) for part in parts)
            self._room.acquire()
            try:
                staged = durable.Staged.inside(self.repo._sub("tmp"), 0o600)
                try:
                    staged.write(parts)
                    del parts
                    pool = self._sync_pool
                    if pool is None:
                        raise RepositoryError("the session is closed: no more chunks can be stored")
                    pool.submit(self._finish, name, staged, path, future)
                except BaseException:
                    staged.discard()
                    raise
            except BaseException:
                self._room.release()
                raise
        except BaseException as exc:
            with self._mutex:
                self._syncing.pop(name, None)
            error = _store_error(name, path, exc)
            future.set_exception(error)
            if isinstance(exc, OSError):
                raise error from None
            raise
        return length, future

    def _finish(self, name: bytes, staged: durable.Staged, path: str, future: Future) -> None:
        """In a sync thread: fsync the chunk file, then rename it into place."""

        def mark_directory() -> None:
            with self._mutex:
                # Before the rename: a writer that dedups onto this chunk as soon as it appears commits
                # after syncing its directory too.
                self._dirty_dirs.add(os.path.dirname(path))

        try:
            staged.finish(path, sync_dir=False, before_rename=mark_directory)
        except BaseException as exc:
            with self._mutex:
                self._syncing.pop(name, None)
            future.set_exception(_store_error(name, path, exc))
        else:
            with self._mutex:
                self._written.add(name)
                self._syncing.pop(name, None)
            future.set_result(None)
        finally:
            self._room.release()

    def sync_chunks(self) -> None:
        """Chunk files were fsynced before their rename; this makes their directory entries durable.
        Every directory this session renamed a chunk into, at every commit: never fewer, whatever
        other writers of the session are doing (at most 256 directories)."""
        with self._mutex:
            dirty = sorted(self._dirty_dirs)
        for directory in dirty:
            sync_directory(directory)


def _store_error(name: bytes, path: str, exc: BaseException) -> BaseException:
    if isinstance(exc, OSError):
        return RepositoryError(f"cannot store chunk {name.hex()}: {exc.strerror}: {exc.filename or path}")
    return exc


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
    def __init__(self, geometry: Geometry, base: ChunkIndex, needed: set[int]):
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
        self._waiting: set[Future] = set()  # chunks this point names that are not yet in place
        self._failure: BaseException | None = None
        self.bytes_read = self.bytes_stored = 0

    def _check_open(self) -> None:
        if self._committed or not self._session.open:
            raise RepositoryError("the writer is not open: use it inside 'with repo.writer() as w', before commit")

    def add_disk(self, index: int, geometry: Geometry, base: ChunkIndex | None = None) -> list[int]:
        """Start disk ``index`` from ``base`` (an earlier point's index of the same disk) or from zeros.
        Returns the slots whose base chunk the repository has lost: the caller must ``put`` them."""
        self._check_open()
        if index != len(self._disks):
            raise RepositoryError(f"disks are added in order: expected disk {len(self._disks)}, got {index}")
        manifest.check_geometry(index, geometry)
        count = manifest.chunk_count(geometry.virtual_size, self.repo.chunk_size)
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
        size, chunk = disk.geometry.virtual_size, self.repo.chunk_size
        if offset % chunk or not 0 <= offset < size:
            raise RepositoryError(f"offset {offset} is not a chunk boundary inside disk {disk_index}")
        return disk, offset // chunk, min(chunk, size - offset)

    def put(self, disk_index: int, offset: int, data) -> str | None:
        """Store the chunk at ``offset`` (a whole chunk, or the disk's tail); returns its name, None for zeros."""
        disk, slot, length = self._slot(disk_index, offset)
        if len(data) != length:
            raise RepositoryError(f"disk {disk_index} offset {offset}: {len(data)} bytes given, {length} expected")
        self._raise_failure()
        name, stored, pending = None, 0, None
        if not all_zero(data):
            name = self.repo.codec.name(data)
            stored, pending = self._session.store(name, data)
        with self._mutex:
            disk.changes[slot] = name
            disk.needed.discard(slot)
            self.bytes_read += len(data)
            self.bytes_stored += stored
            if pending is not None:
                self._waiting.add(pending)
        if pending is not None:
            pending.add_done_callback(self._arrived)
        return name.hex() if name else None

    def _arrived(self, future: Future) -> None:
        """A chunk this point names is in place, or failed: the next put or the commit raises that."""
        with self._mutex:
            self._waiting.discard(future)
            if future.exception() is not None and self._failure is None:
                self._failure = future.exception()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def flush(self) -> None:
        """Wait until every chunk put so far is in place; raise the first that failed."""
        while True:
            with self._mutex:
                waiting = next(iter(self._waiting), None)
            if waiting is None:
                break
            try:
                waiting.result()
            except BaseException:
                pass
            self._arrived(waiting)
        self._raise_failure()

    def commit(self, fields: dict | None = None) -> str:
        """Make every new chunk durable, then write the manifest atomically; returns the point ID."""
        fields = manifest.caller_fields(fields or {})
        self._check_open()
        self.flush()
        for index, disk in self._disks.items():
            if disk.needed:
                missing = min(disk.needed) * self.repo.chunk_size
                raise RepositoryError(f"disk {index}: the chunk at offset {missing} is lost from the repository "
                                      f"and was not put again")
        now = time.time()
        # Sortable by time, so listing points in name order lists them oldest first.
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        point_id = f"{stamp}.{int(now % 1 * 1e6):06d}Z-{secrets.token_hex(4)}"
        fields["ended"] = fields["ended"] or now
        point = manifest.Manifest(
            point_id, self.repo.id, self.repo.chunk_size, **fields, bytes_read=self.bytes_read,
            bytes_stored=self.bytes_stored,
            disks=[manifest.Disk(i, d.geometry, d.base.overwritten(d.changes)) for i, d in sorted(self._disks.items())])
        try:
            # The chunks' directory entries become durable before the manifest that references them exists.
            self._session.sync_chunks()
            envelope.write_durable(self.repo._sub("tmp"), self.repo._sub("points", point_id),
                                   manifest.encode(point, self.repo._keys))
            sync_directory(self.repo._sub("points"))
        except OSError as exc:
            raise RepositoryError(f"cannot commit the restore point: {exc.strerror}: "
                                  f"{exc.filename or self.repo._sub('points')}") from None
        self._committed = True
        return point_id
