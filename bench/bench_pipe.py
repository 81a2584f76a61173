"""Backup pipe speed (issue 12): a full backup and a restore against ``cp`` + ``sync`` and restic, in one run.

    python bench/bench_pipe.py [--dir DIR] [--size 2G] [--data 1200M] [--images random,text,ext4]
                               [--rounds 6] [--settle 2] [--cli] [--baseline SRC] [--profile] [--stages]
                               [--encrypted-stages] [--json]

Images (each a raw file, and a VM whose one dynamic VHDX holds the same bytes, written through the
host's guest I/O in 32 MiB pieces, all-zero pieces skipped):

  random   SIZE disk holding DATA of incompressible bytes (numpy's generator) in 4 MiB runs spread
           over the disk (seeded), zeros elsewhere: what zstd cannot shrink
  text     the same layout holding log-like text (compresses about 4x): the compressible variant
  ext4     the 4 GiB ext4 image of ``bench/bench_backup.py`` (its mixed data set; built there, or
           here on first use into ``--ext4-dir``)

Per image, round after round, in alternating order, each case after an ``os.sync()`` and SETTLE
seconds of quiet:

  hvbackup full          ``backup_vm(full=True)`` in this process into a fresh repository (virtdisk)
  hvbackup full (CLI)    with ``--cli``: ``hvbackup backup VM --full`` as a command, start-up included
  restic backup          ``restic --no-cache backup --compression auto IMAGE`` into a fresh repository
                         (format 2, zstd at about level 3; ``init`` not timed)
  cp + sync, stored      ``cp`` of a file holding the bytes hvbackup stores (the chunk files of a
                         warm-up backup, concatenated) to a new file on the same file system, then
                         ``sync FILE``: what writing those bytes durably costs
  hvbackup restore       ``restore_disk(..., format="raw")``: returns with the file on stable storage
  cp + sync, disk        ``cp IMAGE`` (sparse-aware, as restore writes only stored chunks) + ``sync FILE``
  … baseline code        with ``--baseline SRC``: the same full backup and restore by the hvbackup
                         package under SRC, in a child process, timed inside it (start-up not counted)

Round 1 checks the restored file against the image byte for byte. ``--profile`` runs one more full
backup under cProfile (every thread) and prints the top functions; ``--stages`` one more with the
pipe's stages wrapped and timed (read, zero test, hash, compress, encrypt, frame, write, fsync,
rename), summed over threads. Ratios are of medians measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_backup import _text, make_image  # noqa: E402  (the ext4 data set and the text generator)

from hvbackup.backup.engine import backup_vm  # noqa: E402
from hvbackup.backup.repository import Repository  # noqa: E402
from hvbackup.backup.restore import restore_disk  # noqa: E402
from hvbackup.host import Host  # noqa: E402
from hvbackup.units import MiB  # noqa: E402

RUN = 4 * MiB
PIECE = 32 * MiB
PASSPHRASE = "bench-passphrase"
RESTIC_ENV = {**os.environ, "RESTIC_PASSWORD": PASSPHRASE}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


# -- images and VMs -------------------------------------------------------------------------------

def make_spread_image(path: str, size: int, data: int, kind: str, seed: int = 7) -> dict:
    """A sparse raw image of ``size`` holding ``data`` bytes in 4 MiB runs at seeded places."""
    info = path + ".json"
    if os.path.exists(path) and os.path.exists(info):
        with open(info) as f:
            described = json.load(f)
        if described.get("size") == size and described.get("data") == data and described.get("kind") == kind:
            return described
    rng = np.random.default_rng(seed)
    runs = sorted(rng.choice(size // RUN, data // RUN, replace=False).tolist())
    with open(path, "wb") as f:
        f.truncate(size)
        for run in runs:
            payload = rng.bytes(RUN) if kind == "random" else _text(rng, RUN)
            os.pwrite(f.fileno(), payload, run * RUN)
        os.fsync(f.fileno())
    described = {"size": size, "data": len(runs) * RUN, "kind": kind, "runs": len(runs)}
    with open(info, "w") as f:
        json.dump(described, f)
    return described


def make_vm(work: str, name: str, image: str, size: int):
    """A host of its own per image, the VM's disk written with the image's non-zero 32 MiB pieces."""
    root = os.path.join(work, f"host-{name}")
    shutil.rmtree(root, ignore_errors=True)
    host = Host.init(root)
    vm = host.create_vm(name, [size])
    vm.request_state_change("start")
    disk = vm.disk(0)
    with open(image, "rb") as f:
        for offset in range(0, size, PIECE):
            piece = os.pread(f.fileno(), min(PIECE, size - offset), offset)
            if np.frombuffer(piece, np.uint8).any():
                disk.write(offset, piece)
    disk.flush()
    return host, vm


# -- timing ---------------------------------------------------------------------------------------

def quiet(settle: float) -> None:
    os.sync()
    time.sleep(settle)


def remove(*paths: str) -> None:
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def hv_full(repo: Repository, vm):
    with repo.session() as s:
        result = backup_vm(s, vm, full=True)
    assert result.kind == "full", result
    return result


BASELINE = """
import json, sys, time
from hvbackup.backup.engine import backup_vm
from hvbackup.backup.repository import Repository
from hvbackup.backup.restore import restore_disk
from hvbackup.host import Host
what, host_dir, vm_name, repo_path = sys.argv[1:5]
if what == "backup":
    repo = Repository.init(repo_path)
    vm = Host.open(host_dir).vm(vm_name)
    start = time.perf_counter()
    with repo.session() as s:
        result = backup_vm(s, vm, full=True)
    seconds = time.perf_counter() - start
