"""Durable files, defined once: stage a new file under a hidden name, fsync it, rename it into place,
fsync the directory; and sweep the staged files a crash left behind.

A staged file is named ``.<final name>.<purpose>`` (a random token added when several may be staged
at once), in the final file's directory or in a directory of staged files the caller owns, so a
crash at any instant leaves the destination absent, old or complete — never partial — and a sweep
knows what is a leftover. Errors are ``OSError``: each layer names the failure in its own terms.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Callable, Iterator, Sequence

PARTIAL = "partial"


def sync_directory(directory: str) -> None:
    """Make the directory's entries (a file created, renamed or removed) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hidden(target: str, purpose: str) -> str:
    """The staged name of ``target`` for ``purpose``, next to it."""
    directory, name = os.path.split(os.path.abspath(target))
    return os.path.join(directory, f".{name}.{purpose}")


def unique_hidden(target: str, purpose: str = PARTIAL) -> str:
    """A staged name of ``target`` that no other writer uses at the same time."""
    return hidden(target, f"{secrets.token_hex(6)}.{purpose}")


class Staged:
    """A new file written under a staged name and still open. ``finish`` puts it in place, durably;
    ``discard`` removes it. Exactly one of them, once."""

    def __init__(self, path: str, mode: int = 0o666):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)  # less the umask

    @classmethod
    def next_to(cls, target: str, mode: int = 0o666) -> "Staged":
        return cls(unique_hidden(target), mode)

    @classmethod
    def inside(cls, directory: str, mode: int = 0o666) -> "Staged":
        """Staged in a directory of staged files the caller owns (and sweeps whole)."""
        return cls(os.path.join(directory, f"{os.getpid()}-{secrets.token_hex(8)}.{PARTIAL}"), mode)

    def write(self, parts: Sequence) -> "Staged":
        """Append ``parts`` one after the other without joining them (``writev``)."""
        views = [view for view in (memoryview(part).cast("B") for part in parts) if len(view)]
        while views:
            written = os.writev(self.fd, views)
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
        return self

    def finish(self, target: str, *, replace: bool = True, sync_dir: bool = True,
               before_rename: Callable[[], None] | None = None) -> None:
        """fsync, close, then rename over ``target`` (``replace``) or link it there, refusing an existing
        file (``FileExistsError``); fsync the directory unless the caller does it for many files at once.
        ``before_rename()`` runs between the fsync and the rename. On failure the staged file goes."""
        try:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
            if before_rename is not None:
                before_rename()
            _put_in_place(self.path, target, replace=replace, sync_dir=sync_dir)
        except BaseException:
            _unlink_quietly(self.path)
            raise

    def discard(self) -> None:
        try:
            os.close(self.fd)
        finally:
            _unlink_quietly(self.path)


def write_file(target: str, parts: Sequence, *, replace: bool = True, staging: str | None = None,
               mode: int = 0o666) -> None:
    """Put ``parts`` at ``target`` atomically: a crash leaves the old file (or none) or the new one,
    whole. Staged next to the target, or in the ``staging`` directory (then the caller fsyncs the
    target's directory)."""
    staged = Staged.inside(staging, mode) if staging else Staged.next_to(target, mode)
    try:
        staged.write(parts)
    except BaseException:
        staged.discard()
        raise
    staged.finish(target, replace=replace, sync_dir=staging is None)


@contextlib.contextmanager
def built_in_place(target: str, purpose: str = PARTIAL, *, replace: bool = True) -> Iterator[str]:
    """Yield a staged path for a file that other code builds by name (a disk being created, restored
    or exported); once the block ends without an exception the file is fsynced and renamed over
    ``target`` (or linked there, refusing an existing file), and the directory synced. On any
    exception the staged file goes."""
    temp = hidden(target, purpose)
    try:
        yield temp
        fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _put_in_place(temp, target, replace=replace, sync_dir=True)
    except BaseException:
        _unlink_quietly(temp)
        raise


def _put_in_place(staged: str, target: str, *, replace: bool, sync_dir: bool) -> None:
    """Rename the (fsynced) staged file over ``target``, or link it there refusing an existing file
    (``FileExistsError``); then fsync the directory unless the caller does it for many files at once."""
    if replace:
        os.rename(staged, target)
    else:
        os.link(staged, target)
        os.unlink(staged)
    if sync_dir:
        sync_directory(os.path.dirname(os.path.abspath(target)))


def sweep(directory: str, name: str, *, keep: Sequence[str] = ()) -> list[str]:
    """Remove the staged files of ``name`` in ``directory`` (hidden names ``.<name>.…``) that an
    interrupted writer left, except those ending in one of ``keep`` (work to resume). Returns what
    went. Only for a directory whose writers the caller excludes (a lock, the owning process)."""
    removed = []
    for entry in os.listdir(directory):
        if entry.startswith(f".{name}.") and not entry.endswith(tuple(keep)):
            _unlink_quietly(os.path.join(directory, entry))
            removed.append(entry)
    return removed


def clear(directory: str) -> None:
    """Remove everything in a directory of staged files (the caller holds its lock)."""
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            _unlink_quietly(entry.path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
