"""A real ext4 filesystem on a guest disk, built, changed, read and checked without root or mount.

e2fsprogs does the filesystem work on raw image files: ``mke2fs -d`` builds one from a directory,
``debugfs`` writes and reads files in it, ``e2fsck -fn`` checks it. A guest disk is changed the way a
guest would change it: the disk's contents go to a temporary image, debugfs edits the image, and
only the 64 KiB granules that differ are written back through the disk, so change tracking sees
exactly what a guest that made those edits would have written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterator, Mapping

import numpy as np

from hvbackup import stack
from hvbackup.disks.copy import copy_data, data_pieces
from hvbackup.disks.device import BlockDevice, ExtentState
from hvbackup.errors import HvBackupError

GRANULE = 64 << 10  # change tracking's block: a write-back never splits one
BUFFER = 4 << 20
# e2fsprogs lives in sbin, which is not on every user's PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_GUEST_PATH = re.compile(r"^(/[^/\s\"'\\]+)+$")
_BANNER = re.compile(r"^debugfs \S+ \(.*\)$")


class GuestFsError(HvBackupError):
    """A guest filesystem operation failed: e2fsprogs missing, a bad path, a debugfs command refused."""


class FilesystemDamaged(GuestFsError):
    """``e2fsck`` found problems; ``output`` holds its full report."""

    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


def make_filesystem(source: str, image: str, size: int) -> None:
    """Create ``image``, a raw file of ``size`` bytes holding an ext4 filesystem with the files and
    directories under ``source``. ``-T default`` gives 4 KiB blocks at every size, as a distribution's
    installer would, rather than the 1 KiB blocks mke2fs picks for small filesystems."""
    if os.path.lexists(image):
        raise GuestFsError(f"{image} already exists: make the filesystem in a new file")
    _run("mke2fs", "-t", "ext4", "-T", "default", "-F", "-q", "-d", source, image, f"{size // 1024}k")


def check(image: str) -> None:
    """Raise FilesystemDamaged unless ``e2fsck -fn`` finds the filesystem in ``image`` clean."""
    result = subprocess.run([_tool("e2fsck"), "-fn", image], capture_output=True, text=True)
    if result.returncode != 0:
        output = result.stderr + result.stdout
        complaints = [line.strip() for line in output.splitlines()
                      if line.strip() and not line.startswith(("e2fsck ", "Pass "))]
        first = complaints[0] if complaints else "no details"
        raise FilesystemDamaged(f"{image}: e2fsck exited {result.returncode}: {first}", output)


def read_file(image: str, path: str) -> bytes:
    """The contents of the file at ``path`` in the filesystem in ``image``."""
    return _debugfs(image, f"cat {_checked(path)}")


def checksums(image: str, directory: str | None = None) -> dict[str, str]:
    """SHA-256 (hex) of every regular file in the filesystem in ``image``, by guest path. The files
    are copied out into a temporary directory (in ``directory``) first."""
    with tempfile.TemporaryDirectory(prefix="hvbackup-guestfs-", dir=directory) as out:
        # rdump restores owners; a user who may not chown sees that refused, which changes no contents.
        _debugfs(image, f"rdump / {out}", ignore=("while changing ownership", "while setting permissions"))
        found = {}
        for directory, _, names in os.walk(out):
            for name in names:
                local = os.path.join(directory, name)
                if os.path.isfile(local) and not os.path.islink(local):
                    with open(local, "rb") as f:
                        found["/" + os.path.relpath(local, out)] = hashlib.file_digest(f, "sha256").hexdigest()
        return dict(sorted(found.items()))


def edit(image: str, changes: Mapping[str, bytes | None]) -> None:
    """Change files in the filesystem in ``image``: each path gets the given contents (its parent
    directories made as needed), or is removed when given None."""
    with tempfile.TemporaryDirectory(prefix="hvbackup-guestfs-") as scratch:
        for number, (path, data) in enumerate(changes.items()):
            path = _checked(path)
            if data is None:
                _debugfs(image, f"rm {path}", writable=True)
                continue
            parts = path.split("/")[1:-1]
            for depth in range(1, len(parts) + 1):
                # debugfs's mkdir of an existing name leaks an inode before it refuses: ask first.
                directory = "/" + "/".join(parts[:depth])
                if not _exists(image, directory):
                    _debugfs(image, f"mkdir {directory}", writable=True)
            if _exists(image, path):
                _debugfs(image, f"rm {path}", writable=True)
            local = os.path.join(scratch, str(number))
            with open(local, "wb") as f:
                f.write(data)
            _debugfs(image, f"write {local} {path}", writable=True)


@contextlib.contextmanager
def image_of(disk: BlockDevice, directory: str | None = None) -> Iterator[str]:
    """A temporary raw image holding what ``disk`` holds now (holes where it holds nothing),
    removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="hvbackup-guestfs-", dir=directory) as scratch:
        path = os.path.join(scratch, "disk.img")
        with stack.create(path, disk.size, format="raw") as image:
            copy_data(disk, image, data_pieces(disk.extents()), skip_zeros=True)
        yield path