else:
    repo = Repository.open(repo_path)
    point = repo.point_ids()[-1]
    start = time.perf_counter()
    restore_disk(repo, point, 0, sys.argv[5], format="raw")
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds}))
"""


def baseline(src: str, *args: str) -> float:
    """Time a backup or restore with another tree's code (``--baseline``), measured inside that
    process (its start-up and imports not counted), so old and new code run side by side."""
    done = subprocess.run([sys.executable, "-c", BASELINE, *args], check=True, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": src})
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def cp_sync(src: str, dst: str) -> None:
    subprocess.run(["cp", src, dst], check=True)
    subprocess.run(["sync", dst], check=True)


class Image:
    def __init__(self, args, name: str):
        self.name = name
        work = args.dir
        if name == "ext4":
            ext4_dir = args.ext4_dir
            os.makedirs(ext4_dir, exist_ok=True)
            self.path, described = make_image(ext4_dir, 4 << 30, parse_size("2300M"))
            self.size = described["size"]
        else:
            self.path = os.path.join(work, f"{name}.raw")
            self.size = parse_size(args.size)
            make_spread_image(self.path, self.size, parse_size(args.data), name)
        self.data = os.stat(self.path).st_blocks * 512
        self.host, self.vm = make_vm(work, name, self.path, self.size)
        self.host_dir = self.host.directory
        # A warm-up backup: primes the caches the timed runs find warm, and gives the stored bytes.
        repo_path = os.path.join(work, "repos", f"{name}-warm")
        remove(repo_path)
        repo = Repository.init(repo_path)
        self.warm = hv_full(repo, self.vm)
        self.stored = os.path.join(work, f"{name}.stored")
        with open(self.stored, "wb") as out:
            for root, _, files in os.walk(os.path.join(repo_path, "chunks")):
                for file in sorted(files):
                    with open(os.path.join(root, file), "rb") as f:
                        shutil.copyfileobj(f, out, 16 * MiB)
        self.stored_bytes = os.path.getsize(self.stored)
        remove(repo_path)


def run_round(args, image: Image, round_no: int, log: dict) -> None:
    work = os.path.join(args.dir, "run")
    remove(work)
    os.makedirs(work)
    times = log.setdefault(image.name, {})
    repo = Repository.init(os.path.join(work, "hv"))
    cli_repo = Repository.init(os.path.join(work, "hv-cli")) if args.cli else None
    restic_repo = os.path.join(work, "restic")
    subprocess.run(["restic", "--no-cache", "--quiet", "-r", restic_repo, "init", "--repository-version", "2"],
                   check=True, env=RESTIC_ENV, stdout=subprocess.DEVNULL)
    point = {}
    image_dir, image_name = os.path.split(image.path)

    def full():
        point["id"] = hv_full(repo, image.vm).point_id

    def cli_full():
        env = {**os.environ, "HVBACKUP_HOST": image.host_dir, "HVBACKUP_REPO": cli_repo.path}
        subprocess.run(["hvbackup", "backup", image.vm.name, "--full", "--json"], check=True, env=env,
                       stdout=subprocess.DEVNULL)

    def restic_backup():
        subprocess.run(["restic", "--no-cache", "--quiet", "-r", restic_repo, "backup", "--compression", "auto",
                        image_name], check=True, env=RESTIC_ENV, cwd=image_dir, stdout=subprocess.DEVNULL)

    def cp_stored():
        cp_sync(image.stored, os.path.join(work, "stored.copy"))

    def restore():
        restore_disk(repo, point["id"], 0, os.path.join(work, "restored.raw"), format="raw")

    def cp_disk():
        cp_sync(image.path, os.path.join(work, "disk.copy"))

    # (case, action, what it leaves that no later case needs: removed, untimed, right after it, so
    # every case writes into a file system that holds about the same; see "position" in the report)
    backups = [("hvbackup full", full, []), ("restic backup", restic_backup, [restic_repo]),
               ("cp + sync, stored bytes", cp_stored, [os.path.join(work, "stored.copy")])]
    if args.cli:
        backups.insert(1, ("hvbackup full (CLI)", cli_full, [cli_repo.path]))
    restores = [("hvbackup restore", restore, [os.path.join(work, "restored.raw")]),
                ("cp + sync, disk", cp_disk, [os.path.join(work, "disk.copy")])]
    if args.baseline:
        base_repo = os.path.join(work, "hv-baseline")
        backups.insert(1, ("hvbackup full, baseline code", lambda: baseline(
            args.baseline, "backup", image.host_dir, image.vm.name, base_repo), []))
        restores.insert(1, ("hvbackup restore, baseline code", lambda: baseline(
            args.baseline, "restore", image.host_dir, image.vm.name, base_repo,
            os.path.join(work, "restored-baseline.raw")), [os.path.join(work, "restored-baseline.raw")]))
    for group in (backups, restores):
        order = group if round_no % 2 == 0 else list(reversed(group))
        for name, action, leftovers in order:
            quiet(args.settle)
            load = os.getloadavg()[0]
            start = time.perf_counter()
            inside = action()
            seconds = inside if isinstance(inside, float) else time.perf_counter() - start
            times.setdefault(name, []).append(seconds)
            log.setdefault("load", []).append(load)
            for path in leftovers:
                if round_no == 0 and os.path.basename(path).startswith("restored"):
                    if subprocess.run(["cmp", "-s", image.path, path]).returncode:
                        raise SystemExit(f"{path} of {image.name} differs from its image")
                remove(path)
    remove(work)


# -- profiles ------------------------------------------------------------------------------------

def profile_backup(args, image: Image) -> str:
    """cProfile of one full backup, every thread (a profiler per thread, merged)."""
    repo_path = os.path.join(args.dir, "repos", "profile")
    remove(repo_path)
    repo = Repository.init(repo_path)
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_thread_profile(*_):
        sys.setprofile(None)
        p = cProfile.Profile()
        with lock:
            profiles.append(p)
        p.enable()

    main = cProfile.Profile()
    quiet(args.settle)
    threading.setprofile(start_thread_profile)
    start = time.perf_counter()
    main.enable()
    try:
        hv_full(repo, image.vm)
    finally:
        main.disable()
        threading.setprofile(None)
    wall = time.perf_counter() - start
    out = io.StringIO()
    stats = pstats.Stats(main, stream=out)
    for p in profiles:
        with contextlib.suppress(TypeError):
            stats.add(p)
    stats.sort_stats("tottime").print_stats(25)
    remove(repo_path)
    return f"cProfile of one full backup of {image.name} ({wall:.2f} s wall with the profiler on):\n" + out.getvalue()


class StageClock:
    """Wraps the pipe's stage functions and sums their time over threads."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._undo: list = []

    def wrap(self, owner, attribute: str, stage: str, size_arg: int | None = None) -> None:
        original = getattr(owner, attribute, None) if owner is not None else None
        if original is None:
            return
        clock = self

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                spent = time.perf_counter() - start
                with clock._lock:
                    clock.seconds[stage] += spent
                    clock.calls[stage] += 1
                    if size_arg is not None and len(a) > size_arg:
                        with contextlib.suppress(TypeError):
                            clock.bytes[stage] += len(a[size_arg])

        setattr(owner, attribute, timed)
        self._undo.append((owner, attribute, original))

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._undo):
            setattr(owner, attribute, original)


