"""A host directory's metadata on disk: JSON documents replaced atomically, and the lock that
serialises every process changing them.

Layout::

    DIR/host.json                    the host: format version, ID
    DIR/host.lock                    flock()ed by whoever changes metadata
    DIR/vms/<vm id>/vm.json          one VM: configuration, state, checkpoints, reference points,
                                     and the operation in progress, if any (its intent)
    DIR/vms/<vm id>/Virtual Hard Disks/…   its disk files

Every document is written whole to a temporary file, fsynced and renamed over the old one, so a
crash leaves either version. A multi-step operation first records its intent in the VM's document;
whoever takes the lock next finishes or undoes it (see ``Host.recover``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from typing import Iterator

from hvbackup.disks.fileio import replace_file
from hvbackup.errors import HostError

FORMAT_VERSION = 1


def read_document(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 24)
        document = json.loads(data)
    except FileNotFoundError:
        raise HostError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise HostError(f"{path}: unreadable: {exc}") from None
    if not isinstance(document, dict) or document.get("format_version") != FORMAT_VERSION:
        raise HostError(f"{path}: not a version {FORMAT_VERSION} hvbackup host document")
    return document


def write_document(path: str, document: dict) -> None:
    document = {**document, "format_version": FORMAT_VERSION}
    replace_file(path, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode())


class HostLock:
    """An exclusive flock on DIR/host.lock, re-entrant within a process (threads queue on it)."""

    def __init__(self, path: str):
        self.path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd = -1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    os.close(self._fd)
                    self._fd = -1
