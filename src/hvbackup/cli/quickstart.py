"""``hvbackup quickstart``: a tour of the disk engine on an embedded default, no data needed.

Creates a dynamic VHDX, writes to it, switches change tracking on, takes a differencing child (a
checkpoint's AVHDX), writes to that, asks what changed since tracking started, checks both files,
flattens the chain to VHD and raw, compares all three, merges the child back, and compares and asks
again; then prints what it did with sizes and speeds.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from hvbackup import disks, tracking
from hvbackup.cli.output import EXIT_FOUND, EXIT_OK, emit_json, human_size, stdout
from hvbackup.disks.copy import data_bytes

MiB = 1 << 20
DISK_SIZE = 1 << 30
WRITE_BYTES = 128 * MiB


def default_directory() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "hvbackup" / "quickstart"


def quickstart(
    directory: Optional[Path] = typer.Option(
        None, "--dir", help="Work directory (default: ~/.local/share/hvbackup/quickstart)."),
    json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Tour the disk engine: create, write, track changes, checkpoint, check, convert, compare, merge."""
    work = directory or default_directory()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    steps: list[dict] = []

    def step(name: str, started: float, nbytes: int = 0, detail: str = "") -> None:
        seconds = time.perf_counter() - started
        steps.append({"step": name, "seconds": round(seconds, 3), "bytes": nbytes,
                      "mib_per_s": round(nbytes / MiB / seconds, 1) if nbytes and seconds else None,
                      "detail": detail})

    base, child = str(work / "base.vhdx"), str(work / "checkpoint.avhdx")
    vhd, raw = str(work / "flat.vhd"), str(work / "flat.raw")
    rng = np.random.default_rng(2026)

    t = time.perf_counter()
    with disks.create(base, DISK_SIZE) as disk:
        written = _write_scattered(disk, rng, WRITE_BYTES)
    step("create dynamic VHDX and write", t, written, f"{human_size(DISK_SIZE)} disk")

    t = time.perf_counter()
    since = tracking.enable(base).most_recent_id
    step("switch change tracking on", t, detail=since)

    t = time.perf_counter()
    with disks.create(child, type="differencing", parent=base) as disk:
        written = _write_scattered(disk, rng, WRITE_BYTES // 4)
        disk.trim(0, 8 * MiB)
    step("differencing child: write and trim", t, written, "like a checkpoint's AVHDX")

    with disks.open(child, read_only=True) as disk:
        chain_data = data_bytes(disk.extents())
        own = [e for e in disk.extents() if e.depth == 0]

    t = time.perf_counter()
    changed, _ = tracking.query(child, since)
    tracked_all = all(any(o <= e.offset and e.end <= o + n for o, n in changed) for e in own)
    verdict = "every write in them" if tracked_all else "A WRITE IS MISSING"
    step("ask what changed since tracking started", t,
         detail=f"{len(changed)} ranges, {human_size(sum(n for _, n in changed))}, {verdict}")

    t = time.perf_counter()
    problems = disks.check(base).problems + disks.check(child).problems
    step("check both files", t, detail="no problems" if not problems else "; ".join(problems))

    for target, label in ((vhd, "VHD"), (raw, "raw")):
        t = time.perf_counter()
        disks.convert(child, target)
        step(f"flatten the chain to {label}", t, chain_data)

    t = time.perf_counter()
    same = disks.compare(child, vhd).identical and disks.compare(child, raw).identical
    step("compare chain, VHD and raw", t, detail="identical" if same else "DIFFERENT")

    t = time.perf_counter()
    disks.merge(child)
    merged_same = disks.compare(base, raw).identical and tracking.query(base, since)[0] == changed
    step("merge the child into its parent", t,
         detail="identical to raw, same changes since the ID" if merged_same else "DIFFERENT")

    ok = same and merged_same and tracked_all and not problems
    files = {os.path.basename(p): os.path.getsize(p) for p in (base, vhd, raw) if os.path.exists(p)}
    if json:
        emit_json({"ok": ok, "directory": str(work), "steps": steps, "files": files})
    else:
        table = Table("step", "time", "speed", "result", box=None)
        for s in steps:
            speed = f"{s['mib_per_s']} MiB/s" if s["mib_per_s"] else ""
            table.add_row(s["step"], f"{s['seconds']:.2f} s", speed, s["detail"])
        stdout.print(table)
        for name, size in files.items():
            stdout.print(f"  {name}: {human_size(size)} on disk (apparent)", markup=False)
        stdout.print(f"{'all good' if ok else 'SOMETHING IS WRONG'} — files in {work}", markup=False)
    raise typer.Exit(EXIT_OK if ok else EXIT_FOUND)


def _write_scattered(disk, rng: np.random.Generator, total: int) -> int:
    """Random data in 1 MiB runs at random 4 KiB-aligned places; returns bytes written."""
    chunk = MiB
    for _ in range(total // chunk):
        offset = int(rng.integers(0, (disk.size - chunk) // 4096)) * 4096
        disk.write(offset, rng.bytes(chunk))
    disk.flush()
    return total // chunk * chunk
