"""Disk engine speed, hvbackup and qemu-img side by side in one run.

    python bench/bench_disks.py [--dir DIR] [--size 4G] [--rounds 5] [--writes 100000]

Each round runs the hvbackup and the qemu-img command of every case back to back, in alternating
order, so the machine's noise hits both, after a ``sync`` so no run inherits another's dirty
pages; the report gives per-case medians and the time ratio hvbackup / peer (below 1.0: hvbackup
is faster). All runs are durable where the peer offers it:
qemu-img gets ``-t writeback`` (it flushes at the end, as hvbackup does). Its default
``-t unsafe`` never flushes; it is shown twice: as it returns, and followed by ``sync`` (the time
until its output is on stable storage, which is when hvbackup returns).

Cases (the figures docs/benchmarks.md records):
  raw -> VHDX     a SIZE raw image, half random data and half zeros in 16 MiB runs, to dynamic VHDX
  VHDX -> raw     that VHDX back to a raw image
  read VHDX       every byte of the VHDX, sequentially (qemu-img convert into its null driver)
  4K writes       random 4 KiB writes into a fully allocated dynamic VHDX, against the same writes
                  to a raw file (os.pwrite), in writes per second
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

from hvbackup.units import MiB

RUN = 16 * MiB
UNSAFE = "qemu-img -t unsafe (no flush)"
UNSAFE_SYNC = "qemu-img -t unsafe, then sync"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def make_source(path: str, size: int) -> None:
    """Half random data, half zeros (written, not holes), in 16 MiB runs in a shuffled order."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    runs = [True] * (size // RUN // 2) + [False] * (size // RUN - size // RUN // 2)
    random.Random(1).shuffle(runs)
    rng = np.random.default_rng(1)
    zeros = bytes(RUN)
    with open(path + ".tmp", "wb") as f:
        for data in runs:
            f.write(rng.bytes(RUN) if data else zeros)
    os.rename(path + ".tmp", path)


def timed(command: list[str], *, then_sync: bool = False) -> float:
    os.sync()  # no run inherits another's dirty pages (qemu's unsafe mode leaves gigabytes)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    if then_sync:
        os.sync()
    return time.perf_counter() - start


def remove(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)


READ_LOOP = """
import sys
from hvbackup import disks
with disks.open(sys.argv[1], read_only=True) as d:
    buf = memoryview(bytearray(4 << 20))
    for offset in range(0, d.size, len(buf)):
        n = min(len(buf), d.size - offset)
        d.readinto(offset, buf[:n])
"""


def convert_cases(work: str, size: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    src = os.path.join(work, "source.raw")
    make_source(src, size)
    ours_vhdx, peer_vhdx = os.path.join(work, "h.vhdx"), os.path.join(work, "q.vhdx")
    ours_raw, peer_raw = os.path.join(work, "h.raw"), os.path.join(work, "q.raw")
    reference = os.path.join(work, "reference.vhdx")
    remove(reference)
    hv = [sys.executable, "-m", "hvbackup", "disk", "convert"]  # not through a shim such as pyenv's
    subprocess.run(hv + [src, reference], check=True, stdout=subprocess.DEVNULL)
    qemu = ["qemu-img", "convert", "-t", "writeback"]
    cases = {
        "raw -> VHDX": {
            "hvbackup": lambda: timed(hv + [src, ours_vhdx]),
            "qemu-img": lambda: timed(qemu + ["-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", src, peer_vhdx]),
            UNSAFE: lambda: timed(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic",
                                   src, peer_vhdx]),
            UNSAFE_SYNC: lambda: timed(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic",
                                        src, peer_vhdx], then_sync=True),
        },
        "VHDX -> raw": {
            "hvbackup": lambda: timed(hv + [reference, ours_raw]),
            "qemu-img": lambda: timed(qemu + ["-f", "vhdx", "-O", "raw", reference, peer_raw]),
            UNSAFE: lambda: timed(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", reference, peer_raw]),
            UNSAFE_SYNC: lambda: timed(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", reference, peer_raw],
                                       then_sync=True),
        },
        "read VHDX": {
            "hvbackup": lambda: timed([sys.executable, "-c", READ_LOOP, reference]),
            "qemu-img": lambda: timed(["qemu-img", "convert", "-n", "-f", "vhdx", reference,
                                       "--target-image-opts", f"driver=null-co,size={size}"]),
        },
    }
    results: dict[str, dict[str, list[float]]] = {name: {tool: [] for tool in tools} for name, tools in cases.items()}
    for round_no in range(rounds):
        for name, tools in cases.items():
            order = list(tools.items())
            if round_no % 2:
                order.reverse()
            for tool, run in order:
                remove(ours_vhdx, peer_vhdx, ours_raw, peer_raw)
                results[name][tool].append(run())
        print(f"round {round_no + 1}/{rounds} done", file=sys.stderr)
    remove(ours_vhdx, peer_vhdx, ours_raw, peer_raw)
    return results


