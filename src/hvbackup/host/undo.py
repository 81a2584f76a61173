"""What an operation created outside the host directory, so that a failure or an interruption
removes exactly that: the files and directories it made, never one that was there before, nor a
directory someone else has since put something in."""

from __future__ import annotations

import contextlib
import os

from hvbackup.errors import HostError
from hvbackup.host.returns import INVALID_PARAMETER


class Created:
    def __init__(self) -> None:
        self.files: list[str] = []
        self.directories: list[str] = []

    def make_directories(self, path: str) -> None:
        """``os.makedirs``, recording each level it makes."""
        missing = []
        level = os.path.abspath(path)
        while not os.path.isdir(level):
            if os.path.lexists(level):
                raise HostError(f"{level} is not a directory", INVALID_PARAMETER)
            missing.append(level)
            level = os.path.dirname(level)
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:
                if os.path.isdir(directory):
                    continue  # another process made it just now: not ours to remove
                raise
            self.directories.append(directory)

    def new_file(self, path: str) -> None:
        """``path`` is about to be written: remembered if nothing is there yet."""
        if not os.path.lexists(path):
            self.files.append(path)

    def remove(self) -> None:
        """Best effort, newest first, as the original failure is what the caller must see: what
        cannot be removed (a directory no longer empty) stays."""
        for path in reversed(self.files):
            with contextlib.suppress(OSError):
                os.unlink(path)
        for directory in reversed(self.directories):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
