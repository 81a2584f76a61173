"""Power-loss simulation: what a power cut could leave of the files a workload wrote.

A ``Recorder`` runs a workload in this process with every file operation under one directory
recorded: the ``os`` calls hvbackup uses for files (open, close, pwrite, write, writev, ftruncate,
fsync, fdatasync, rename, replace, link, unlink, mkdir, rmdir) and fallocate (``disks.fileio``).
The workload adds ``mark`` entries for what it acknowledged (a ``flush()`` that returned).

``state_at(n, rng)`` then builds one on-disk state that a power cut right after operation ``n``
could leave, in a fresh directory:

- file data: a write, truncate or fallocate followed by an fsync/fdatasync of its file is there;
  any other survives or not, independently and in any order, and a surviving write may be torn:
  only some of its 512-byte or 4 KiB sectors (aligned in the file) made it;
- names: a create, rename, link or unlink followed by an fsync of the directory it put the name in
  (for a rename, the destination's) is there; any other survives or is undone, independently of
  the others — what POSIX promises, stricter than a journaling file system that commits them in order.

Files are identified by their own identity (a new one at each create), not by name, so a rename
moves data and a name can be reused. See docs/testing.md, "Power loss".
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
import sys
import threading
from dataclasses import dataclass, field

from hvbackup.disks import fileio

SECTORS = (512, 4096)
DATA_OPS = ("write", "truncate", "zero", "extend")
NAME_OPS = ("create", "mkdir", "rename", "link", "unlink", "rmdir")
HELPERS = (os.path.join("disks", "fileio.py"), os.path.join("hvbackup", "durable.py"))


@dataclass
class Op:
    kind: str
    file: int = -1            # data ops, syncs: the file's identity
    offset: int = 0
    data: bytes = b""
    size: int = 0             # truncate / extend
    dirs: tuple = ()          # name ops: the directories changed
    args: tuple = ()          # name ops: what to do to them
    label: object = None      # mark
    site: str = ""            # syncs: where in hvbackup they were asked for (module:function)


@dataclass
class Tree:
    root: int
    entries: dict[int, dict[str, int]] = field(default_factory=dict)  # directory -> name -> identity
    contents: dict[int, bytes] = field(default_factory=dict)          # file -> bytes


class Recorder:
    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.ops: list[Op] = []
        self._ids: dict[tuple[int, int], int] = {}
        self._last_id = 0
        self._lock = threading.Lock()
        self._fds: dict[int, tuple[int, bool]] = {}  # fd -> (identity, is a directory)
        self.base = self._snapshot()

    # -- identities --------------------------------------------------------------------------

    def _new_id(self, st: os.stat_result) -> int:
        with self._lock:  # workloads write from several threads (the repository's sync threads)
            self._last_id += 1
            self._ids[(st.st_dev, st.st_ino)] = self._last_id
            return self._last_id

    def _id_of(self, path: str, *, follow: bool = False) -> int:
        st = self._real["stat"](path) if follow else self._real["lstat"](path)
        return self._ids.get((st.st_dev, st.st_ino)) or self._new_id(st)

    def _inside(self, path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        full = os.path.abspath(os.fsdecode(path))
        return full == self.root or full.startswith(self.root + os.sep)

    def _where(self, path) -> tuple[int, str]:
        """(identity of the directory, name) of a path inside the root."""
        directory, name = os.path.split(os.path.abspath(os.fsdecode(path)))
        return self._id_of(directory, follow=True), name

    def _snapshot(self) -> Tree:
        self._real = {"stat": os.stat, "lstat": os.lstat}
        tree = Tree(self._id_of(self.root, follow=True))
        for directory, dirs, files in os.walk(self.root):
            entries = tree.entries.setdefault(self._id_of(directory, follow=True), {})
            for name in dirs + files:
                path = os.path.join(directory, name)
                ident = entries[name] = self._id_of(path)
                if name in files:
                    with open(path, "rb") as f:
                        tree.contents[ident] = f.read()
                else:
                    tree.entries.setdefault(ident, {})
        return tree

    # -- recording ---------------------------------------------------------------------------

    def mark(self, label) -> None:
        self.ops.append(Op("mark", label=label))

    @contextlib.contextmanager
    def recording(self):
        """Patch the file operations for the duration of the block."""
        names = ("open", "close", "pwrite", "write", "writev", "ftruncate", "fsync", "fdatasync", "rename",
                 "replace", "link", "unlink", "mkdir", "rmdir", "lseek")
        real = {name: getattr(os, name) for name in names}
        self._real.update(real)
        real_fallocate = fileio._call_fallocate
        patched = {name: getattr(self, f"_{name}") for name in names if hasattr(self, f"_{name}")}
        for name, function in patched.items():
            setattr(os, name, function)
        fileio._call_fallocate = self._fallocate
        self._real["fallocate"] = real_fallocate
        try:
            yield self
        finally:
            for name, function in real.items():
                setattr(os, name, function)
            fileio._call_fallocate = real_fallocate

    def _open(self, path, flags, mode=0o777, *, dir_fd=None):
        inside = dir_fd is None and self._inside(path)
        existed = inside and os.path.lexists(path)
        fd = self._real["open"](path, flags, mode, dir_fd=dir_fd)
        if inside:
            st = os.fstat(fd)
            if existed:
                ident = self._ids.get((st.st_dev, st.st_ino)) or self._new_id(st)
            else:
                ident = self._new_id(st)
                directory, name = self._where(path)
                self.ops.append(Op("create", file=ident, dirs=(directory,), args=(directory, name, ident)))
            self._fds[fd] = (ident, stat.S_ISDIR(st.st_mode))
        return fd

    def _close(self, fd):
        self._fds.pop(fd, None)
        return self._real["close"](fd)

    def _record_write(self, fd, offset: int, data, count: int) -> None:
        if fd in self._fds and count > 0:
            self.ops.append(Op("write", file=self._fds[fd][0], offset=offset, data=bytes(memoryview(data)[:count])))

    def _pwrite(self, fd, data, offset):
        count = self._real["pwrite"](fd, data, offset)
        self._record_write(fd, offset, memoryview(data).cast("B"), count)
        return count

    def _write(self, fd, data):
        count = self._real["write"](fd, data)
        if fd in self._fds:
            end = self._real["lseek"](fd, 0, os.SEEK_CUR)
            self._record_write(fd, end - count, memoryview(data).cast("B"), count)
        return count

    def _writev(self, fd, buffers):
        buffers = list(buffers)
        count = self._real["writev"](fd, buffers)
        if fd in self._fds:
            end = self._real["lseek"](fd, 0, os.SEEK_CUR)
            joined = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
            self._record_write(fd, end - count, joined, count)
        return count

    def _ftruncate(self, fd, size):
        self._real["ftruncate"](fd, size)
        if fd in self._fds:
            self.ops.append(Op("truncate", file=self._fds[fd][0], size=size))

    def _sync(self, fd, real) -> None:
        real(fd)
        if fd in self._fds:
            ident, is_dir = self._fds[fd]
            self.ops.append(Op("dirsync" if is_dir else "sync", file=ident, site=_caller()))

    def _fsync(self, fd):
        self._sync(fd, self._real["fsync"])

    def _fdatasync(self, fd):
        self._sync(fd, self._real["fdatasync"])

    def _fallocate(self, fd, mode, offset, length):
        done = self._real["fallocate"](fd, mode, offset, length)
        if done and fd in self._fds:
            ident = self._fds[fd][0]
            if mode & (fileio.FALLOC_FL_PUNCH_HOLE | fileio.FALLOC_FL_ZERO_RANGE):
                self.ops.append(Op("zero", file=ident, offset=offset, size=length))
            elif not mode & fileio.FALLOC_FL_KEEP_SIZE:
                self.ops.append(Op("extend", file=ident, size=offset + length))
        return done

    def _rename(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None, real_name="rename"):
        inside = src_dir_fd is None and dst_dir_fd is None and self._inside(src)
        if inside:
            ident = self._id_of(src)
            (sdir, sname), (ddir, dname) = self._where(src), self._where(dst)
        self._real[real_name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        if inside:
            self.ops.append(Op("rename", dirs=(sdir, ddir), args=(sdir, sname, ddir, dname, ident)))

    def _replace(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        self._rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, real_name="replace")

    def _link(self, src, dst, **kwargs):
        inside = not kwargs and self._inside(dst)
        ident = self._id_of(src) if inside else None
        self._real["link"](src, dst, **kwargs)
        if inside:
            directory, name = self._where(dst)
            self.ops.append(Op("link", dirs=(directory,), args=(directory, name, ident)))

    def _unlink(self, path, *, dir_fd=None):
        self._remove("unlink", path, dir_fd)

    def _rmdir(self, path, *, dir_fd=None):
        self._remove("rmdir", path, dir_fd)

    def _remove(self, kind: str, path, dir_fd) -> None:
        inside = dir_fd is None and self._inside(path)
        where = self._where(path) if inside else None
        self._real[kind](path, dir_fd=dir_fd)
        if inside:
            self.ops.append(Op(kind, dirs=(where[0],), args=where))

    def _mkdir(self, path, mode=0o777, *, dir_fd=None):
        self._real["mkdir"](path, mode, dir_fd=dir_fd)
        if dir_fd is None and self._inside(path):
            ident = self._new_id(os.stat(path))
            directory, name = self._where(path)
            self.ops.append(Op("mkdir", dirs=(directory,), args=(directory, name, ident)))

    # -- what a power cut leaves ---------------------------------------------------------------

    def without_syncs_from(self, site: str) -> "Recorder":
        """This recording as if the syncs asked for at ``site`` had not been made: the mutation that
        shows a power-loss test depends on them."""
        mutated = object.__new__(Recorder)
        mutated.__dict__.update(self.__dict__)
        mutated.ops = [op for op in self.ops if op.site != site]
        return mutated

    def sync_sites(self) -> set[str]:
        return {op.site for op in self.ops if op.kind in ("sync", "dirsync")}

    def sync_points(self) -> list[int]:
        """The power-cut points right after each fsync, fdatasync, directory fsync and mark."""
        return [n for n, op in enumerate(self.ops, 1) if op.kind in ("sync", "dirsync", "mark")]

    def acknowledged(self, n: int):
        """The label of the last mark among the first ``n`` operations (None: none)."""
        return next((op.label for op in reversed(self.ops[:n]) if op.kind == "mark"), None)

    def state_at(self, n: int, rng: random.Random, target: str, *, harshest: bool = False) -> None:
        """Write into the new directory ``target`` one state a power cut after operation ``n`` may leave;
        ``harshest``: the one where of everything not yet durable only operation ``n`` itself made
        it (what shows a missing sync before it at once)."""
        ops = self.ops[:n]
        contents = {ident: bytearray(data) for ident, data in self.base.contents.items()}
        last_sync: dict[int, int] = {}
        last_dirsync: dict[int, int] = {}
        for i, op in enumerate(ops):
            if op.kind == "sync":
                last_sync[op.file] = i
            elif op.kind == "dirsync":
                last_dirsync[op.file] = i
        for i, op in enumerate(ops):
            if op.kind not in DATA_OPS:
                continue
            durable = last_sync.get(op.file, -1) > i
            if not durable and (i != n - 1 if harshest else rng.random() < 0.5):
                continue  # lost
            data = contents.setdefault(op.file, bytearray())
            if op.kind == "write":
                _apply_write(data, op.offset, op.data, None if durable or harshest else rng)
            elif op.kind == "truncate":
                del data[op.size:]
                data.extend(bytes(op.size - len(data)))
            elif op.kind == "zero":
                end = min(len(data), op.offset + op.size)
                data[op.offset:end] = bytes(max(0, end - op.offset))
            elif op.kind == "extend" and len(data) < op.size:
                data.extend(bytes(op.size - len(data)))
        names = [(i, op) for i, op in enumerate(ops) if op.kind in NAME_OPS]
        # A name change is durable once the directory it put a name in (or took one from) is synced,
        # for a rename the destination; any other may be undone, whatever came after it.
        entries = {d: dict(e) for d, e in self.base.entries.items()}
        for i, op in names:
            if last_dirsync.get(op.dirs[-1], -1) > i or (i == n - 1 if harshest else rng.random() < 0.5):
                _apply_name(entries, op)
        _materialize(entries, contents, self.base.root, target)


def mutation_shows(recorder: Recorder, site: str, cuts: list[int], check, work: str, seed=0) -> bool:
    """Whether, without the syncs asked for at ``site``, a power cut at one of ``cuts`` (tried in a
    seeded order, the harshest state and a random one each) leaves a state that
    ``check(directory, n, recording)`` rejects by raising."""
    mutated = recorder.without_syncs_from(site)
    rng = random.Random(f"{site}-{seed}")
    cuts = [n for n in cuts if n <= len(mutated.ops)]
    rng.shuffle(cuts)
    for case, n in enumerate(cuts):
        for harshest in (True, False):
            target = os.path.join(work, f"mutated{case}{'h' if harshest else ''}")
            mutated.state_at(n, rng, target, harshest=harshest)
            try:
                check(target, n, mutated)
            except Exception:  # noqa: BLE001 - any failure of the invariants is what is looked for
                return True
            shutil.rmtree(target)
    return False


def _caller() -> str:
    """The hvbackup function that asked for a sync: the first frame in hvbackup outside the shared
    I/O helpers (``disks/fileio.py``, ``durable.py``), so each design site is told apart."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}hvbackup{os.sep}" in name and not name.endswith(HELPERS):
            module = name.rsplit(f"{os.sep}hvbackup{os.sep}", 1)[1].removesuffix(".py").replace(os.sep, ".")
            return f"{module}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _apply_write(data: bytearray, offset: int, payload: bytes, rng: random.Random | None) -> None:
    """The write, whole (``rng`` None) or torn: each aligned sector of it kept or not."""
    end = offset + len(payload)
    if len(data) < end:
        data.extend(bytes(end - len(data)))
    if rng is None or rng.random() < 0.5:
        data[offset:end] = payload
        return
    sector = rng.choice(SECTORS)
    position = offset
    while position < end:
        stop = min(end, (position // sector + 1) * sector)
        if rng.random() < 0.5:
            data[position:stop] = payload[position - offset:stop - offset]
        position = stop


def _apply_name(entries: dict[int, dict[str, int]], op: Op) -> None:
    if op.kind in ("create", "link", "mkdir"):
        directory, name, ident = op.args
        entries.setdefault(directory, {})[name] = ident
        if op.kind == "mkdir":
            entries.setdefault(ident, {})
    elif op.kind == "rename":
        sdir, sname, ddir, dname, ident = op.args
        entries.setdefault(sdir, {}).pop(sname, None)
        entries.setdefault(ddir, {})[dname] = ident
    else:  # unlink, rmdir
        directory, name = op.args
        entries.setdefault(directory, {}).pop(name, None)


def _materialize(entries: dict[int, dict[str, int]], contents: dict[int, bytearray], root: int,
                 target: str) -> None:
    os.makedirs(target)
    placed: dict[int, str] = {}
    pending = [(root, target)]
    while pending:
        directory, path = pending.pop()
        for name, ident in entries.get(directory, {}).items():
            where = os.path.join(path, name)
            if ident in entries:
                os.mkdir(where)
                pending.append((ident, where))
            elif ident in placed:
                os.link(placed[ident], where)
            else:
                with open(where, "wb") as f:
                    f.write(contents.get(ident, b""))
                placed[ident] = where
