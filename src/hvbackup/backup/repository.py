"""A local, deduplicating, crash-safe store of restore points (format: docs/repository.md).

``Repository.init`` / ``Repository.open``; ``repo.writer()`` stores one restore point under the lock
(``repo.session()`` several at once);
``points``, ``point``, ``read_disk`` read; ``forget`` drops a manifest, ``prune`` the chunks no manifest
references; ``verify`` lists problems.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from typing import Callable, Iterator

import numpy as np

from hvbackup.backup import envelope, manifest
from hvbackup.backup.chunks import NAME, ChunkCodec, chunk_dirs, chunk_path, max_payload
from hvbackup.backup.crypto import Keys
from hvbackup.backup.lock import RepositoryLock
from hvbackup.disks.fileio import sync_directory
from hvbackup.errors import PassphraseNeededError, RepositoryCorruptError, RepositoryError

CONFIG_MAGIC = b"HVBKCONF"
MAX_CONFIG = 64 << 10
DEFAULT_CHUNK_SIZE = 1 << 20  # measured: docs/benchmarks.md, "Chunk size"
GRANULE = 64 << 10  # change tracking's block: chunks must be whole multiples of it
MAX_CHUNK_SIZE = 64 << 20
_UNSET = object()


def _binding(repository_id: str, chunk_size: int) -> bytes:
    """What the wrapped master key is bound to, so a config edited to another ID or chunk size fails to unlock."""
    return f"hvbackup-key:{repository_id}:{chunk_size}".encode()


class Repository:
    def __init__(self, path: str, config: dict, keys: Keys | None):
        self.path = path
        self.id: str = config["id"]
        self.chunk_size: int = config["chunk_size"]
        self.encrypted = keys is not None
        self.codec = ChunkCodec(self.chunk_size, keys)
        self._keys = keys

    # -- creating and opening

    @classmethod
    def init(cls, path: str, *, passphrase: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> "Repository":
        if not (GRANULE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size % GRANULE == 0):
            raise RepositoryError(f"chunk size {chunk_size} must be a multiple of 64 KiB up to 64 MiB")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise RepositoryError(f"{path} exists and is not an empty directory")
        repository_id = secrets.token_hex(16)
        config = {"format": envelope.VERSION, "id": repository_id, "chunk_size": chunk_size, "hash": "blake3",
                  "compression": "zstd", "encryption": None}
        keys = None
        if passphrase is not None:
            keys, config["encryption"] = Keys.create(passphrase, _binding(repository_id, chunk_size))
        try:
            for directory in (*(os.path.join(path, sub) for sub in ("tmp", "points", "chunks")), *chunk_dirs(path)):
                os.makedirs(directory, exist_ok=True)
            for d in (*chunk_dirs(path), os.path.join(path, "chunks"), path):
                sync_directory(d)
            # The config goes last: a directory without one is an unfinished init, not a repository.
            data = envelope.frame(CONFIG_MAGIC, 0, json.dumps(config, indent=1).encode())
            envelope.write_durable(os.path.join(path, "tmp"), os.path.join(path, "config"), data)
            sync_directory(path)
        except OSError as exc:
            raise RepositoryError(f"cannot create repository at {path}: {exc.strerror}") from None
        return cls(path, config, keys)

    @classmethod
    def open(cls, path: str, *, passphrase: str | None = None) -> "Repository":
        try:
            data = envelope.read_bounded(os.path.join(path, "config"), MAX_CONFIG, "config")
        except FileNotFoundError:
            raise RepositoryError(f"{path} is not a repository (make one with 'hvbackup repo init {path}')") from None
        except OSError as exc:
            raise RepositoryError(f"cannot read {path}/config: {exc.strerror}") from None
        _, _, payload = envelope.unframe(data, CONFIG_MAGIC, MAX_CONFIG, "config")
        try:
            config = json.loads(bytes(payload))
            ok = (isinstance(config, dict) and config.get("format") == envelope.VERSION
                  and isinstance(config.get("id"), str) and isinstance(config.get("chunk_size"), int)
                  and config.get("hash") == "blake3" and config.get("compression") == "zstd")
        except ValueError:
            ok = False
        if not ok:
            raise RepositoryCorruptError("config: not a supported repository configuration")
        size = config["chunk_size"]
        if not (GRANULE <= size <= MAX_CHUNK_SIZE and size % GRANULE == 0):
            raise RepositoryCorruptError(f"config: chunk size {size} out of range")
        keys = None
        if config.get("encryption"):
            if passphrase is None:
                raise PassphraseNeededError("the repository is encrypted: give its passphrase")
            keys = Keys.unlock(passphrase, config["encryption"], _binding(config["id"], size))
        return cls(path, config, keys)

    # -- reading

    def _sub(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def point_ids(self) -> list[str]:
        return sorted(n for n in os.listdir(self._sub("points")) if manifest.POINT_ID.match(n))

    def point(self, point_id: str) -> dict:
        """The full manifest of one restore point, checked."""
        if not manifest.POINT_ID.match(point_id):
            raise RepositoryError(f"{point_id!r} is not a point ID")
        try:
            data = envelope.read_bounded(self._sub("points", point_id), manifest.MAX_STORED, f"point {point_id}")
        except FileNotFoundError:
            raise RepositoryError(f"no restore point {point_id}") from None
        return manifest.decode(data, point_id, self._keys, self.id, self.chunk_size)

    def points(self) -> list[dict]:
        """Every restore point, oldest first, without the chunk lists; a damaged manifest raises."""
        summaries = []
        for point_id in self.point_ids():
            m = self.point(point_id)
            for disk in m["disks"]:
                del disk["chunks"]
            summaries.append(m)
        return summaries

    def read_chunk(self, name_hex: str) -> bytes:
        """One chunk's plaintext, checked against its name."""
        path = chunk_path(self.path, name_hex)
        try:
            stored = envelope.read_bounded(path, max_payload(self.chunk_size) + 64, f"chunk {name_hex}")
        except FileNotFoundError:
            raise RepositoryCorruptError(f"chunk {name_hex} is missing") from None
        return self.codec.decode(bytes.fromhex(name_hex), stored)

    def read_disk(self, point_id: str, index: int, *, zeros: bool = True) -> Iterator[tuple[int, bytes]]:
        """(offset, data) for each chunk of a disk, in order; every chunk is verified before it is
        yielded. Zero chunks are yielded as zeros, or skipped with ``zeros=False``."""
        disks = self.point(point_id)["disks"]
        if not 0 <= index < len(disks):
            raise RepositoryError(f"point {point_id} has no disk {index}")
        size = disks[index]["geometry"]["virtual_size"]
        zero = bytes(self.chunk_size)
        for i, name in enumerate(disks[index]["chunks"]):
            offset = i * self.chunk_size
            length = min(self.chunk_size, size - offset)
            if name is None:
                if zeros:
                    yield offset, zero[:length]
                continue
            data = self.read_chunk(name)
            if len(data) != length:
                raise RepositoryCorruptError(f"chunk {name} holds {len(data)} bytes where {length} belong")
            yield offset, data

    # -- writing

    def writer(self) -> "_SingleWriter":
        """``with repo.writer() as w``: the lock, and a writer for one restore point."""
        return _SingleWriter(self)

    def session(self) -> "Session":
        """``with repo.session() as s``: the lock, and ``s.writer()`` for each of several restore points."""
        return Session(self)

    def forget(self, point_id: str) -> None:
        """Remove a restore point's manifest; its chunks stay until ``prune``."""
        if not manifest.POINT_ID.match(point_id):
            raise RepositoryError(f"{point_id!r} is not a point ID")
        try:
            os.unlink(self._sub("points", point_id))
        except FileNotFoundError:
            raise RepositoryError(f"no restore point {point_id}") from None
        sync_directory(self._sub("points"))

    def referenced(self, *, strict: bool, prefix: bool = False) -> np.ndarray:
        """The sorted, unique chunk names the manifests reference: full 32-byte names ('S32'), or their
        first 8 bytes as uint64 with ``prefix``. Memory is one array entry per distinct chunk.
        ``strict`` raises on a damaged manifest; otherwise its chunks are left out."""
        dtype = np.dtype(">u8") if prefix else np.dtype("S32")
        found, pending, pending_count = np.empty(0, dtype), [], 0
        for point_id in self.point_ids():
            try:
                m = self.point(point_id)
            except RepositoryError:
                if strict and os.path.exists(self._sub("points", point_id)):  # else forgotten meanwhile
                    raise
                continue
            names = b"".join(bytes.fromhex(c) for d in m["disks"] for c in d["chunks"] if c is not None)
            arr = np.frombuffer(names, np.dtype("S32"))
            pending.append(np.frombuffer(arr.tobytes(), ">u8")[::4].copy() if prefix else arr)
            pending_count += len(arr)
            if pending_count > 1 << 20:  # merge now and then so duplicates never pile up
                found, pending, pending_count = np.unique(np.concatenate([found, *pending])), [], 0
        return np.unique(np.concatenate([found, *pending]))

    def prune(self, progress: Callable[[int, int], None] | None = None) -> dict:
        """Delete every chunk no manifest references. Under the lock; refuses while any manifest is
        damaged (its chunks might be needed). Memory: 8 bytes per distinct referenced chunk.
        ``progress(done, total)`` counts the 256 chunk directories swept."""
        with RepositoryLock(self._sub("lock")):
            envelope.clear_dir(self._sub("tmp"))
            keep = self.referenced(strict=True, prefix=True)
            deleted = freed = kept = 0
            directories = chunk_dirs(self.path)
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
        return {"chunks_deleted": deleted, "bytes_freed": freed, "chunks_kept": kept}

    def verify(self, read_data: bool = False, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Problems found: damaged manifests, missing chunks and, with ``read_data``, referenced chunks
        that fail to authenticate, decompress or hash to their name. An empty list means sound.
        ``progress(done, total)`` counts the chunks read."""
        problems = []
        for point_id in self.point_ids():
            try:
                m = self.point(point_id)
            except RepositoryError as exc:
                problems.append(str(exc))
                continue
            for disk in m["disks"]:
                for name in sorted({c for c in disk["chunks"] if c is not None}):
                    if not os.path.isfile(chunk_path(self.path, name)):
                        problems.append(f"point {point_id} disk {disk['index']}: chunk {name} is missing")
        if read_data:
            names = self.referenced(strict=False)
            for done, raw in enumerate(names, 1):
                if progress:
                    progress(done, len(names))
                name = raw.ljust(32, b"\0").hex()
                if os.path.isfile(chunk_path(self.path, name)):
                    try:
                        self.read_chunk(name)
                    except RepositoryError as exc:
                        problems.append(str(exc))
        return problems


class Session:
    """Holds the repository lock and what its writers share: which chunks are already stored.
    ``session.writer()`` gives one ``Writer`` per restore point; several may fill at once (one per VM
    backed up concurrently), each committing on its own."""

    def __init__(self, repo: Repository):
        self.repo = repo
        self._lock = RepositoryLock(repo._sub("lock"))
        self._mutex = threading.Lock()
        self._written: set[bytes] = set()
        self._durable = np.empty(0, "S32")
        self._dirty_dirs: set[str] = set()
        self.open = False

    def __enter__(self) -> "Session":
        self._lock.__enter__()
        try:
            envelope.clear_dir(self.repo._sub("tmp"))
            # Only chunks a committed manifest references are known complete; anything else is rewritten.
            self._durable = self.repo.referenced(strict=False)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        self.open = True
        return self

    def __exit__(self, *exc) -> None:
        self.open = False  # no puts after the lock is gone
        self._lock.__exit__(*exc)

    def writer(self) -> "Writer":
        return Writer(self)

    def is_stored(self, name: bytes) -> bool:
        if name in self._written:
            return True
        at = np.searchsorted(self._durable, np.array([name], "S32"))[0]
        # 'S32' items drop trailing NUL bytes when read back; pad them again before comparing.
        return at < len(self._durable) and self._durable[at].ljust(32, b"\0") == name

    def store(self, name: bytes, data) -> int:
        """Write one chunk unless it is stored already; returns the bytes it took."""
        if self.is_stored(name):
            return 0
        stored = self.repo.codec.encode(name, data)
        path = chunk_path(self.repo.path, name.hex())
        try:
            envelope.write_durable(self.repo._sub("tmp"), path, stored)
        except OSError as exc:
            raise RepositoryError(f"cannot store chunk {name.hex()}: {exc.strerror}") from None
        with self._mutex:
            self._written.add(name)
            self._dirty_dirs.add(os.path.dirname(path))
        return len(stored)

    def sync_chunks(self) -> None:
        """Chunk files were fsynced before their rename; this makes their directory entries durable."""
        with self._mutex:
            dirty, self._dirty_dirs = sorted(self._dirty_dirs), set()
        for directory in dirty:
            sync_directory(directory)


class _SingleWriter:
    """``repo.writer()``: a session holding one writer, for the common case of one restore point."""

    def __init__(self, repo: Repository):
        self._session = Session(repo)

    def __enter__(self) -> "Writer":
        self._session.__enter__()
        return self._session.writer()

    def __exit__(self, *exc) -> None:
        self._session.__exit__(*exc)


class Writer:
    """Stores one restore point: ``add_disk``, then ``put``/``reuse`` every chunk, then ``commit``.
    Usable while its session holds the lock; nothing is visible before commit."""

    def __init__(self, session: Session):
        self.repo = session.repo
        self._session = session
        self._mutex = threading.Lock()
        self._disks: dict[int, tuple[dict, list]] = {}
        self._committed = False
        self.bytes_read = self.bytes_stored = 0

    def _check_open(self) -> None:
        if self._committed or not self._session.open:
            raise RepositoryError("the writer is not open: use it inside 'with repo.writer() as w', before commit")

    def add_disk(self, index: int, geometry: dict) -> None:
        if index != len(self._disks):
            raise RepositoryError(f"disks are added in order: expected disk {len(self._disks)}, got {index}")
        geometry = manifest.check_geometry(index, geometry)
        count = manifest.chunk_count(geometry["virtual_size"], self.repo.chunk_size)
        self._disks[index] = (geometry, [_UNSET] * count)

    def _slot(self, disk_index: int, offset: int) -> tuple[int, int]:
        self._check_open()
        if disk_index not in self._disks:
            raise RepositoryError(f"no disk {disk_index} (add_disk first)")
        geometry, slots = self._disks[disk_index]
        size, chunk = geometry["virtual_size"], self.repo.chunk_size
        if offset % chunk or not 0 <= offset < size:
            raise RepositoryError(f"offset {offset} is not a chunk boundary inside disk {disk_index}")
        return offset // chunk, min(chunk, size - offset)

    def put(self, disk_index: int, offset: int, data) -> str | None:
        """Store the chunk at ``offset`` (a whole chunk, or the disk's tail); returns its name, None for zeros."""
        slot, length = self._slot(disk_index, offset)
        if len(data) != length:
            raise RepositoryError(f"disk {disk_index} offset {offset}: {len(data)} bytes given, {length} expected")
        ref, stored = None, 0
        if np.frombuffer(data, np.uint8).any():
            name = self.repo.codec.name(data)
            ref = name.hex()
            stored = self._session.store(name, data)
        with self._mutex:
            self._disks[disk_index][1][slot] = ref
            self.bytes_read += len(data)
            self.bytes_stored += stored
        return ref

    def reuse(self, disk_index: int, offset: int, chunk_ref: str | None) -> None:
        """Take an unchanged chunk from an earlier point (``chunk_ref`` from its manifest; None is zeros)."""
        slot, _ = self._slot(disk_index, offset)
        if chunk_ref is not None and not (isinstance(chunk_ref, str) and NAME.match(chunk_ref)
                                          and self._session.is_stored(bytes.fromhex(chunk_ref))):
            raise RepositoryError(f"chunk {chunk_ref!r} is not in any committed point of this repository")
        with self._mutex:
            self._disks[disk_index][1][slot] = chunk_ref

    def commit(self, fields: dict | None = None) -> str:
        """Make every new chunk durable, then write the manifest atomically; returns the point ID."""
        fields = manifest.caller_fields(fields or {})
        for index, (_, slots) in self._disks.items():
            if _UNSET in slots:
                missing = slots.index(_UNSET) * self.repo.chunk_size
                raise RepositoryError(f"disk {index}: the chunk at offset {missing} was never put")
        self._check_open()
        now = time.time()
        # Sortable by time, so listing points in name order lists them oldest first.
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        point_id = f"{stamp}.{int(now % 1 * 1e6):06d}Z-{secrets.token_hex(4)}"
        doc = {"point_id": point_id, "repository_id": self.repo.id, "chunk_size": self.repo.chunk_size,
               **fields, "ended": fields["ended"] or now, "bytes_read": self.bytes_read,
               "bytes_stored": self.bytes_stored,
               "disks": [{"index": i, "geometry": g, "chunks": s} for i, (g, s) in sorted(self._disks.items())]}
        try:
            # The chunks' directory entries become durable before the manifest that references them exists.
            self._session.sync_chunks()
            envelope.write_durable(self.repo._sub("tmp"), self.repo._sub("points", point_id),
                                   manifest.encode(doc, self.repo._keys))
            sync_directory(self.repo._sub("points"))
        except OSError as exc:
            raise RepositoryError(f"cannot commit the restore point: {exc.strerror}") from None
        self._committed = True
        return point_id
