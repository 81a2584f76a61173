"""Host export speed: full and differential backup exports, and ``cp`` of the same VHDX, in one run.

    python bench/bench_export.py [--dir DIR] [--size 4G] [--changed 0.01] [--rounds 5] [--settle 2] [--json]

A VM with one SIZE disk is filled with random data (every byte must be copied), given a recovery
checkpoint, exported in full and converted to a reference point; then the guest rewrites CHANGED of
the disk in 64 KiB writes at random places and a second recovery checkpoint is taken. Each round
then times, in alternating order, each case after an ``os.sync()`` and SETTLE seconds of quiet, so no
case pays for the write-back of the one before it (``os.sync()`` returns when this machine has handed
its dirty pages to the disk; a virtual disk's host may still be writing them):

  full export          ExportSystemDefinition of the second checkpoint, no base (a full VHDX copy)
  differential export  the same against the reference point (a differencing VHDX of the changes)
  detached differential  the same with ``detached=True``, as a backup by export asks: no export of
                       the base needed, the differential's parent is the frozen disk it was cut from
  cp                   ``cp`` of the checkpoint's frozen VHDX, then ``sync FILE`` (fsync) so its copy is
                       on stable storage too, as the export's is when it returns

Exports run in this process (no interpreter start-up is counted); cp runs as a command. The report
gives medians, the differential's time as a share of the full export's (target <= 5 %), and the full
export's speed relative to cp's (cp time / export time; target >= 80 %).
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

from hvbackup.host import SNAPSHOT_TYPE_RECOVERY, Host, checkpoints, refpoints
from hvbackup.host.export import export_system_definition
from hvbackup.host.model import ExportSettings
from hvbackup.units import MiB  # noqa: E402

K64 = 64 << 10
FILL = 32 * MiB


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def prepare(work: str, size: int, changed: float):
    """The VM, its reference point (exported in full) and the checkpoint the timed runs export."""
    shutil.rmtree(work, ignore_errors=True)
    host = Host.init(os.path.join(work, "host"))
    vm = host.create_vm("bench", [size])
    vm.request_state_change("start")
    disk = vm.disk(0)
    rng = np.random.default_rng(1)
    for offset in range(0, size, FILL):
        disk.write(offset, rng.bytes(min(FILL, size - offset)))
    first = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    export_system_definition(vm, os.path.join(work, "base"), settings(first.instance_id))
    point = refpoints.convert_to_reference_point(vm, first.instance_id)
    writes = int(size * changed) // K64
    for block in random.Random(2).sample(range(size // K64), writes):
        disk.write(block * K64, rng.bytes(K64))
    second = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    vm.close_disks()
    return vm, second, point, writes * K64


def settings(checkpoint_id: str, base: str | None = None) -> ExportSettings:
    return ExportSettings(snapshot_virtual_system=checkpoint_id, differential_backup_base=base)


def timed(action, settle: float) -> float:
    os.sync()
    time.sleep(settle)
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/hvbackup-bench-export")
    parser.add_argument("--size", default="4G")
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each case")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = parse_size(args.size)
    vm, checkpoint, point, changed = prepare(args.dir, size, args.changed)
    frozen = vm.path_of(checkpoint.disks[0].frozen)
    out = os.path.join(args.dir, "out")
    sizes: dict[str, int] = {}

    def export(base: str | None, name: str, detached: bool = False) -> None:
        result = export_system_definition(vm, out, settings(checkpoint.instance_id, base), detached=detached)
        sizes[name] = os.stat(result["virtual_hard_disks"][0]).st_blocks * 512

    copy = os.path.join(args.dir, "cp.vhdx")
    cases = {
        "full export": lambda: export(None, "full export"),
        "differential export": lambda: export(point.instance_id, "differential export"),
        "detached differential": lambda: export(point.instance_id, "detached differential", detached=True),
        "cp + sync": lambda: subprocess.run(["sh", "-c", 'cp "$0" "$1" && sync "$1"', frozen, copy], check=True),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_no in range(args.rounds):
        order = list(cases.items())
        if round_no % 2:
            order.reverse()
        for name, run in order:
            shutil.rmtree(out, ignore_errors=True)
            if os.path.exists(copy):
                os.unlink(copy)
            times[name].append(timed(run, args.settle))
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    if os.path.exists(copy):
        os.unlink(copy)
    medians = {name: statistics.median(runs) for name, runs in times.items()}
    report = {
        "size": size, "changed_bytes": changed, "rounds": args.rounds, "settle": args.settle,
        "times": times, "medians": medians,
        "allocated_bytes": sizes,
        "differential_share_of_full": medians["differential export"] / medians["full export"],
        "full_speed_of_cp": medians["cp + sync"] / medians["full export"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.size} disk of random data, {changed / MiB:.0f} MiB changed in 64 KiB writes; "
          f"medians of {args.rounds} alternating rounds\n")
    print("| case | median (s) | runs (s) | space taken (MiB) |\n|---|---|---|---|")
    for name, runs in times.items():
        space = f"{sizes[name] / MiB:.1f}" if name in sizes else "—"
        print(f"| {name} | {medians[name]:.3f} | {' '.join(f'{r:.3f}' for r in runs)} | {space} |")
    print(f"\ndifferential / full: {report['differential_share_of_full']:.1%} (target <= 5 %)")
    print(f"full export speed / cp speed: {report['full_speed_of_cp']:.0%} (target >= 80 %)")


if __name__ == "__main__":
    main()
