"""Costs follow what is allocated, changed or read, not the virtual size.

A 64 TiB dynamic VHDX (32 MiB blocks, change tracking on) and a 2040 GiB VHD (the format's largest),
each with a few MiB written, go through what a backup does to them: open, a checkpoint (seal, then a
differencing child), writes into the child, a 256 MiB read through the chain, the extents of the
whole chain, change queries over the whole disk, and merging the child back. Each step runs in a
child process that reports its time and peak resident memory; everything read back is checked.
Time limits are ten times the targets or more (the machine is shared and noisy); the figures
themselves belong in a benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
PEAK_LIMIT = 150 * MiB  # resident memory of the whole process, interpreter and numpy included

# (offset, length, byte): parent writes before the checkpoint, then child writes after it.
VHDX_SIZE = 64 * TiB
VHDX_PARENT = [(0, MiB, 0x11), (96 * MiB - 4 * KiB, 8 * KiB, 0x12), (40 * TiB, MiB, 0x13),
               (VHDX_SIZE - MiB, MiB, 0x14)]
VHDX_CHILD = [(512 * KiB, 2 * MiB, 0x21), (100 * MiB + 4 * KiB, 4 * KiB, 0x22), (40 * TiB + 512 * KiB, 3 * MiB, 0x23),
              (200 * MiB, 4 * MiB, 0x24)]
VHD_SIZE = 2040 * GiB
VHD_PARENT = [(0, MiB, 0x31), (2000 * GiB, MiB, 0x32), (VHD_SIZE - MiB, MiB, 0x33)]
VHD_CHILD = [(512 * KiB, 2 * MiB, 0x41), (100 * MiB + 4 * KiB, 4 * KiB, 0x42), (2000 * GiB + 4 * KiB, 8 * KiB, 0x43)]

# Seconds each step may take: ten times its target or more.
LIMITS = {"open": 1.0, "checkpoint": 3.0, "child writes": 3.0, "read 256 MiB": 10.0, "extents": 2.0,
          "query": 2.0, "merge": 5.0}


def expected(writes: list[tuple[int, int, int]], offset: int, length: int) -> bytes:
    """What [offset, offset+length) holds after ``writes`` (later ones win) on an empty disk."""
    buffer = bytearray(length)
    for at, count, value in writes:
        low, high = max(at, offset), min(at + count, offset + length)
        if low < high:
            buffer[low - offset:high - offset] = bytes([value]) * (high - low)
    return bytes(buffer)


def granule_runs(writes: list[tuple[int, int, int]], granularity: int, size: int) -> list[tuple[int, int]]:
    """The coalesced runs of whole granules the writes touch: what a change query answers."""
    granules = sorted({g for at, count, _ in writes
                       for g in range(at // granularity, (at + count - 1) // granularity + 1)})
    runs: list[list[int]] = []
    for g in granules:
        if runs and runs[-1][1] == g:
            runs[-1][1] = g + 1
        else:
            runs.append([g, g + 1])
    return [(a * granularity, min(b * granularity, size) - a * granularity) for a, b in runs]


# -- the measured workload (runs in a child process) ---------------------------------------------

def _peak_resident() -> int:
    """This process's peak resident memory in bytes. VmHWM, not ru_maxrss: Linux carries the
    parent's resident size at the fork into a child's ru_maxrss, and pytest's may be large."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * KiB


