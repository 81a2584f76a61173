"""A deterministic write workload for crash tests, run in a child process.

    python crash_workload.py DISK SEED ACKFILE [--stop-at-write N [--torn]] [--count-writes]

Every sector a write touches is filled with a tag (write id, sector number) repeated, so after a
crash each sector says which write it came from. After each ``flush()`` returns, the index of the
last operation it covers is appended to ACKFILE and fsynced: those writes must survive.

``--stop-at-write N`` ends the process at the N-th ``pwrite`` of the run (the file write the
engine issues for data, log, headers and metadata alike); with ``--torn`` that last write stops
after a 4 KiB-aligned part of its buffer, as a torn write on power loss would.
"""

from __future__ import annotations

import os
import random
import struct
import sys

import numpy as np

SECTOR = 512
DISK_SIZE = 24 << 20
OPS = 250


def operations(seed: int, count: int = OPS) -> list[tuple]:
    """('write', first sector, sectors, id) | ('trim', first sector, sectors) | ('flush',) | ('reopen',)"""
    rng = random.Random(seed)
    sectors = DISK_SIZE // SECTOR
    ops: list[tuple] = []
    for i in range(count):
        roll = rng.random()
        if roll < 0.70:
            count = rng.choice([1, 8, 64, rng.randint(1, 1200), 2048, 4096])
            first = rng.randrange(0, sectors - count)
            ops.append(("write", first, count, 1000 + i))
        elif roll < 0.80:
            count = rng.choice([rng.randint(1, 5000), 2048, 4096])
            first = rng.randrange(0, sectors - count)
            if rng.random() < 0.5:
                first = first // 2048 * 2048  # whole 1 MiB blocks take the BAT-state paths
            ops.append(("trim", first, count))
        elif roll < 0.95:
            ops.append(("flush",))
        else:
            ops.append(("reopen",))
    return ops


def tagged(write_id: int, first: int, count: int) -> bytes:
    tags = np.empty((count, 2), dtype="<u8")
    tags[:, 0] = write_id
    tags[:, 1] = np.arange(first, first + count, dtype=np.uint64)
    return np.repeat(tags, SECTOR // 16, axis=0).tobytes()


def _install_stop(stop_at: int, torn: bool) -> None:
    real = os.pwrite
    calls = 0

    def pwrite(fd, data, offset):
        nonlocal calls
        calls += 1
        if calls == stop_at:
            if torn and len(data) > 4096:
                real(fd, memoryview(data)[: len(data) // 2 // 4096 * 4096], offset)
            os._exit(99)
        return real(fd, data, offset)

    os.pwrite = pwrite


def _install_counter() -> None:
    real = os.pwrite
    counter = {"n": 0}

    def pwrite(fd, data, offset):
        counter["n"] += 1
        return real(fd, data, offset)

    os.pwrite = pwrite
    import atexit

    atexit.register(lambda: sys.stdout.write(f"writes {counter['n']}\n"))


def run(path: str, seed: int, acknowledge, count: int = OPS) -> None:
    """The ``count`` operations of ``seed`` on the disk; ``acknowledge(index)`` after each ``flush()``
    returns (and ``acknowledge(count)`` after the close): writes up to there must survive."""
    from hvbackup import disks

    disk = disks.open(path)
    print("ready", flush=True)
    for index, op in enumerate(operations(seed, count)):
        if op[0] == "write":
            _, first, count, write_id = op
            disk.write(first * SECTOR, tagged(write_id, first, count))
        elif op[0] == "trim":
            disk.trim(op[1] * SECTOR, op[2] * SECTOR)
        elif op[0] == "flush":
            disk.flush()
            acknowledge(index)
        else:
            disk.close()
            disk = disks.open(path)
    disk.close()
    acknowledge(count)


def ack_file(ackfile: str):
    """An ``acknowledge`` that appends the index to ACKFILE and fsyncs it."""
    ack = os.open(ackfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def acknowledge(index: int) -> None:
        os.write(ack, struct.pack("<I", index))
        os.fsync(ack)
    return acknowledge


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--stop-at-write" in args:
        _install_stop(int(args[args.index("--stop-at-write") + 1]), "--torn" in args)
    if "--count-writes" in args:
        _install_counter()
    run(args[0], int(args[1]), ack_file(args[2]))
