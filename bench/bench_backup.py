"""Backup application speed: hvbackup full / incremental backups and restores against restic, in one run.

    python bench/bench_backup.py [--dir DIR] [--size 4G] [--data 2300M] [--changed 0.01] [--rounds 5]
                                 [--chunk-sizes 1,2,4,8] [--chunk-rounds 2] [--settle 2] [--json]

A directory is filled with a realistic mix (DATA in all): incompressible "media" files, compressible
text logs, a few large files copied several times, semi-compressible binary tables and thousands of
small files; ``mke2fs -t ext4 -d DIR IMAGE SIZE`` makes a SIZE ext4 image of it (kept in DIR and reused
when it is there). A VM with one SIZE disk gets the image written through the host's guest I/O
(``vm.disk(0).write`` in 32 MiB pieces, all-zero pieces skipped). restic backs up that image file.

Each round times, after an ``os.sync()`` and SETTLE seconds of quiet, in alternating order where the
cases do not depend on each other:

  full backups       hvbackup full (virtdisk method) into a fresh repository, unencrypted and
                     encrypted (AES-256-GCM), against ``restic backup --no-cache IMAGE`` into a fresh
                     restic repository (format 2, ``--compression auto``: zstd, always encrypted)
  second full        hvbackup ``full=True`` again, nothing written since: its bytes_stored
  restores           ``restore_disk(..., format="raw")`` from both repositories, against
                     ``restic restore latest --no-cache --target DIR``; restic does not fsync what it
                     restores, so its time is also given followed by ``sync FILE`` (hvbackup's restore
                     returns once the file is on stable storage)
  incrementals       (virtdisk, into the unencrypted repository) after CHANGED of the disk changed in
                     two ways, one after the other: file changes (made once with ``debugfs -w`` on a
                     copy of the image — logs rewritten and appended, a new media file, new small
                     files, a log deleted — the differing 4 KiB blocks written to the guest's disk),
                     then scattered writes (64 KiB of random data at random 64 KiB-aligned places:
                     the worst case for fixed-size chunks)
  export method      a full backup with ``--method export`` into a third repository, the file changes
                     undone, and an incremental by export (the host exports a differential, read and
                     removed); after it, the bytes the host directory holds beyond its VMs (target 0:
                     no copy of the disks is kept)

After each round the guest puts the image's bytes back at every place it changed (trimming where
they are zeros, as a filesystem discards freed blocks), so every round backs up the same content.
The restic and repository set-up (``init``) is not timed; hvbackup runs in this process, restic as a
command (its start-up, a few ms, is counted). Round 1 checks every restored file against the image.

Then the chunk-size study: for each size in CHUNK_SIZES (MiB), in alternating order for CHUNK_ROUNDS
rounds: full backup, restore, incremental after the file changes and after scattered writes, with
the repository's size on disk. The whole report is also written to DIR/report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from hvbackup.backup.engine import backup_vm
from hvbackup.backup.repository import DEFAULT_CHUNK_SIZE, Repository
from hvbackup.backup.restore import restore_disk
from hvbackup.host import Host
from hvbackup.units import MiB  # noqa: E402

K64 = 64 << 10
PIECE = 32 * MiB
PASSPHRASE = "bench-passphrase"
INCR_FILES = "hvbackup incremental (virtdisk), file changes"
INCR_SCATTERED = "hvbackup incremental (virtdisk), scattered 64 KiB writes"
INCR_EXPORT = "hvbackup incremental (export), file changes"
RESTIC_ENV = {**os.environ, "RESTIC_PASSWORD": PASSPHRASE}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


# -- the data set ---------------------------------------------------------------------------------

WORDS = np.array(("error warning info debug request response user session connect timeout retry GET POST "
                  "/api/v1/items /static/app.js 200 404 500 kernel: systemd[1]: Started Stopped service "
                  "backup volume disk sector read write flush sync ok failed pid uid latency_ms bytes "
                  "client=10.0.0.7 host=web01 host=db02 queue worker job done pending the a of to in for "
                  "is on with and id=").split(), dtype=object)


def _text(rng: np.random.Generator, size: int) -> bytes:
    """Log-like lines: a timestamp, a few words and numbers; compresses about 4-6x with zstd."""
    out, total, stamp = [], 0, int(rng.integers(1.6e9, 1.7e9))
    while total < size:
        n = min(60_000, (size - total) // 40 + 16)
        words = WORDS[rng.integers(0, len(WORDS), n)]
        nums = rng.integers(0, 100_000, n)
        lines = [f"{stamp + i // 7} {words[i]} {words[(i * 7) % n]} {nums[i]} {words[(i * 13) % n]} "
                 f"{nums[(i * 3) % n]:x}\n" for i in range(0, n, 1)]
        stamp += n
        block = "".join(lines).encode()
        out.append(block)
        total += len(block)
    return b"".join(out)[:size]


def _table(rng: np.random.Generator, size: int) -> bytes:
    """Semi-compressible binary: small integers in 32-bit little-endian fields (about 2-3x)."""
    return rng.integers(0, 4096, size // 4, dtype="<u4").astype("<u4").tobytes()[:size]


def populate(root: str, data: int, seed: int = 1) -> dict:
    """Fill ``root`` with about ``data`` bytes; returns what went where."""
    rng = np.random.default_rng(seed)
    share = {"media (random)": 0.34, "logs (text)": 0.26, "duplicates": 0.12, "tables (binary)": 0.12,
             "small files": 0.16}
    made = {k: [0, 0] for k in share}

    def put(kind: str, path: str, payload: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(payload)
        made[kind][0] += 1
        made[kind][1] += len(payload)

    budget = {k: int(v * data) for k, v in share.items()}
    i = 0
    while made["media (random)"][1] < budget["media (random)"]:
        n = int(rng.choice([8, 24, 64, 96]) * MiB + rng.integers(0, MiB))
        n = min(n, budget["media (random)"] - made["media (random)"][1] + 4096)
        put("media (random)", f"{root}/home/user/media/clip{i:03d}.mp4", rng.bytes(n))
        i += 1
    i = 0
    while made["logs (text)"][1] < budget["logs (text)"]:
        n = int(rng.choice([1, 4, 16, 32]) * MiB + rng.integers(0, 65536))
        n = min(n, budget["logs (text)"] - made["logs (text)"][1] + 4096)
        put("logs (text)", f"{root}/var/log/app/app.log.{i}", _text(rng, n))
        i += 1
    original = rng.bytes(budget["duplicates"] // 4)  # an installer kept in four places
    for j, where in enumerate(("home/user/Downloads", "opt/vendor/cache", "srv/share/installers", "root")):
        put("duplicates", f"{root}/{where}/setup-{j}.bin", original)
    i = 0
    while made["tables (binary)"][1] < budget["tables (binary)"]:
        n = int(rng.choice([2, 8, 40]) * MiB)
        n = min(n, budget["tables (binary)"] - made["tables (binary)"][1] + 4096)
        put("tables (binary)", f"{root}/var/lib/db/table{i:03d}.dat", _table(rng, n))
        i += 1
    i = 0
    while made["small files"][1] < budget["small files"]:
        n = int(rng.integers(200, 64 << 10))
        payload = _text(rng, n) if i % 3 else rng.bytes(n)
        put("small files", f"{root}/usr/share/pkg{i // 200:03d}/file{i:05d}", payload)
        i += 1
    return {k: {"files": v[0], "bytes": v[1]} for k, v in made.items()}


def make_image(work: str, size: int, data: int) -> tuple[str, dict]:
    image, info = os.path.join(work, "image.raw"), os.path.join(work, "image.json")
    if os.path.exists(image) and os.path.exists(info):
        with open(info) as f:
            described = json.load(f)
        if described.get("size") == size and described.get("data") == data:
            return image, described
    tree = os.path.join(work, "tree")
    shutil.rmtree(tree, ignore_errors=True)
    mix = populate(tree, data)
    if os.path.exists(image):
        os.unlink(image)
    subprocess.run(["mke2fs", "-t", "ext4", "-F", "-q", "-d", tree, image, str(size // 1024) + "k"], check=True)
    shutil.rmtree(tree)
    described = {"size": size, "data": data, "mix": mix,
                 "allocated": os.stat(image).st_blocks * 512}
    with open(info, "w") as f:
        json.dump(described, f)
    return image, described


# -- the VM ---------------------------------------------------------------------------------------

def make_vm(work: str, image: str, size: int):
    shutil.rmtree(os.path.join(work, "host"), ignore_errors=True)
    host = Host.init(os.path.join(work, "host"))
    vm = host.create_vm("bench", [size])
    vm.request_state_change("start")
    disk = vm.disk(0)
    written = 0
    with open(image, "rb") as f:
        for offset in range(0, size, PIECE):
            piece = os.pread(f.fileno(), min(PIECE, size - offset), offset)
            if np.frombuffer(piece, np.uint8).any():
                disk.write(offset, piece)
                written += len(piece)
    disk.flush()
    return vm, written


class Changes:
    """The guest rewrites a share of the disk at random 64 KiB aligned places (the scattered worst
    case for fixed-size chunks); ``undo`` puts the image's bytes back there, so the next round backs
    up the same content."""

    def __init__(self, vm, image: str, size: int, share: float, seed: int):
        self.vm, self.image, self.size, self.share = vm, image, size, share
        self.random = random.Random(seed)
        self.rng = np.random.default_rng(seed)
        self.touched: set[int] = set()

    def apply(self) -> int:
        disk = self.vm.disk(0)
        blocks = self.random.sample(range(self.size // K64), int(self.size * self.share) // K64)
        for block in blocks:
            disk.write(block * K64, self.rng.bytes(K64))
        disk.flush()
        self.touched.update(blocks)
        return len(blocks) * K64

    def undo(self) -> None:
        disk = self.vm.disk(0)
        with open(self.image, "rb") as f:
            for block in sorted(self.touched):
                _restore(disk, block * K64, os.pread(f.fileno(), K64, block * K64))
        disk.flush()
        self.touched.clear()


def _restore(disk, offset: int, data: bytes) -> None:
    """Put ``data`` back; where it is all zeros the guest discards (trims) the range instead, as a
    filesystem does for freed blocks, so the disk does not fill up with written zeros round after round."""
    if np.frombuffer(data, np.uint8).any():
        disk.write(offset, data)
    else:
        disk.trim(offset, len(data))


class FileChanges:
    """File-level changes made once with ``debugfs -w`` on a copy of the image (log files rewritten
    with lines appended, a media file replaced, new small files, one large file deleted): the 4 KiB
    blocks that differ are written through the guest's disk by ``apply`` and the image's bytes put
    back by ``undo``, as a guest's filesystem writes would reach the host."""

    def __init__(self, vm, image: str, size: int, share: float, work: str):
        self.vm = vm
        self.runs: list[tuple[int, bytes, bytes]] = []  # (offset, changed bytes, original bytes)
        changed = os.path.join(work, "changed.raw")
        subprocess.run(["cp", "--sparse=always", image, changed], check=True)
        self._edit(changed, int(size * share), work)
        with open(image, "rb") as a, open(changed, "rb") as b:
            for offset in range(0, size, PIECE):
                old = np.frombuffer(os.pread(a.fileno(), PIECE, offset), np.uint8)
                new = np.frombuffer(os.pread(b.fileno(), PIECE, offset), np.uint8)
                differs = (old.reshape(-1, 4096) != new.reshape(-1, 4096)).any(axis=1)
                blocks = np.flatnonzero(differs)
                if not len(blocks):
                    continue
                # Contiguous runs of changed blocks, as one write each.
                breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
                for run in np.split(blocks, breaks):
                    lo, hi = int(run[0]) * 4096, (int(run[-1]) + 1) * 4096
                    self.runs.append((offset + lo, new[lo:hi].tobytes(), old[lo:hi].tobytes()))
        os.unlink(changed)
        self.bytes = sum(len(r[1]) for r in self.runs)

    @staticmethod
    def _edit(image: str, budget: int, work: str) -> None:
        rng = np.random.default_rng(3)
        staged = os.path.join(work, "edits")
        shutil.rmtree(staged, ignore_errors=True)
        os.makedirs(staged)
        listing = subprocess.run(["debugfs", "-R", "ls -l /var/log/app", image], capture_output=True, text=True,
                                 check=True).stdout
        logs = sorted((int(p[5]), p[-1]) for p in (line.split() for line in listing.splitlines())
                      if len(p) >= 9 and p[-1].startswith("app.log."))
        commands, spent = [], 0
        # two mid-sized logs rewritten with new lines appended (log rotation / append)
        for length, name in [x for x in logs if x[0] < 8 * MiB][:2]:
            new = os.path.join(staged, name)
            with open(new, "wb") as f:
                f.write(_text(rng, length + MiB))
            commands += [f"rm /var/log/app/{name}", f"write {new} /var/log/app/{name}"]
            spent += length + MiB
        # a new media file
        media = int(budget * 0.4)
        with open(os.path.join(staged, "new.mp4"), "wb") as f:
            f.write(rng.bytes(media))
        commands.append(f"write {staged}/new.mp4 /home/user/media/new.mp4")
        spent += media
        # new small files until the budget is spent
        commands.append("mkdir /home/user/docs")
        i = 0
        while spent < budget:
            n = int(rng.integers(2000, 64 << 10))
            path = os.path.join(staged, f"doc{i}")
            with open(path, "wb") as f:
                f.write(_text(rng, n))
            commands.append(f"write {path} /home/user/docs/doc{i:04d}.txt")
            spent += n
            i += 1
        # one large log deleted
        commands.append(f"rm /var/log/app/{logs[-1][1]}")
        script = os.path.join(staged, "commands")
        with open(script, "w") as f:
            f.write("\n".join(commands) + "\n")
        subprocess.run(["debugfs", "-w", "-f", script, image], check=True, capture_output=True)
        shutil.rmtree(staged)

    def _write(self, which: int) -> int:
        disk = self.vm.disk(0)
        for run in self.runs:
            _restore(disk, run[0], run[which])
        disk.flush()
        return self.bytes

    def apply(self) -> int:
        return self._write(1)

    def undo(self) -> int:
        return self._write(2)


