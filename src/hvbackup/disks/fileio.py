"""Positional file I/O into caller buffers, and the Linux space calls (fallocate) the formats use.

Every helper takes a file descriptor and an absolute file offset, so no code depends on a shared
file position. Buffers are memoryviews over preallocated storage; nothing here copies payload.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
from typing import Iterator

import numpy as np

from hvbackup import durable
from hvbackup.errors import DiskBusyError, DiskError, DiskFormatError
from hvbackup.units import MiB

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 2

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZEROS = bytes(4 * MiB)


def open_disk_file(path: str, read_only: bool) -> int:
    """Open a disk file; a writer takes an exclusive lock, so two writers never share a disk."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except IsADirectoryError:
        raise DiskError(f"{path}: is a directory, not a disk") from None
    except OSError as exc:
        raise DiskError(f"{path}: cannot open: {exc.strerror}") from exc
    if stat.S_ISDIR(os.fstat(fd).st_mode):  # opening a directory read-only succeeds; reading it fails
        os.close(fd)
        raise DiskError(f"{path}: is a directory, not a disk")
    if not read_only:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DiskBusyError(f"{path}: another process has the disk open for writing") from None
    return fd


def file_name(fd: int) -> str:
    """The path of an open file, so an I/O error can name it (Linux keeps it as /proc/self/fd/N)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"file descriptor {fd}"


def io_error(fd: int, what: str, exc: OSError) -> DiskError:
    return DiskError(f"{file_name(fd)}: {what} failed: {exc.strerror}")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def readinto_at(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``offset``; bytes past the end of the file read as zeros."""
    done = 0
    total = len(buffer)
    while done < total:
        try:
            got = os.preadv(fd, [buffer[done:]], offset + done)
        except OSError as exc:
            raise io_error(fd, f"read at offset {offset + done:#x}", exc) from exc
        if got == 0:
            zero_fill(buffer[done:])
            return
        done += got


def read_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    """Read a structure that must lie wholly inside the file."""
    data = b""
    while len(data) < length:
        try:
            more = os.pread(fd, length - len(data), offset + len(data))
        except OSError as exc:
            raise io_error(fd, f"read at offset {offset + len(data):#x}", exc) from exc
        if not more:
            raise DiskFormatError(f"file is truncated: {what} at offset {offset:#x} is incomplete",
                                  reason="disk.file.truncated")
        data += more
    return data


def data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The [low, high) ranges of [start, end) the file stores data in (SEEK_DATA/SEEK_HOLE); the rest
    are holes and read as zeros. A filesystem without holes reports everything up to the end of the
    file as data."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            if data >= end:
                return
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after pos
                return
            raise io_error(fd, "mapping data and holes", exc) from exc
        yield data, hole
        pos = hole


def write_at(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise io_error(fd, f"write at offset {offset + done:#x}", exc) from exc


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros, keeping the space allocated."""
    if length <= 0:
        return
    if _call_fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
        return
    end = offset + length
    while offset < end:
        step = min(end - offset, len(_ZEROS))
        write_at(fd, memoryview(_ZEROS)[:step], offset)
        offset += step


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros and give the space back to the filesystem."""
    if length <= 0:
        return
    if not _call_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        write_zeros(fd, offset, length)


def preallocate(fd: int, offset: int, length: int) -> None:
    """Reserve real space for [offset, offset+length) (fixed disks); extends the file."""
    if not _call_fallocate(fd, 0, offset, length):
        try:
            os.ftruncate(fd, max(os.fstat(fd).st_size, offset + length))
        except OSError as exc:
            raise io_error(fd, f"growing to {offset + length:#x} bytes", exc) from exc


def _call_fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """True if the filesystem did it; False if it does not support this mode."""
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise DiskError(f"{file_name(fd)}: fallocate at offset {offset:#x} failed: {os.strerror(err)}")


def zero_fill(buffer: memoryview) -> None:
    if len(buffer):
        np.frombuffer(buffer, dtype=np.uint8)[:] = 0


def is_zero(buffer) -> bool:
    """True if every byte is zero (vectorised; about 40 GB/s)."""
    view = memoryview(buffer).cast("B")
    body = len(view) & ~7
    if body and np.frombuffer(view[:body], dtype=np.uint64).any():
        return False
    return not any(view[body:])


def start_writeback(fd: int) -> None:
    """Begin writing the file's dirty pages to storage without waiting for them, and drop from the
    page cache those already written (hints: a later sync has less to wait for, and a long stream of
    writes does not crowd everything else out of memory)."""
    _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        raise io_error(fd, "write-back", exc) from exc


def sync_data(fd: int) -> None:
    try:
        os.fdatasync(fd)
    except OSError as exc:
        raise io_error(fd, "flush", exc) from exc


@contextlib.contextmanager
def new_file(path: str) -> Iterator[int]:
    """Build a new file under a staged name and link it to ``path`` only once it is complete and
    durable, so a crash never leaves a half-written file there. Refuses to replace an existing file."""
    if os.path.lexists(path):
        raise DiskError(f"{path}: already exists")
    try:
        staged = durable.Staged.next_to(path)
    except OSError as exc:
        raise DiskError(f"{path}: cannot create: {exc.strerror}") from exc
    try:
        yield staged.fd
    except DiskError as exc:  # the staged name means nothing to the user: name the file being made
        staged.discard()
        raise DiskError(str(exc).replace(staged.path, path)) from exc
    except BaseException:
        staged.discard()
        raise
    try:
        staged.finish(path, replace=False)
    except FileExistsError:
        raise DiskError(f"{path}: already exists") from None
    except OSError as exc:
        raise DiskError(f"{path}: cannot create: {exc.strerror}") from exc


def sync_directory(directory: str) -> None:
    """Make the directory's entries (a file created, renamed or removed) durable."""
    try:
        durable.sync_directory(directory)
    except OSError as exc:
        raise DiskError(f"{directory}: flushing the directory failed: {exc.strerror}") from exc


def rename_file(path: str, new_path: str) -> None:
    """Rename ``path`` (a disk just built), naming it if that fails."""
    try:
        os.rename(path, new_path)
    except OSError as exc:
        raise DiskError(f"{path}: cannot rename to {new_path}: {exc.strerror}") from exc


def remove_file(path: str) -> None:
    """Delete ``path`` (a disk or a side file), naming it if that fails."""
    try:
        os.unlink(path)
    except OSError as exc:
        raise DiskError(f"{path}: cannot delete: {exc.strerror}") from exc


def replace_file(path: str, data: bytes) -> None:
    """Put ``data`` at ``path`` atomically: a crash leaves either the old file or the new one, whole."""
    try:
        durable.write_file(path, [data])
    except OSError as exc:
        raise DiskError(f"{path}: cannot write: {exc.strerror}") from exc
