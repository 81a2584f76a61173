"""A host directory's metadata on disk: JSON documents replaced atomically, and the lock that
serialises every process changing them.

Layout::

    DIR/host.json                    the host: format version, ID
    DIR/host.lock                    flock()ed by whoever changes metadata
    DIR/vms/<vm id>/vm.json          one VM: configuration, state, checkpoints, reference points,
                                     and the operation in progress, if any (its intent)
    DIR/vms/<vm id>/Virtual Hard Disks/…   its disk files
    DIR/vms/<vm id>.partial/         a VM being built; a crash leaves it for the next open to remove

Every document is written whole under a hidden name, fsynced and renamed over the old one
(``durable.write_file``), so a crash leaves either version. A multi-step operation first records its
intent in the VM's document; whoever takes the lock next finishes or undoes it
(``checkpoints.finish_intent``).

One ``HostLock`` object stands for a host directory in a process, however many ``Host`` objects
are opened on it: flock() locks belong to an open file, so two objects would block each other even
within one thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from typing import Iterator

from hvbackup import durable
from hvbackup.errors import HostError
from hvbackup.host.fileerrors import file_errors, return_value
from hvbackup.units import MiB

FORMAT_VERSION = 1
MAX_DOCUMENT = 16 * MiB
STAGING_SUFFIX = ".partial"


def read_document(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DOCUMENT)
        document = json.loads(data)
    except FileNotFoundError:
        raise HostError(f"{path}: missing") from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for json
        raise HostError(f"{path}: unreadable: {exc}") from None
    if not isinstance(document, dict) or document.get("format_version") != FORMAT_VERSION:
        raise HostError(f"{path}: not a version {FORMAT_VERSION} hvbackup host document")
    return document


def write_document(path: str, document: dict) -> None:
    data = (json.dumps({**document, "format_version": FORMAT_VERSION}, indent=1, sort_keys=True) + "\n").encode()
    try:
        durable.write_file(path, [data])
    except OSError as exc:
        raise HostError(f"{path}: cannot write: {exc.strerror or exc}", return_value(exc)) from None


_LOCKS: dict[str, HostLock] = {}
_LOCKS_GUARD = threading.Lock()


def host_lock(directory: str) -> HostLock:
    """The process's one lock object for the host in ``directory``."""
    path = os.path.join(os.path.realpath(directory), "host.lock")
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(path, HostLock(path))


class HostLock:
    """An exclusive flock on DIR/host.lock, re-entrant within a process (threads queue on it)."""

    def __init__(self, path: str):
        self.path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd = -1
        self._holder: int | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                with file_errors("locking the host"):
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd, self._holder = fd, threading.get_ident()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    os.close(self._fd)
                    self._fd, self._holder = -1, None

    def owned(self) -> bool:
        """Whether the calling thread holds the lock (so it must not wait for anything that needs it)."""
        return self._holder == threading.get_ident()
