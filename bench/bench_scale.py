"""Cost in proportion to the change, not the disk: a 64 TiB VM with 1 MiB written at a time.

    python bench/bench_scale.py [--dir DIR] [--size 64T] [--rounds 5] [--json]

A host gets a VM with one dynamic VHDX of SIZE (sparse: a few MiB on disk), started, 1 MiB of random
data written. Every case runs as the user runs it, the ``hvbackup`` command in its own process, and
is measured from outside: wall time, and the peak resident memory the kernel reports for the child
(``wait4``'s ru_maxrss). The issue's bounds are printed beside each median:

  full backup          ``hvbackup backup big --full``, once
  incremental backup   ``hvbackup backup big`` after 1 MiB more was written at a random place (ROUNDS)
                       ≤ 5 s and ≤ 500 MB
  checkpoint           ``hvbackup checkpoint create big``: freeze the 64 TiB disk under a new AVHDX
  guest read           ``hvbackup vm io big read --length 256M`` through that checkpoint (256 MiB from
                       the AVHDX and its 64 TiB parent), ≤ 1 s
  checkpoint delete    ``hvbackup checkpoint delete``: the AVHDX merged back into the 64 TiB parent

The page cache is warm (the files are small); nothing here is limited by storage.
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
import tempfile
import time

from hvbackup.units import MiB  # noqa: E402

HVBACKUP = [sys.executable, "-m", "hvbackup"]
BOUNDS = {"incremental backup": (5.0, 500), "guest read": (1.0, None)}


def parse_size(text: str) -> int:
    units = {"G": 30, "T": 40}
    return int(float(text[:-1]) * (1 << units[text[-1].upper()])) if text[-1].upper() in units else int(text)


def measured(args: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stdout) of one hvbackup command, which must succeed."""
    start = time.monotonic()
    child = subprocess.Popen(HVBACKUP + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = child.stdout.read()
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"hvbackup {' '.join(args)} failed: {err.decode()}")
    return seconds, usage.ru_maxrss / 1024, out.decode()


def run(work: str, size: int, rounds: int) -> dict:
    env = {**os.environ, "HVBACKUP_HOST": os.path.join(work, "host"), "HVBACKUP_REPO": os.path.join(work, "repo")}
    for command in (["host", "init", env["HVBACKUP_HOST"]], ["repo", "init", env["HVBACKUP_REPO"]],
                    ["vm", "create", "big", "--disk", str(size)], ["vm", "start", "big"]):
        measured(command, env)
    rng = random.Random(1)
    payload = os.path.join(work, "payload")

    def write_somewhere() -> None:
        with open(payload, "wb") as f:
            f.write(rng.randbytes(MiB))
        offset = rng.randrange(0, size // MiB) * MiB
        measured(["vm", "io", "big", "write", "--offset", str(offset), "--file", payload], env)

    results: dict[str, list] = {}

    def record(case: str, args: list[str]) -> str:
        seconds, rss, out = measured(args, env)
        results.setdefault(case, []).append({"seconds": seconds, "rss_mb": rss})
        return out

    write_somewhere()
    record("full backup", ["backup", "big", "--full", "--json"])
    for _ in range(rounds):
        write_somewhere()
        [result] = json.loads(record("incremental backup", ["backup", "big", "--json"]))
        assert result["kind"] == "incremental", result
        checkpoint = json.loads(record("checkpoint", ["checkpoint", "create", "big", "--json"]))["id"]
        write_somewhere()
        offset = rng.randrange(0, size // MiB - 256) * MiB
        record("guest read", ["vm", "io", "big", "read", "--offset", str(offset), "--length", "256M"])
        record("checkpoint delete", ["checkpoint", "delete", checkpoint])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed afterwards)")
    parser.add_argument("--size", default="64T", help="the VM disk's virtual size (default 64T)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="bench-scale-")
    try:
        results = run(work, parse_size(args.size), args.rounds)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{args.size} VM, 1 MiB written before each step; medians of {args.rounds} rounds (full: 1 run)")
    for case, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        rss = statistics.median(r["rss_mb"] for r in runs)
        limit_s, limit_mb = BOUNDS.get(case, (None, None))
        bound = ""
        if limit_s:
            bound = f"   bound {limit_s:.1f} s" + (f", {limit_mb} MB" if limit_mb else "")
            bound += "  ok" if seconds <= limit_s and (not limit_mb or rss <= limit_mb) else "  OVER"
        each = ", ".join(f"{r['seconds']:.2f}" for r in runs)
        print(f"  {case:20s} {seconds:7.3f} s  {rss:7.1f} MB peak{bound}  (runs: {each})")


if __name__ == "__main__":
    main()
