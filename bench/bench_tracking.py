"""Change tracking speed: the same VHDX written tracked and untracked, side by side in one run.

    python bench/bench_tracking.py [--dir DIR] [--rounds 5] [--writes 100000] [--json]

The untracked baseline is the very file the tracked runs write, opened with the format layer alone
(``disks.open``) instead of the stack (``stack.open``, which adds the tracking filter). Each round
runs both, in alternating order, after an ``os.sync()`` so neither inherits the other's dirty pages;
the report gives medians and the tracked/untracked throughput ratio (cost = 1 - ratio).

Cases (the figures docs/benchmarks.md records):
  4K random   random 4 KiB writes into a fully allocated 1 GiB dynamic VHDX, writes per second.
              The tracked run includes its first-touch .mrt marks (one fdatasync per 256 MiB region
              written after a save); the report says how many there were. An untracked run changes
              the disk's DataWriteGuid, so the next tracked open starts a new lineage: every tracked
              round starts with no region marked, as a writer does after a seal.
  4K hot      the same, every write to one block the page cache holds: the kernel's part is as small
              as it gets, so this shows the filter's own CPU cost at its largest share (no target).
  1M seq      1 MiB sequential writes over a fully allocated 2 GiB dynamic VHDX, ending with flush(),
              MB/s. close() is timed apart (for a tracked disk it seals a point and saves the .rct).
  query       a sparse 1 TiB dynamic VHDX with RANGES changed granules, none adjacent, written
              through the tracked disk after the first ID: tracking.query(path, first_id) end to end
              (open, load and check the side files, answer) and disk.query on an open TrackedDisk,
              milliseconds, with the part that loads the side files (state.load) timed apart; each
              answer is checked to hold exactly RANGES ranges.
  side files  .rct + .mrt of that 1 TiB disk and of the fully written 2 GiB disk, as a fraction of
              the virtual size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

from hvbackup import disks, stack, tracking
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.tracking import state

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
TRACKED, UNTRACKED = "tracked", "untracked"


def remove(*paths: str) -> None:
    for p in paths:
        for q in (p, p + ".rct", p + ".mrt"):
            if os.path.exists(q):
                os.unlink(q)


def open_disk(path: str, mode: str):
    disk = stack.open(path) if mode == TRACKED else disks.open(path)
    assert (disk.change_tracker() is not None) == (mode == TRACKED), f"{path}: {mode} open gave {type(disk).__name__}"
    return disk


def marks(disk) -> int:
    """Regions marked in the .mrt since the last save: one durable commit each, for writes that stay
    inside one region (all of this script's)."""
    tracker = disk.change_tracker()
    return sum(tracker.tracking.mrt.marked) if tracker is not None else 0


def allocated_disk(path: str, size: int) -> None:
    """A dynamic VHDX with every block written, and tracking on."""
    remove(path)
    fill = bytes([1]) * (32 * MiB)
    with disks.create(path, size) as disk:
        for offset in range(0, size, len(fill)):
            disk.write(offset, fill)
    tracking.enable(path)


def alternating(rounds: int, run) -> dict[str, list]:
    results: dict[str, list] = {TRACKED: [], UNTRACKED: []}
    for round_no in range(rounds):
        order = [TRACKED, UNTRACKED] if round_no % 2 == 0 else [UNTRACKED, TRACKED]
        for mode in order:
            os.sync()
            results[mode].append(run(mode, round_no))
    return results


def random_writes(work: str, writes: int, rounds: int, *, hot: bool = False) -> dict[str, list[dict]]:
    size = 1 * GiB
    path = os.path.join(work, "random.vhdx")
    allocated_disk(path, size)
    payload = os.urandom(4 * KiB)
    rng = random.Random(7)
    offsets_by_round = [[rng.randrange(size // 4096) * 4096 if not hot else 12345 * 4096 for _ in range(writes)]
                        for _ in range(rounds)]

    def run(mode: str, round_no: int) -> dict:
        offsets = offsets_by_round[round_no]
        disk = open_disk(path, mode)
        try:
            write = disk.write
            start = time.perf_counter()
            for offset in offsets:
                write(offset, payload)
            elapsed = time.perf_counter() - start
            marked = marks(disk)
        finally:
            closing = time.perf_counter()
            disk.close()
        return {"rate": writes / elapsed, "seconds": elapsed, "marks": marked,
                "close_seconds": time.perf_counter() - closing}

    results = alternating(rounds, run)
    print(f"4K {'hot' if hot else 'random'} writes done", file=sys.stderr)
    remove(path)
    return results


def sequential_writes(work: str, size: int, rounds: int) -> tuple[dict[str, list[dict]], dict]:
    path = os.path.join(work, "sequential.vhdx")
    allocated_disk(path, size)
    payload = memoryview(os.urandom(MiB))

    def run(mode: str, round_no: int) -> dict:
        disk = open_disk(path, mode)
        try:
            write = disk.write
            start = time.perf_counter()
            for offset in range(0, size, MiB):
                write(offset, payload)
            disk.flush()
            elapsed = time.perf_counter() - start
            marked = marks(disk)
        finally:
            closing = time.perf_counter()
            disk.close()
        return {"rate": size / elapsed / 1e6, "seconds": elapsed, "marks": marked,
                "close_seconds": time.perf_counter() - closing}

    results = alternating(rounds, run)
    # The side files of a fully written disk: end on a tracked session so they describe it.
    with open_disk(path, TRACKED) as disk:
        for offset in range(0, size, 32 * MiB):
            disk.write(offset, payload)
    sides = side_files(path, size)
    print("1M sequential writes done", file=sys.stderr)
    remove(path)
    return results, sides


def side_files(path: str, size: int) -> dict:
    rct, mrt = os.path.getsize(path + ".rct"), os.path.getsize(path + ".mrt")
    return {"virtual_size": size, "rct_bytes": rct, "mrt_bytes": mrt, "fraction": (rct + mrt) / size}


def query_case(work: str, size: int, ranges: int, rounds: int) -> dict:
    path = os.path.join(work, "sparse.vhdx")
    remove(path)
    disks.create(path, size).close()
    first_id = tracking.enable(path).most_recent_id
    granularity = tracking.status(path).granularity
    # RANGES distinct even granules: no two adjacent, so each is one range of its own.
    granules = sorted(random.Random(3).sample(range(size // granularity // 2), ranges))
    payload = os.urandom(4 * KiB)
    start = time.perf_counter()
    with open_disk(path, TRACKED) as disk:
        for g in granules:
            disk.write(2 * g * granularity, payload)
        build_marks = marks(disk)
    build = time.perf_counter() - start
    print(f"query disk built in {build:.1f} s", file=sys.stderr)
    expected = [(2 * g * granularity, granularity) for g in granules]

    def check(answer) -> None:
        found, processed = answer
        if found != expected or processed != size:
            raise SystemExit(f"query returned {len(found)} ranges over {processed} bytes; expected {ranges} "
                             f"ranges over {size}")

    end_to_end, loading, in_memory = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        answer = tracking.query(path, first_id)
        end_to_end.append((time.perf_counter() - start) * 1000)
        check(answer)
        with VhdxDisk.open(path, read_only=True) as disk:  # the part of the above that loads the side files
            start = time.perf_counter()
            state.load(disk)
            loading.append((time.perf_counter() - start) * 1000)
        with open_disk(path, TRACKED) as disk:
            start = time.perf_counter()
            answer = disk.query(first_id, 0, size)
            in_memory.append((time.perf_counter() - start) * 1000)
            check(answer)
    sides = side_files(path, size)
    print("query done", file=sys.stderr)
    remove(path)
    return {"virtual_size": size, "granularity": granularity, "ranges": ranges, "build_seconds": build,
            "build_marks": build_marks, "end_to_end_ms": end_to_end, "load_ms": loading, "in_memory_ms": in_memory,
            "side_files": sides}


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def paired(runs: dict[str, list[dict]]) -> float:
    """The median over rounds of tracked/untracked in the same round: less moved by drift."""
    return statistics.median(t["rate"] / u["rate"] for t, u in zip(runs[TRACKED], runs[UNTRACKED]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/hvbackup-bench-tracking")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--writes", type=int, default=100_000, help="4 KiB random writes per round")
    parser.add_argument("--seq-size", default=2 * GiB, type=int, help="bytes written sequentially per round")
    parser.add_argument("--query-size", default=TiB, type=int, help="virtual size of the query disk")
    parser.add_argument("--ranges", type=int, default=10_000, help="changed ranges on the query disk")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    rand = random_writes(args.dir, args.writes, args.rounds)
    hot = random_writes(args.dir, args.writes, args.rounds, hot=True)
    seq, seq_sides = sequential_writes(args.dir, args.seq_size, args.rounds)
    query = query_case(args.dir, args.query_size, args.ranges, args.rounds)
    report = {"rounds": args.rounds, "random_4k": rand, "hot_4k": hot, "sequential_1m": seq, "query": query,
              "side_files": {"query_disk": query["side_files"], "sequential_disk": seq_sides}}
    rand_ratio = median(rand[TRACKED], "rate") / median(rand[UNTRACKED], "rate")
    seq_ratio = median(seq[TRACKED], "rate") / median(seq[UNTRACKED], "rate")
    hot_ratio = median(hot[TRACKED], "rate") / median(hot[UNTRACKED], "rate")
    report["ratios"] = {"random_4k": rand_ratio, "hot_4k": hot_ratio, "sequential_1m": seq_ratio}
    report["paired_ratios"] = {"random_4k": paired(rand), "hot_4k": paired(hot), "sequential_1m": paired(seq)}
    if args.json:
        print(json.dumps(report, indent=2))
        return

    print(f"medians of {args.rounds} alternating rounds\n")
    print("| case | tracked | untracked | ratio | cost | median of per-round ratios | target |")
    print("|---|---|---|---|---|---|---|")
    print(f"| 4 KiB random writes, 1 GiB VHDX (writes/s) | {median(rand[TRACKED], 'rate'):,.0f} | "
          f"{median(rand[UNTRACKED], 'rate'):,.0f} | {rand_ratio:.3f} | {1 - rand_ratio:.1%} | "
          f"{paired(rand):.3f} | <= 10% |")
    print(f"| 4 KiB rewrites of one cached block (writes/s) | {median(hot[TRACKED], 'rate'):,.0f} | "
          f"{median(hot[UNTRACKED], 'rate'):,.0f} | {hot_ratio:.3f} | {1 - hot_ratio:.1%} | "
          f"{paired(hot):.3f} | — |")
    print(f"| 1 MiB sequential writes + flush, {args.seq_size / GiB:g} GiB VHDX (MB/s) | "
          f"{median(seq[TRACKED], 'rate'):,.0f} | {median(seq[UNTRACKED], 'rate'):,.0f} | {seq_ratio:.3f} | "
          f"{1 - seq_ratio:.1%} | {paired(seq):.3f} | <= 3% |")
    print(f"\nfirst-touch .mrt marks per tracked round: 4K random "
          f"{sorted({r['marks'] for r in rand[TRACKED]})}, 1M sequential {sorted({r['marks'] for r in seq[TRACKED]})}")
    print(f"close() median (s): 4K random tracked {median(rand[TRACKED], 'close_seconds'):.3f}, untracked "
          f"{median(rand[UNTRACKED], 'close_seconds'):.3f}; 1M sequential tracked "
          f"{median(seq[TRACKED], 'close_seconds'):.3f}, untracked {median(seq[UNTRACKED], 'close_seconds'):.3f}")
    print(f"\nquery, {query['ranges']:,} ranges over {args.query_size / TiB:g} TiB "
          f"({query['granularity'] // KiB} KiB granules; built in {query['build_seconds']:.1f} s with "
          f"{query['build_marks']} .mrt marks):")
    print(f"  tracking.query(path, id) end to end: {statistics.median(query['end_to_end_ms']):.1f} ms "
          f"(of which loading the side files, state.load: {statistics.median(query['load_ms']):.1f} ms); "
          f"TrackedDisk.query in memory: {statistics.median(query['in_memory_ms']):.1f} ms (target < 50 ms)")
    print("\n| side files | virtual size | .rct (bytes) | .mrt (bytes) | fraction | target |")
    print("|---|---|---|---|---|---|")
    for name, s in ((f"{args.query_size / TiB:g} TiB, {args.ranges:,} ranges", query["side_files"]),
                    (f"{args.seq_size / GiB:g} GiB, fully written", seq_sides)):
        print(f"| {name} | {s['virtual_size']:,} | {s['rct_bytes']:,} | {s['mrt_bytes']:,} | "
              f"{s['fraction']:.6%} | < 0.01% |")
    print("\nruns:")
    for label, runs, key, fmt in (("4K random writes/s", rand, "rate", "{:.0f}"),
                                  ("4K one-block rewrites/s", hot, "rate", "{:.0f}"),
                                  ("1M sequential MB/s", seq, "rate", "{:.0f}")):
        for mode in (TRACKED, UNTRACKED):
            print(f"  {label} {mode}: " + " ".join(fmt.format(r[key]) for r in runs[mode]))
    print("  query end to end ms: " + " ".join(f"{v:.1f}" for v in query["end_to_end_ms"]))
    print("  query side-file load ms: " + " ".join(f"{v:.1f}" for v in query["load_ms"]))
    print("  query in memory ms: " + " ".join(f"{v:.1f}" for v in query["in_memory_ms"]))


if __name__ == "__main__":
    main()
