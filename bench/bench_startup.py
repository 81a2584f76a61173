"""Start-up cost: what every small command pays before it does anything, against qemu-img and restic.

    python bench/bench_startup.py [--runs 21] [--json]

Each command runs RUNS times, alternating with the others, and the median wall time is printed. The
``hvbackup`` measured is the console script pip installed beside this interpreter (not a version
manager's shim, which adds its own start-up). The disk is a 10 GiB dynamic VHDX with 1 MiB written,
made by qemu-img.

Bounds from the issue: ``hvbackup --version`` ≤ 0.15 s, ``hvbackup disk info`` ≤ 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BOUNDS = {"hvbackup --version": 0.15, "hvbackup disk info": 0.3}


def commands(disk: str) -> dict[str, list[str]]:
    hvbackup = os.path.join(os.path.dirname(sys.executable), "hvbackup")
    found = {
        "hvbackup --version": [hvbackup, "--version"],
        "hvbackup --help": [hvbackup, "--help"],
        "hvbackup disk info": [hvbackup, "disk", "info", disk],
        "hvbackup disk info --json": [hvbackup, "disk", "info", disk, "--json"],
        "qemu-img --version": ["qemu-img", "--version"],
        "qemu-img info": ["qemu-img", "info", disk],
        "restic version": ["restic", "version"],
    }
    return {name: args for name, args in found.items() if shutil.which(args[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as work:
        disk = os.path.join(work, "disk.vhdx")
        subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", disk, "10G"], check=True)
        subprocess.run(["qemu-io", "-f", "vhdx", "-c", "write -P 7 1M 1M", disk], check=True, stdout=subprocess.DEVNULL)
        cases = commands(disk)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, argv in cases.items():
                start = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(runs) for name, runs in times.items()}
    if args.json:
        print(json.dumps({"runs": args.runs, "median_seconds": medians}, indent=1))
        return
    print(f"median of {args.runs} runs")
    for name, median in medians.items():
        bound = BOUNDS.get(name)
        verdict = f"   bound {bound:.2f} s  {'ok' if median <= bound else 'OVER'}" if bound else ""
        print(f"  {name:28s} {median * 1000:7.1f} ms{verdict}")


if __name__ == "__main__":
    main()