def _workload(directory: str, fmt: str) -> None:
    from hvbackup import stack, tracking

    vhdx = fmt == "vhdx"
    size, parent_writes, child_writes = (VHDX_SIZE, VHDX_PARENT, VHDX_CHILD) if vhdx else (VHD_SIZE, VHD_PARENT,
                                                                                           VHD_CHILD)
    parent = os.path.join(directory, f"disk.{fmt}")
    child = os.path.join(directory, f"disk_1.a{fmt}")
    ids: dict[str, str] = {}

    def step(name: str, work) -> None:
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
        peak = _peak_resident()
        print(json.dumps({"step": name, "seconds": seconds, "peak": peak}), flush=True)

    def verify(path: str, writes: list, offset: int, length: int, piece: int = MiB) -> None:
        buffer = bytearray(piece)
        with stack.open(path, read_only=True) as disk:
            for at in range(offset, offset + length, piece):
                view = memoryview(buffer)[:min(piece, offset + length - at)]
                disk.readinto(at, view)
                assert bytes(view) == expected(writes, at, len(view)), f"{path}: wrong bytes at {at:#x}"

    def spots(writes: list) -> list[tuple[int, int]]:
        """Each write with a little around it, clipped to the disk."""
        return [(max(0, at - 4 * KiB), min(size, at + count + 4 * KiB) - max(0, at - 4 * KiB))
                for at, count, _ in writes]

    def build() -> None:
        stack.create(parent, size).close()
        if vhdx:
            ids["start"] = tracking.enable(parent).most_recent_id
        with stack.open(parent) as disk:
            for at, count, value in parent_writes:
                disk.write(at, bytes([value]) * count)

    def open_chain() -> None:
        with stack.open(parent) as disk:
            assert disk.size == size

    def checkpoint() -> None:
        if vhdx:
            ids["checkpoint"] = tracking.seal(parent)
        stack.create(child, type="differencing", parent=parent).close()

    def write_child() -> None:
        with stack.open(child) as disk:
            for at, count, value in child_writes:
                disk.write(at, bytes([value]) * count)

    every = parent_writes + child_writes

    def read_chain() -> None:
        verify(child, every, 0, 256 * MiB)

    def extents() -> None:
        with stack.open(child, read_only=True) as disk:
            found = list(disk.extents())
        assert found[0].offset == 0 and found[-1].end == size
        assert all(a.end == b.offset for a, b in zip(found, found[1:]))
        data = [e for e in found if e.state == "data"]
        assert sum(e.length for e in data) <= 512 * MiB, "extents report far more data than was written"
        for at, count, _ in every:  # data extents (of any depth) cover every write
            inside = sum(max(0, min(e.end, at + count) - max(e.offset, at)) for e in data)
            assert inside == count, f"the write at {at:#x} is not all in data extents"

    def query() -> None:
        granularity = tracking.status(child).granularity
        for since, writes in (("start", every), ("checkpoint", child_writes)):
            ranges, processed = tracking.query(child, ids[since])
            assert processed == size and ranges == granule_runs(writes, granularity, size), (since, ranges)

    def merge() -> None:
        assert stack.merge(child) == parent
        assert not os.path.exists(child)

    step("build", build)
    step("open", open_chain)
    step("checkpoint", checkpoint)
    step("child writes", write_child)
    step("read 256 MiB", read_chain)
    step("extents", extents)
    if vhdx:
        step("query", query)
    step("merge", merge)
    for offset, length in spots(every):
        verify(parent, every, offset, length)
    if vhdx:
        granularity = tracking.status(parent).granularity
        assert tracking.query(parent, ids["start"]) == (granule_runs(every, granularity, size), size)
        assert tracking.query(parent, ids["checkpoint"]) == (granule_runs(child_writes, granularity, size), size)


def measured(directory, fmt: str) -> dict[str, dict]:
    result = subprocess.run([sys.executable, __file__, str(directory), fmt], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {line["step"]: line for line in map(json.loads, result.stdout.splitlines())}


def _check(steps: dict[str, dict], expected_steps: list[str]) -> None:
    assert list(steps) == expected_steps
    for name, figures in steps.items():
        assert figures["peak"] < PEAK_LIMIT, f"{name}: peak memory {figures['peak'] / MiB:.0f} MiB"
        if name in LIMITS:
            assert figures["seconds"] < LIMITS[name], f"{name}: {figures['seconds']:.2f} s"


def test_a_64_tib_vhdx_costs_what_was_written(tmp_path):
    steps = measured(tmp_path, "vhdx")
    _check(steps, ["build", "open", "checkpoint", "child writes", "read 256 MiB", "extents", "query", "merge"])
    # The files hold what was written and their metadata; the 256 MiB BAT of the child stayed a hole.
    assert os.stat(tmp_path / "disk.vhdx").st_blocks * 512 < 512 * MiB


def test_the_largest_vhd_costs_what_was_written(tmp_path):
    _check(measured(tmp_path, "vhd"), ["build", "open", "checkpoint", "child writes", "read 256 MiB", "extents",
                                       "merge"])


if __name__ == "__main__":
    _workload(sys.argv[1], sys.argv[2])
