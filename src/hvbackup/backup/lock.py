"""The repository's writer lock: an exclusive ``flock`` on the file ``lock``.

The kernel drops the lock when its holder dies, so a killed writer never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os

from hvbackup.errors import RepositoryError, RepositoryLockedError


class RepositoryLock:
    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "RepositoryLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RepositoryError(f"cannot take the repository lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RepositoryLockedError(f"repository is locked by another writer (pid {holder})") from None
        except OSError as exc:
            os.close(fd)
            raise RepositoryError(f"cannot take the repository lock {self.path}: {exc.strerror}") from None
        try:  # only for the refusal message above; a full disk must not stop the holder
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