def stage_backup(args, image: Image, encrypted: bool = False) -> str:
    from hvbackup.backup import chunks, crypto, envelope, sources, writer

    repo_path = os.path.join(args.dir, "repos", "stages")
    remove(repo_path)
    repo = Repository.init(repo_path, passphrase=PASSPHRASE if encrypted else None)
    clock = StageClock()
    clock.wrap(sources._VirtDiskReader, "read", "read (virtdisk)")
    clock.wrap(writer, "all_zero", "zero test", 0)
    clock.wrap(writer.np, "frombuffer", "zero test (frombuffer)")
    clock.wrap(chunks, "chunk_name", "hash (BLAKE3)", 0)
    clock.wrap(crypto, "chunk_name", "hash (BLAKE3)", 0)
    clock.wrap(chunks, "compress", "compress (zstd)", 0)
    clock.wrap(chunks, "worth_compressing", "compressibility check", 0)
    clock.wrap(crypto.Keys, "seal", "encrypt (AES-GCM)", 1)
    clock.wrap(crypto.Keys, "seal_parts", "encrypt (AES-GCM)", 1)
    clock.wrap(chunks.ChunkCodec, "encode", "(encode: compress + encrypt + frame)", 2)
    clock.wrap(writer.Session, "store", "(store: dedup check + encode + write + fsync + rename)", 2)
    clock.wrap(envelope, "write_durable", "(write_durable: open + write + fsync + close + rename)", 3)
    clock.wrap(envelope, "frame", "frame + checksum")
    clock.wrap(envelope, "frame_parts", "frame + checksum")
    clock.wrap(envelope, "looks_complete", "dedup check (open + pread)")
    clock.wrap(envelope, "write_temporary", "(write_temporary: open + writev)")
    clock.wrap(getattr(envelope, "Staged", None), "finish", "(sync thread: fsync + close + rename)")
    clock.wrap(os, "write", "write", 1)
    clock.wrap(os, "writev", "write")
    clock.wrap(os, "fsync", "fsync")
    clock.wrap(os, "fdatasync", "fsync")
    clock.wrap(os, "rename", "rename")
    clock.wrap(os, "open", "open")
    clock.wrap(os, "close", "close")
    quiet(args.settle)
    start = time.perf_counter()
    cpu = time.process_time()
    try:
        result = hv_full(repo, image.vm)
    finally:
        clock.restore()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    remove(repo_path)
    lines = [f"stages of one full backup of {image.name}{' (encrypted)' if encrypted else ''}: {wall:.2f} s wall, "
             f"{cpu:.2f} s CPU (user + system, all threads); {result.bytes_read / MiB:.0f} MiB put, "
             f"{result.bytes_stored / MiB:.0f} MiB stored; load {loadavg()}",
             "| stage | calls | seconds (summed over threads) | MiB/s |", "|---|---|---|---|"]
    for stage, seconds in sorted(clock.seconds.items(), key=lambda kv: -kv[1]):
        rate = f"{clock.bytes[stage] / MiB / seconds:,.0f}" if clock.bytes.get(stage) and seconds else ""
        lines.append(f"| {stage} | {clock.calls[stage]} | {seconds:.3f} | {rate} |")
    return "\n".join(lines)


