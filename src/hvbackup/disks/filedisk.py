"""What every format stored in one host file shares: opening (with the writer's lock), naming the
file in format errors, and releasing the file and its parent chain."""

from __future__ import annotations

import abc
import os

from hvbackup.disks.device import BlockDevice
from hvbackup.disks.fileio import open_disk_file, start_writeback
from hvbackup.errors import DiskFormatError, ParentError


class FileDisk(BlockDevice):
    _fd: int = -1

    @classmethod
    def open(cls, path: str, *, read_only: bool = False, _chain: tuple[str, ...] = ()):
        """Open ``path``; ``_chain`` holds the real paths of the children above, to catch loops."""
        disk = cls.__new__(cls)
        disk.path, disk.read_only, disk.closed, disk.parent = path, read_only, False, None
        disk._fd = open_disk_file(path, read_only)
        try:
            disk._load(_chain + (os.path.realpath(path),))
            return disk
        except ParentError:
            disk._release()
            raise
        except DiskFormatError as exc:
            disk._release()
            raise DiskFormatError(f"{path}: {exc}") from None
        except BaseException:
            disk._release()
            raise

    @abc.abstractmethod
    def _load(self, chain: tuple[str, ...]) -> None:
        """Read and validate the format's structures from ``self._fd``; open the parent if any."""

    def problems(self) -> list[str]:
        """Damage the file survives (a damaged redundant copy, say), found when it was opened."""
        return []

    def repair(self) -> list[str]:
        """Fix what ``problems`` names where no data is lost; what was done, one line each. Needs a
        writable open."""
        return []

    def start_flush(self) -> None:
        if not self.read_only and not self.closed:
            start_writeback(self._fd)

    def _finish_writes(self) -> None:
        """Before a writer's file is released: make everything durable."""
        self.flush()

    def _close(self) -> None:
        try:
            if not self.read_only:
                self._finish_writes()
        finally:
            self._release()

    def _release(self) -> None:
        os.close(self._fd)
        if self.parent is not None:
            self.parent.close()