# -- timing ---------------------------------------------------------------------------------------

def quiet(settle: float) -> None:
    os.sync()
    time.sleep(settle)


def timed(action, settle: float):
    quiet(settle)
    start = time.perf_counter()
    value = action()
    return time.perf_counter() - start, value


def du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def restic(*args: str) -> None:
    subprocess.run(["restic", "--no-cache", "--quiet", *args], check=True, env=RESTIC_ENV,
                   stdout=subprocess.DEVNULL)


def remove(*paths: str) -> None:
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)


def same_file(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def hv_backup(repo: Repository, vm, *, method: str = "virtdisk", full: bool = False):
    with repo.session() as s:
        return backup_vm(s, vm, method=method, full=full)


def main_round(args, work: str, vm, image: str, size: int, changes: Changes, files: FileChanges, round_no: int,
               log: dict) -> None:
    repos = os.path.join(work, "repos")
    remove(repos)
    os.makedirs(repos)
    plain = Repository.init(os.path.join(repos, "plain"))
    secret = Repository.init(os.path.join(repos, "secret"), passphrase=PASSPHRASE)
    exported = Repository.init(os.path.join(repos, "export"))
    restic_repo = os.path.join(repos, "restic")
    restic("-r", restic_repo, "init", "--repository-version", "2")
    points: dict[str, str] = {}
    image_dir, image_name = os.path.split(image)

    def record(name: str, seconds: float, **extra) -> None:
        log["times"].setdefault(name, []).append(seconds)
        for key, value in extra.items():
            log.setdefault(key, {}).setdefault(name, []).append(value)

    def hv_full(repo: Repository, name: str):
        def run():
            result = hv_backup(repo, vm, full=True)
            assert result.kind == "full", result
            points[name] = result.point_id
            return result
        return run

    def restic_backup():
        # restic stores the path it was given; run from the image's directory so the name is short.
        subprocess.run(["restic", "--no-cache", "--quiet", "-r", restic_repo, "backup", "--compression", "auto",
                        image_name], check=True, env=RESTIC_ENV, cwd=image_dir, stdout=subprocess.DEVNULL)

    # 1. full backups
    order = [("hvbackup full", hv_full(plain, "plain")), ("hvbackup full, encrypted", hv_full(secret, "secret")),
             ("restic backup", restic_backup)]
    if round_no % 2:
        order.reverse()
    for name, run in order:
        seconds, result = timed(run, args.settle)
        extra = {"stored": result.bytes_stored, "read": result.bytes_read} if result is not None else {}
        record(name, seconds, **extra)
    record("repository size: hvbackup", 0, size_on_disk=du(plain.path))
    record("repository size: hvbackup encrypted", 0, size_on_disk=du(secret.path))
    record("repository size: restic", 0, size_on_disk=du(restic_repo))

    # 2. a second full of the unchanged VM, into the unencrypted repository (its newest point again)
    seconds, result = timed(hv_full(plain, "plain"), args.settle)
    record("hvbackup second full, unchanged", seconds, stored=result.bytes_stored, read=result.bytes_read)

    # 3. restores
    out_plain, out_secret = os.path.join(work, "restored-plain.raw"), os.path.join(work, "restored-secret.raw")
    out_restic = os.path.join(work, "restored-restic")

    def restic_restore():
        restic("-r", restic_repo, "restore", "latest", "--target", out_restic)

    def restic_sync():
        subprocess.run(["sync", os.path.join(out_restic, image_name)], check=True)

    order = [("hvbackup restore", lambda: restore_disk(plain, points["plain"], 0, out_plain, format="raw")),
             ("hvbackup restore, encrypted", lambda: restore_disk(secret, points["secret"], 0, out_secret,
                                                                  format="raw")),
             ("restic restore", restic_restore)]
    if round_no % 2:
        order.reverse()
    for name, run in order:
        seconds, _ = timed(run, args.settle)
        if name == "restic restore":
            # restic returns before its output is on stable storage; hvbackup's restore fsyncs.
            start = time.perf_counter()
            restic_sync()
            record("restic restore, then sync FILE", seconds + time.perf_counter() - start)
        record(name, seconds)
    if round_no == 0:
        for path in (out_plain, out_secret, os.path.join(out_restic, image_name)):
            if not same_file(path, image):
                raise SystemExit(f"{path} differs from {image}")
        log["restores_identical"] = True
    remove(out_plain, out_secret, out_restic)

    # 4. incrementals, virtdisk: file-level changes, then scattered 64 KiB writes on top
    log["changed_bytes_files"] = files.apply()
    seconds, result = timed(lambda: hv_backup(plain, vm), args.settle)
    assert result.kind == "incremental", result
    record(INCR_FILES, seconds, stored=result.bytes_stored, read=result.bytes_read)
    log["changed_bytes_scattered"] = changes.apply()
    seconds, result = timed(lambda: hv_backup(plain, vm), args.settle)
    assert result.kind == "incremental", result
    record(INCR_SCATTERED, seconds, stored=result.bytes_stored, read=result.bytes_read)
    changes.undo()

    # 5. export method: full, then an incremental after the file changes are undone
    seconds, result = timed(lambda: hv_backup(exported, vm, method="export", full=True), args.settle)
    record("hvbackup full (export)", seconds, stored=result.bytes_stored, read=result.bytes_read)
    files.undo()
    seconds, result = timed(lambda: hv_backup(exported, vm, method="export"), args.settle)
    assert result.kind == "incremental", result
    host_extra = du(vm.host.directory) - du(vm.host.vms_directory)
    record(INCR_EXPORT, seconds, stored=result.bytes_stored, read=result.bytes_read, host_extra=host_extra)
    remove(repos)


def chunk_round(args, work: str, vm, changes: Changes, files: FileChanges, sizes: list[int], round_no: int,
                log: dict) -> None:
    order = sizes if round_no % 2 == 0 else list(reversed(sizes))
    for chunk in order:
        key = f"{chunk // MiB} MiB"
        entry = log.setdefault(key, {"full": [], "restore": [], "incremental": [], "size_on_disk": [],
                                     "full_stored": [], "incremental_stored": [], "incremental_read": [],
                                     "scattered": [], "scattered_read": []})
        path = os.path.join(work, "repos", f"chunk{chunk}")
        remove(path)
        repo = Repository.init(path, chunk_size=chunk)
        seconds, result = timed(lambda repo=repo: hv_backup(repo, vm, full=True), args.settle)
        entry["full"].append(seconds)
        entry["full_stored"].append(result.bytes_stored)
        entry["size_on_disk"].append(du(path))
        point = result.point_id
        out = os.path.join(work, "restored-chunk.raw")
        seconds, _ = timed(lambda repo=repo, point=point, out=out: restore_disk(repo, point, 0, out, format="raw"),
                            args.settle)
        entry["restore"].append(seconds)
        remove(out)
        files.apply()
        seconds, result = timed(lambda repo=repo: hv_backup(repo, vm), args.settle)
        assert result.kind == "incremental", result
        entry["incremental"].append(seconds)
        entry["incremental_stored"].append(result.bytes_stored)
        entry["incremental_read"].append(result.bytes_read)
        changes.apply()
        seconds, result = timed(lambda repo=repo: hv_backup(repo, vm), args.settle)
        assert result.kind == "incremental", result
        entry["scattered"].append(seconds)
        entry["scattered_read"].append(result.bytes_read)
        changes.undo()
        files.undo()
        remove(path)
        print(f"  chunk {key}: done", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/hvbackup-bench-backup")
    parser.add_argument("--size", default="4G")
    parser.add_argument("--data", default="2300M", help="bytes of files in the filesystem")
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-sizes", default="1,2,4,8", help="MiB; empty to skip the study")
    parser.add_argument("--chunk-rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each case")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size, data = parse_size(args.size), parse_size(args.data)
    os.makedirs(args.dir, exist_ok=True)
    started = time.perf_counter()
    image, described = make_image(args.dir, size, data)
    print(f"image ready ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    vm, written = make_vm(args.dir, image, size)
    print(f"VM ready, {written / MiB:.0f} MiB written ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    changes = Changes(vm, image, size, args.changed, seed=2)
    files = FileChanges(vm, image, size, args.changed, args.dir)
    print(f"file changes ready: {files.bytes / MiB:.1f} MiB in {len(files.runs)} runs "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    log: dict = {"times": {}}
    for round_no in range(args.rounds):
        main_round(args, args.dir, vm, image, size, changes, files, round_no, log)
        print(f"round {round_no + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    chunk_sizes = [int(x) * MiB for x in args.chunk_sizes.split(",") if x]
    study: dict = {}
    for round_no in range(args.chunk_rounds if chunk_sizes else 0):
        chunk_round(args, args.dir, vm, changes, files, chunk_sizes, round_no, study)
        print(f"chunk round {round_no + 1}/{args.chunk_rounds} done ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr)

    times = {k: v for k, v in log["times"].items() if not k.startswith("repository size")}
    med = {name: statistics.median(runs) for name, runs in times.items()}
    sizes_on_disk = {k.removeprefix("repository size: "): statistics.median(v)
                     for k, v in log.get("size_on_disk", {}).items()}
    stored = {k: statistics.median(v) for k, v in log.get("stored", {}).items()}
    ratios = {
        "full: hvbackup / restic": med["hvbackup full"] / med["restic backup"],
        "full, encrypted: hvbackup / restic": med["hvbackup full, encrypted"] / med["restic backup"],
        "restore: hvbackup / restic (as it returns)": med["hvbackup restore"] / med["restic restore"],
        "restore: hvbackup / restic then sync": med["hvbackup restore"] / med["restic restore, then sync FILE"],
        "restore, encrypted: hvbackup / restic then sync":
            med["hvbackup restore, encrypted"] / med["restic restore, then sync FILE"],
        "incremental / full (virtdisk), file changes": med[INCR_FILES] / med["hvbackup full"],
        "incremental / full (virtdisk), scattered 64 KiB writes": med[INCR_SCATTERED] / med["hvbackup full"],
        "incremental / full (export), file changes": med[INCR_EXPORT] / med["hvbackup full (export)"],
    }
    study_medians = {k: {m: statistics.median(v) for m, v in e.items()} for k, e in study.items()}
    report = {"size": size, "image": described, "written_to_vm": written, "rounds": args.rounds,
              "settle": args.settle, "changed_bytes_files": log.get("changed_bytes_files"),
              "file_change_runs": len(files.runs), "changed_bytes_scattered": log.get("changed_bytes_scattered"),
              "times": times, "medians": med,
              "stored": log.get("stored"), "read": log.get("read"), "repository_size": sizes_on_disk,
              "ratios": ratios, "restores_identical": log.get("restores_identical", False),
              "second_full_stored_max": max(log["stored"]["hvbackup second full, unchanged"]),
              "host_bytes_beyond_vms_after_export": max(log["host_extra"][INCR_EXPORT]),
              "chunk_study": study, "chunk_study_medians": study_medians,
              "default_chunk_size": DEFAULT_CHUNK_SIZE, "seconds_total": time.perf_counter() - started}
    with open(os.path.join(args.dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    mix = ", ".join(f"{k} {v['files']} files {v['bytes'] / MiB:.0f} MiB" for k, v in described["mix"].items())
    print(f"\n{args.size} ext4 image ({described['allocated'] / MiB:.0f} MiB allocated; {mix}); "
          f"{files.bytes / MiB:.1f} MiB changed by files in {len(files.runs)} runs, "
          f"{log.get('changed_bytes_scattered', 0) / MiB:.0f} MiB scattered; medians of {args.rounds} rounds\n")
    print("| case | median (s) | runs (s) | new data stored (MiB) |\n|---|---|---|---|")
    for name, runs in times.items():
        st = f"{stored[name] / MiB:.2f}" if name in stored else "—"
        print(f"| {name} | {med[name]:.2f} | {' '.join(f'{r:.2f}' for r in runs)} | {st} |")
    read = {k: statistics.median(v) for k, v in log.get("read", {}).items()}
    print("\n| case | read (MiB, median) |\n|---|---|")
    for name, value in read.items():
        print(f"| {name} | {value / MiB:.0f} |")
    print("\n| repository | size on disk (MiB) |\n|---|---|")
    for name, value in sizes_on_disk.items():
        print(f"| {name} | {value / MiB:.0f} |")
    print("\n| ratio | value |\n|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3f} |")
    print(f"\nsecond full of the unchanged VM stored at most {report['second_full_stored_max']} bytes (target < 1 MiB)")
    print(f"after an export backup the host held {report['host_bytes_beyond_vms_after_export']} bytes beyond its "
          "VMs (host.json: no copy of the disks is kept)")
    if study_medians:
        print("\n| chunk size | full (s) | restore (s) | incr., files (s) | / full | read (MiB) | "
              "incr., scattered (s) | / full | read (MiB) | repository (MiB) |\n" + "|---" * 10 + "|")
        for key, m in study_medians.items():
            print(f"| {key} | {m['full']:.2f} | {m['restore']:.2f} | {m['incremental']:.3f} | "
                  f"{m['incremental'] / m['full']:.1%} | {m['incremental_read'] / MiB:.0f} | "
                  f"{m['scattered']:.2f} | "
                  f"{m['scattered'] / m['full']:.1%} | {m['scattered_read'] / MiB:.0f} | "
                  f"{m['size_on_disk'] / MiB:.0f} |")


if __name__ == "__main__":
    main()