def sweep(args, image: Image) -> str:
    """Full backups with other thread counts (engine workers × session sync threads), alternating."""
    from hvbackup.backup import engine, writer

    combos = [tuple(int(x) for x in combo.split("x")) for combo in args.sweep.split(",")]
    saved = engine.WORKERS, writer.SYNC_THREADS
    runs: dict[tuple, list[float]] = {c: [] for c in combos}
    try:
        for round_no in range(args.rounds):
            for combo in combos if round_no % 2 == 0 else list(reversed(combos)):
                engine.WORKERS, writer.SYNC_THREADS = combo
                repo_path = os.path.join(args.dir, "repos", "sweep")
                remove(repo_path)
                repo = Repository.init(repo_path)
                quiet(args.settle)
                start = time.perf_counter()
                hv_full(repo, image.vm)
                runs[combo].append(time.perf_counter() - start)
                remove(repo_path)
    finally:
        engine.WORKERS, writer.SYNC_THREADS = saved
    lines = [f"thread counts, full backup of {image.name} (load {loadavg()}; default {saved[0]}x{saved[1]})",
             "| workers × sync threads | median (s) | runs (s) |", "|---|---|---|"]
    for combo, times in runs.items():
        lines.append(f"| {combo[0]} × {combo[1]} | {statistics.median(times):.2f} | "
                     f"{' '.join(f'{t:.2f}' for t in times)} |")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/hvbackup-bench-pipe")
    parser.add_argument("--ext4-dir", default="/tmp/hvbackup-bench-backup", help="where bench_backup keeps its image")
    parser.add_argument("--size", default="2G")
    parser.add_argument("--data", default="1200M")
    parser.add_argument("--images", default="random", help="comma-separated: random, text, ext4")
    parser.add_argument("--rounds", type=int, default=6, help="an even number balances the alternating order")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--cli", action="store_true", help="also time the hvbackup command")
    parser.add_argument("--profile", action="store_true", help="cProfile one full backup per image")
    parser.add_argument("--stages", action="store_true", help="time the pipe's stages in one full backup")
    parser.add_argument("--encrypted-stages", action="store_true", help="also time the stages encrypted")
    parser.add_argument("--baseline", metavar="SRC", help="also time backup and restore with the hvbackup "
                        "package under SRC (another checkout's src/, e.g. the last commit's), side by side")
    parser.add_argument("--sweep", metavar="WxS,...", help="only time full backups with W engine workers and "
                        "S sync threads, e.g. 2x4,3x4,4x4,3x8 (ROUNDS rounds, alternating)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_start": loadavg(),
                    "args": vars(args), "images": {}}
    for name in [x for x in args.images.split(",") if x]:
        image = Image(args, name)
        print(f"{name}: image and VM ready, {image.data / MiB:.0f} MiB of data, {image.stored_bytes / MiB:.0f} MiB "
              f"stored ({time.perf_counter() - started:.0f} s; load {loadavg()})", file=sys.stderr)
        if args.sweep:
            print(sweep(args, image))
            shutil.rmtree(image.host_dir, ignore_errors=True)
            continue
        log: dict = {}
        for round_no in range(args.rounds):
            run_round(args, image, round_no, log)
            print(f"  round {round_no + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s; "
                  f"load {loadavg()})", file=sys.stderr)
        times = log[name]
        med = {case: statistics.median(runs) for case, runs in times.items()}
        ratios = {
            "full / (cp + sync of the stored bytes)": med["hvbackup full"] / med["cp + sync, stored bytes"],
            "full / restic backup": med["hvbackup full"] / med["restic backup"],
            "restore / (cp + sync of the disk)": med["hvbackup restore"] / med["cp + sync, disk"],
        }
        if args.cli:
            ratios["full (CLI) / restic backup"] = med["hvbackup full (CLI)"] / med["restic backup"]

        def per_round(a: str, b: str, times: dict = times) -> float:
            """The median over rounds of the ratio within a round."""
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        ratios["per round: full / (cp + sync of the stored bytes)"] = per_round("hvbackup full",
                                                                              "cp + sync, stored bytes")
        ratios["per round: full / restic backup"] = per_round("hvbackup full", "restic backup")
        ratios["per round: restore / (cp + sync of the disk)"] = per_round("hvbackup restore", "cp + sync, disk")
        if args.baseline:
            ratios["per round: full, this code / baseline code"] = per_round("hvbackup full",
                                                                            "hvbackup full, baseline code")
            ratios["full: this code / baseline code"] = med["hvbackup full"] / med["hvbackup full, baseline code"]
            ratios["full, baseline code / restic backup"] = (med["hvbackup full, baseline code"]
                                                             / med["restic backup"])
            ratios["full, baseline code / (cp + sync of the stored bytes)"] = (
                med["hvbackup full, baseline code"] / med["cp + sync, stored bytes"])
            ratios["restore: this code / baseline code"] = (med["hvbackup restore"]
                                                            / med["hvbackup restore, baseline code"])
        entry = {"size": image.size, "data": image.data, "stored": image.stored_bytes, "times": times,
                 "medians": med, "ratios": ratios, "load": [min(log["load"]), max(log["load"])],
                 "profile": profile_backup(args, image) if args.profile else None,
                 "stages": stage_backup(args, image) if args.stages else None,
                 "stages_encrypted": stage_backup(args, image, True) if args.encrypted_stages else None}
        report["images"][name] = entry
        shutil.rmtree(image.host_dir, ignore_errors=True)
        remove(image.stored)
    report["load_end"] = loadavg()
    report["seconds"] = time.perf_counter() - started
    with open(os.path.join(args.dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"\n{report['started']}, load average at start {report['load_start']}, at end {report['load_end']}; "
          f"{args.rounds} rounds, settle {args.settle} s")
    for name, entry in report["images"].items():
        print(f"\n{name}: {entry['size'] / MiB:.0f} MiB disk, {entry['data'] / MiB:.0f} MiB of data, "
              f"{entry['stored'] / MiB:.0f} MiB stored by hvbackup; 1-min load at case start "
              f"{entry['load'][0]:.2f}–{entry['load'][1]:.2f}\n")
        print("| case | median (s) | runs (s) |\n|---|---|---|")
        for case, runs in entry["times"].items():
            print(f"| {case} | {entry['medians'][case]:.2f} | {' '.join(f'{r:.2f}' for r in runs)} |")
        print("\n| ratio | value |\n|---|---|")
        for ratio, value in entry["ratios"].items():
            print(f"| {ratio} | {value:.2f} |")
        for key in ("stages", "stages_encrypted", "profile"):
            if entry[key]:
                print("\n" + entry[key])


if __name__ == "__main__":
    main()