def random_writes(work: str, writes: int, rounds: int) -> dict[str, list[float]]:
    """Writes per second: hvbackup into a fully allocated dynamic VHDX, and os.pwrite to a raw file."""
    from hvbackup import disks

    size = 1 << 30
    vhdx, raw = os.path.join(work, "writes.vhdx"), os.path.join(work, "writes.raw")
    remove(vhdx, raw)
    fill = bytes([1]) * (32 * MiB)
    with disks.create(vhdx, size) as disk:
        for offset in range(0, size, len(fill)):
            disk.write(offset, fill)
    with open(raw, "wb") as f:
        for _ in range(size // len(fill)):
            f.write(fill)
    rng = random.Random(7)
    payload = os.urandom(4096)
    rates: dict[str, list[float]] = {"hvbackup VHDX": [], "raw file (os.pwrite)": []}
    for _ in range(rounds):
        offsets = [rng.randrange(size // 4096) * 4096 for _ in range(writes)]
        with disks.open(vhdx) as disk:
            start = time.perf_counter()
            for offset in offsets:
                disk.write(offset, payload)
            rates["hvbackup VHDX"].append(writes / (time.perf_counter() - start))
        fd = os.open(raw, os.O_RDWR)
        try:
            start = time.perf_counter()
            for offset in offsets:
                os.pwrite(fd, payload, offset)
            rates["raw file (os.pwrite)"].append(writes / (time.perf_counter() - start))
        finally:
            os.close(fd)
    remove(vhdx, raw)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/hvbackup-bench")
    parser.add_argument("--size", default="4G")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--writes", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not shutil.which("qemu-img"):
        sys.exit("qemu-img is not installed (apt-get install qemu-utils)")
    os.makedirs(args.dir, exist_ok=True)
    version = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    times = convert_cases(args.dir, parse_size(args.size), args.rounds)
    rates = random_writes(args.dir, args.writes, args.rounds)
    report = {"peer": version, "size": args.size, "rounds": args.rounds, "times": times, "write_rates": rates}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"peer: {version}; {args.size} image; medians of {args.rounds} alternating rounds\n")
    peers = ["qemu-img", UNSAFE_SYNC, UNSAFE]
    print("| case | hvbackup (s) | " + " | ".join(f"{p} (s) | ratio" for p in peers) + " |")
    print("|---" * (1 + 2 * len(peers)) + "|---|")
    for name, tools in times.items():
        ours = statistics.median(tools["hvbackup"])
        cells = [f"{statistics.median(tools[p]):.2f} | {ours / statistics.median(tools[p]):.2f}" if p in tools
                 else "— | —" for p in peers]
        print(f"| {name} | {ours:.2f} | " + " | ".join(cells) + " |")
    ours, raw = statistics.median(rates["hvbackup VHDX"]), statistics.median(rates["raw file (os.pwrite)"])
    print(f"\n4 KiB random writes: hvbackup VHDX {ours:,.0f}/s, raw file {raw:,.0f}/s, "
          f"{ours / raw:.0%} of the raw rate")


if __name__ == "__main__":
    main()
