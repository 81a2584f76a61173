"""A local, deduplicating, crash-safe store of restore points (format: docs/repository.md).

``Repository.init`` / ``Repository.open``; ``repo.writer()`` stores one restore point under the lock
(``repo.session()`` several at once, ``backup/writer.py``); ``scan``, ``points``, ``point`` and
``read_disk`` read; ``forget`` drops a manifest; ``prune`` deletes the chunks no manifest references;
``verify`` lists problems and ``repair`` sets damage aside (``backup/checking.py``).

Damage stays where it is: a manifest that fails its checks is listed as damaged by ``scan`` and
every other point works as before; a chunk that is missing is stored again by the next backup that
has its data.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from typing import Callable, Iterator

from hvbackup import durable
from hvbackup.backup import envelope, manifest
from hvbackup.backup.chunks import ChunkCodec, chunk_dirs, chunk_path, max_payload
from hvbackup.backup.crypto import Keys
from hvbackup.backup.lock import RepositoryLock
from hvbackup.backup.manifest import Manifest
from hvbackup.backup.writer import Session, SingleWriter
from hvbackup.disks.fileio import sync_directory
from hvbackup.errors import PassphraseNeededError, RepositoryCorruptError, RepositoryError

CONFIG_MAGIC = b"HVBKCONF"
MAX_CONFIG = 64 << 10
DEFAULT_CHUNK_SIZE = 1 << 20  # measured: docs/benchmarks.md, "Chunk size"
GRANULE = 64 << 10  # change tracking's block: chunks must be whole multiples of it
MAX_CHUNK_SIZE = 64 << 20
# Directories of the layout; copy tools drop empty ones, so readers take a missing one as empty and
# every lock holder recreates them.
LAYOUT = ("tmp", "points", "chunks")
DAMAGED = "damaged"  # where repair sets aside what failed its checks (docs/repository.md, "Repair")
REPOSITORY_ID = re.compile(r"[0-9a-f]{32}")


def _binding(repository_id: str, chunk_size: int) -> bytes:
    """What the wrapped master key is bound to, so a config edited to another ID or chunk size fails to unlock."""
    return f"hvbackup-key:{repository_id}:{chunk_size}".encode()


def check_passphrase(passphrase: str | None) -> None:
    if passphrase is not None and not passphrase:
        raise RepositoryError("the passphrase is empty: an encrypted repository needs a real one")


@dataclass
class Damaged:
    """An entry of ``points/`` that is not a readable restore point."""

    name: str
    problem: str

    def to_dict(self) -> dict:
        return {"point_id": self.name, "damaged": self.problem}


@dataclass
class Scan:
    points: list[Manifest]    # summaries of the readable points, oldest first (no chunk indexes)
    damaged: list[Damaged]    # the rest of points/, by name


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
        path = os.fspath(path)
        if not (GRANULE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size % GRANULE == 0):
            raise RepositoryError(f"chunk size {chunk_size} must be a multiple of 64 KiB up to 64 MiB")
        check_passphrase(passphrase)
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise RepositoryError(f"{path} exists and is not an empty directory")
        repository_id = secrets.token_hex(16)
        config = {"format": envelope.VERSION, "id": repository_id, "chunk_size": chunk_size, "hash": "blake3",
                  "compression": "zstd", "encryption": None}
        keys = None
        if passphrase is not None:
            keys, config["encryption"] = Keys.create(passphrase, _binding(repository_id, chunk_size))
        repo = cls(path, config, keys)
        try:
            repo.ensure_layout()
            # The config goes last: a directory without one is an unfinished init, not a repository.
            data = envelope.frame(CONFIG_MAGIC, 0, json.dumps(config, indent=1).encode())
            envelope.write_durable(repo._sub("tmp"), repo._sub("config"), data)
            sync_directory(path)
        except OSError as exc:
            raise RepositoryError(f"cannot create repository at {path}: {exc.strerror}") from None
        return repo

    @classmethod
    def open(cls, path: str, *, passphrase: str | None = None) -> "Repository":
        path = os.fspath(path)
        check_passphrase(passphrase)
        if not os.path.isdir(path):
            why = "not a directory" if os.path.exists(path) else "no such directory"
            raise RepositoryError(f"{path} is not a repository: {why}")
        try:
            data = envelope.read_bounded(os.path.join(path, "config"), MAX_CONFIG, "config")
        except FileNotFoundError:
            raise RepositoryError(f"{path} is not a repository (make one with 'hvbackup repo init {path}')") from None
        except OSError as exc:
            raise RepositoryError(f"cannot read {path}/config: {exc.strerror}") from None
        _, _, payload = envelope.unframe(data, CONFIG_MAGIC, MAX_CONFIG, "config")
        try:
            config = json.loads(bytes(payload))
            # The ID names reference points: exactly 32 hex digits.
            ok = (isinstance(config, dict) and config.get("format") == envelope.VERSION
                  and isinstance(config.get("id"), str) and REPOSITORY_ID.fullmatch(config["id"]) is not None
                  and isinstance(config.get("chunk_size"), int)
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

    @contextlib.contextmanager
    def locked(self, doing: str) -> Iterator[None]:
        """Hold the writer lock, with the layout whole and tmp/ cleared: only a dead holder of the
        lock can have left anything there. ``doing`` completes "cannot … REPO" in an error."""
        with RepositoryLock(self._sub("lock")):
            try:
                self.ensure_layout()
                durable.clear(self._sub("tmp"))
            except OSError as exc:
                raise RepositoryError(f"cannot {doing} {self.path}: {exc.strerror}: {exc.filename}") from None
            yield

    def ensure_layout(self) -> None:
        """Recreate any directory of the layout that is missing (a lock holder's job)."""
        created = []
        for directory in (*(self._sub(d) for d in LAYOUT), *chunk_dirs(self.path)):
            if not os.path.isdir(directory):
                os.makedirs(directory, exist_ok=True)
                created.append(directory)
        for directory in {os.path.dirname(d) for d in created}:
            sync_directory(directory)

    # -- reading

    def _sub(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def _entries(self, *directory: str) -> list[str]:
        try:
            return sorted(os.listdir(self._sub(*directory)))
        except FileNotFoundError:
            return []

    def point_ids(self) -> list[str]:
        """The names in points/ that are point IDs, readable or not."""
        return [n for n in self._entries("points") if manifest.POINT_ID.fullmatch(n)]

    def point(self, point_id: str) -> Manifest:
        """The full manifest of one restore point, checked."""
        if not manifest.POINT_ID.fullmatch(point_id):
            raise RepositoryError(f"{point_id!r} is not a point ID")
        return self._manifest(("points",), point_id)

    def _manifest(self, directory: tuple[str, ...], point_id: str) -> Manifest:
        path = self._sub(*directory, point_id)
        try:
            data = envelope.read_bounded(path, manifest.MAX_STORED, f"point {point_id}")
        except FileNotFoundError:
            raise RepositoryError(f"no restore point {point_id}") from None
        except OSError as exc:
            raise RepositoryCorruptError(f"point {point_id}: cannot be read: {exc.strerror}") from None
        return manifest.decode(data, point_id, self._keys, self.id, self.chunk_size)

    def manifests(self, *, set_aside: bool = False) -> Iterator[tuple[str, Manifest | Damaged]]:
        """(name, manifest) for every entry of points/ — or of damaged/points/, the points repair set
        aside — in name order; an entry that is not a readable manifest comes as ``Damaged``. One
        forgotten while this runs is skipped."""
        directory = (DAMAGED, "points") if set_aside else ("points",)
        for name in self._entries(*directory):
            if not manifest.POINT_ID.fullmatch(name):
                yield name, Damaged(name, "not a restore point (an unexpected name in points/)")
                continue
            try:
                yield name, self._manifest(directory, name)
            except RepositoryCorruptError as exc:
                yield name, Damaged(name, str(exc))
            except RepositoryError:
                continue

    def scan(self) -> Scan:
        """Every entry of points/: the readable points' summaries, oldest first, and the damaged ones."""
        found = Scan([], [])
        for _, m in self.manifests():
            if isinstance(m, Damaged):
                found.damaged.append(m)
                continue
            found.points.append(m.summary())
        return found

    def points(self) -> list[Manifest]:
        """The readable restore points, oldest first, without their chunk indexes."""
        return self.scan().points

    def read_chunk(self, name_hex: str) -> bytes:
        """One chunk's plaintext, checked against its name."""
        path = chunk_path(self.path, name_hex)
        try:
            stored = envelope.read_bounded(path, max_payload(self.chunk_size) + 64, f"chunk {name_hex}")
        except FileNotFoundError:
            raise RepositoryCorruptError(f"chunk {name_hex} is missing") from None
        except OSError as exc:
            raise RepositoryCorruptError(f"chunk {name_hex} cannot be read: {exc.strerror}") from None
        return self.codec.decode(bytes.fromhex(name_hex), stored)

    def read_disk(self, point_id: str, index: int, *, zeros: bool = True) -> Iterator[tuple[int, bytes]]:
        """(offset, data) for each chunk of a disk, in order; every chunk is verified before it is
        yielded. Zero chunks are yielded as zeros, or skipped with ``zeros=False``."""
        disks = self.point(point_id).disks
        if not 0 <= index < len(disks):
            raise RepositoryError(f"point {point_id} has no disk {index}")
        size, chunks = disks[index].geometry.virtual_size, disks[index].chunks
        zero = bytes(self.chunk_size)
        stored = dict(chunks.items())
        for slot in range(chunks.count) if zeros else stored:
            offset = slot * self.chunk_size
            length = min(self.chunk_size, size - offset)
            name = stored.get(slot)
            if name is None:
                yield offset, zero[:length]
                continue
            data = self.read_chunk(name)
            if len(data) != length:
                raise RepositoryCorruptError(f"chunk {name} holds {len(data)} bytes where {length} belong")
            yield offset, data

    # -- writing

    def writer(self) -> SingleWriter:
        """``with repo.writer() as w``: the lock, and a writer for one restore point."""
        return SingleWriter(self)

    def session(self) -> Session:
        """``with repo.session() as s``: the lock, and ``s.writer()`` for each of several restore points."""
        return Session(self)

    def forget(self, point_id: str) -> None:
        """Remove a restore point's manifest, readable or damaged (or whatever else ``scan`` lists as
        a damaged entry of points/); its chunks stay until ``prune``."""
        if not point_id or "/" in point_id or point_id in (".", ".."):
            raise RepositoryError(f"{point_id!r} is not a point ID")
        path = self._sub("points", point_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise RepositoryError(f"no restore point {point_id}") from None
        except IsADirectoryError:
            shutil.rmtree(path)  # junk under a point's name
        except OSError as exc:
            raise RepositoryError(f"cannot forget {point_id}: {exc.strerror}") from None
        sync_directory(self._sub("points"))

    # checking.py builds on this class, hence the imports in the methods below.

    def prune(self, progress: Callable[[int, int], None] | None = None) -> dict:
        from hvbackup.backup.checking import prune

        return prune(self, progress)

    def verify(self, read_data: bool = False, progress: Callable[[int, int], None] | None = None) -> list[str]:
        from hvbackup.backup.checking import verify

        return verify(self, read_data=read_data, progress=progress).problems

    def repair(self, progress: Callable[[int, int], None] | None = None):
        from hvbackup.backup.checking import repair

        return repair(self, progress=progress)
