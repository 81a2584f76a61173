"""The repository's writer lock: an exclusive ``flock`` on the file ``lock``.

The kernel drops the lock when its holder dies, so a killed writer never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os

from hvbackup.errors import RepositoryLockedError


class RepositoryLock:
    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "RepositoryLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RepositoryLockedError(f"repository is locked by another writer (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)  # only for the refusal message above
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