def apply_changes(disk: BlockDevice, changes: Mapping[str, bytes | None], directory: str | None = None) -> int:
    """Make the ``edit`` changes to the filesystem on ``disk``, writing only the granules they
    change; returns the bytes written to the disk."""
    with image_of(disk, directory) as image:
        edit(image, changes)
        with stack.open(image, read_only=True) as edited:
            return write_differences(edited, disk)


def write_differences(source: BlockDevice, target: BlockDevice) -> int:
    """Write into ``target`` every 64 KiB granule in which ``source`` differs from it; returns the
    bytes written. Only ranges where either disk holds data are compared: elsewhere both read zeros."""
    if source.size != target.size:
        raise GuestFsError(f"cannot copy differences between disks of {source.size} and {target.size} bytes")
    ours, theirs = memoryview(bytearray(BUFFER)), memoryview(bytearray(BUFFER))
    written = 0
    for start, end in _runs(_data_granules(source) | _data_granules(target)):
        for offset in range(start * GRANULE, min(end * GRANULE, source.size), BUFFER):
            length = min(BUFFER, end * GRANULE - offset, source.size - offset)
            source.readinto(offset, ours[:length])
            target.readinto(offset, theirs[:length])
            unequal = np.frombuffer(ours[:length], np.uint8) != np.frombuffer(theirs[:length], np.uint8)
            for first, stop in _runs(np.logical_or.reduceat(unequal, np.arange(0, length, GRANULE))):
                lo, hi = first * GRANULE, min(stop * GRANULE, length)
                target.write(offset + lo, ours[lo:hi])
                written += hi - lo
    target.flush()
    return written


def _data_granules(disk: BlockDevice) -> np.ndarray:
    """One flag per granule: does the disk hold data anywhere in it."""
    flags = np.zeros(-(-disk.size // GRANULE), bool)
    for extent in disk.extents():
        if extent.state == ExtentState.DATA:
            flags[extent.offset // GRANULE:-(-extent.end // GRANULE)] = True
    return flags


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges of the runs of True."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.astype(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _checked(path: str) -> str:
    """debugfs splits its command line on spaces and quotes: guest paths must have none."""
    if not _GUEST_PATH.match(path):
        raise GuestFsError(f"{path!r} is not an absolute guest path without spaces or quotes")
    return path


def _exists(image: str, path: str) -> bool:
    return bool(_debugfs(image, f"stat {path}", ignore=("File not found",)).strip())


def _debugfs(image: str, command: str, *, writable: bool = False, ignore: tuple[str, ...] = ()) -> bytes:
    """Run one debugfs command; its output, or GuestFsError with the first complaint. debugfs exits 0
    whatever happens, so its complaints on stderr are the only sign of failure."""
    args = [_tool("debugfs"), *(["-w"] if writable else []), "-R", command, image]
    result = subprocess.run(args, capture_output=True, env=os.environ | {"DEBUGFS_PAGER": "__none__"})
    complaints = [line for line in result.stderr.decode(errors="replace").splitlines()
                  if line.strip() and not _BANNER.match(line) and not any(text in line for text in ignore)]
    if result.returncode != 0 or complaints:
        raise GuestFsError(f"debugfs {command!r} on {image}: {(complaints or ['failed'])[0].strip()}")
    return result.stdout


def _run(tool: str, *args: str) -> None:
    result = subprocess.run([_tool(tool), *args], capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise GuestFsError(f"{tool} exited {result.returncode}: {detail[-1]}")


def _tool(name: str) -> str:
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        raise GuestFsError(f"{name} is not installed: install the e2fsprogs package (apt-get install e2fsprogs)")
    return path
