"""Crash safety: a writing process dies at random moments (SIGKILL) or at chosen write syscalls
(some torn). Every file must reopen, replaying its log (read-only opens in memory, leaving the
file untouched), pass ``check``, and hold every write acknowledged by ``flush()``; any sector may
otherwise only hold what some write after the last acknowledgement put there.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import crash_workload as workload
import numpy as np
import pytest
from crash_harness import Workload
from tools import qemu_check

from hvbackup import disks
from hvbackup.disks.check import check

pytestmark = pytest.mark.slow
SECTORS = workload.DISK_SIZE // workload.SECTOR
BASE_ID = 7
KINDS = ["dynamic", "fixed", "differencing"]


def prepare(tmp: Path, kind: str) -> str:
    path = tmp / "disk.vhdx"
    if kind == "differencing":
        with disks.create(tmp / "base.vhdx", workload.DISK_SIZE, block_size=1 << 20) as base:
            base.write(0, workload.tagged(BASE_ID, 0, SECTORS // 2))
        disks.create(path, type="differencing", parent=tmp / "base.vhdx", block_size=1 << 20).close()
    else:
        disks.create(path, workload.DISK_SIZE, type=kind, block_size=1 << 20).close()
    return str(path)


def _initial(kind: str) -> np.ndarray:
    ids = np.zeros(SECTORS, dtype=np.uint64)
    if kind == "differencing":
        ids[: SECTORS // 2] = BASE_ID
    return ids


def _command(path: str, seed: int, ack: str, *extra: str) -> list[str]:
    return [sys.executable, str(Path(workload.__file__)), path, str(seed), ack, *extra]


def _acknowledged(ack: str) -> int:
    data = Path(ack).read_bytes() if os.path.exists(ack) else b""
    return struct.unpack_from("<I", data, len(data) - 4)[0] if len(data) >= 4 else -1


def _verify(path: str, kind: str, seed: int, ack: str) -> None:
    verify(path, kind, seed, _acknowledged(ack))


def verify(path: str, kind: str, seed: int, acked: int, count: int = workload.OPS) -> None:
    """The disk opens (replaying its log), reads every write acknowledged through operation
    ``acked`` and, where a later write or trim may have landed, that one or nothing newer; check and
    qemu-img agree it is sound."""
    ops = workload.operations(seed, count)
    expected = _initial(kind)
    for op in ops[: acked + 1]:
        if op[0] == "write":
            expected[op[1]:op[1] + op[2]] = op[3]
        elif op[0] == "trim":
            expected[op[1]:op[1] + op[2]] = 0
    later = [op for op in ops[acked + 1:] if op[0] in ("write", "trim")]

    def assert_content(disk) -> None:
        raw = np.frombuffer(disk.read(0, workload.DISK_SIZE), dtype="<u8").reshape(SECTORS, 64)
        uniform = (raw[:, 0::2] == raw[:, [0]]).all(1) & (raw[:, 1::2] == raw[:, [1]]).all(1)
        ids = np.where(uniform & ((raw[:, 0] == 0) | (raw[:, 1] == np.arange(SECTORS))), raw[:, 0], 2**64 - 1)
        for sector in np.flatnonzero(ids != expected):
            found = int(ids[sector])
            allowed = {op[3] if op[0] == "write" else 0 for op in later if op[1] <= sector < op[1] + op[2]}
            assert found in allowed, (
                f"sector {sector}: holds write {found}, expected {int(expected[sector])} "
                f"(acknowledged through op {acked}) or one of {sorted(allowed)}"
            )

    files = [p for p in Path(path).parent.iterdir() if p.suffix == ".vhdx"]
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    with disks.open(path, read_only=True) as disk:
        assert_content(disk)
    assert digest == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}, "a read-only open wrote"
    problems = [p for p in check(path).problems if "not yet applied" not in p]
    assert not problems
    with disks.open(path) as disk:
        assert_content(disk)
    report = check(path)
    assert report.ok, report.problems
    if kind != "differencing":
        qemu_check(path, "vhdx")


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_at_random_moments(tmp_path, kind, sample):
    rng = random.Random(f"sigkill-{kind}")
    for run in range(sample(8, 60)):
        case = tmp_path / f"run{run}"
        case.mkdir()
        path = prepare(case, kind)
        seed, ack = rng.randrange(1 << 30), str(case / "ack")
        Workload(*_command(path, seed, ack)[1:]).kill_after(rng.uniform(0, 0.3))  # it runs ~0.25 s after "ready"
        _verify(path, kind, seed, ack)
        shutil.rmtree(case)  # a full run makes thousands of cases; only a failing one is kept


def _count_writes(tmp: Path, kind: str, seed: int) -> int:
    path = prepare(tmp, kind)
    out = subprocess.run(_command(path, seed, str(tmp / "ack"), "--count-writes"),
                         capture_output=True, text=True, check=True).stdout
    return int(out.split("writes ")[1])


@pytest.mark.parametrize("kind", KINDS)
def test_stop_at_chosen_writes(tmp_path, kind, sample, full):
    seed = 4242 + KINDS.index(kind)
    (tmp_path / "count").mkdir()
    total = _count_writes(tmp_path / "count", kind, seed)
    points = range(1, total + 1) if full else random.Random(seed).sample(range(1, total + 1), min(total, 12))
    for n in points:
        for torn in (False, True) if full else (n % 2 == 0,):
            case = tmp_path / f"stop{n}{'t' if torn else ''}"
            case.mkdir()
            path = prepare(case, kind)
            extra = ["--stop-at-write", str(n)] + (["--torn"] if torn else [])
            result = subprocess.run(_command(path, seed, str(case / "ack"), *extra), capture_output=True, text=True)
            assert result.returncode == 99, result.stderr
            _verify(path, kind, seed, str(case / "ack"))
            shutil.rmtree(case)
