"""The power-loss simulation itself (tests/powerloss.py): what it keeps, loses, tears and undoes."""

from __future__ import annotations

import os
import random

from powerloss import Recorder

from hvbackup import durable


def states(recorder: Recorder, n: int, tmp_path, count: int = 200, seed: int = 0):
    rng = random.Random(seed)
    for case in range(count):
        target = tmp_path / f"s{seed}-{n}-{case}"
        recorder.state_at(n, rng, str(target))
        yield target


def test_synced_data_stays_and_unsynced_data_may_be_lost_or_torn(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(bytes(8192))
    recorder = Recorder(str(root))
    with recorder.recording():
        fd = os.open(root / "f", os.O_RDWR)
        os.pwrite(fd, b"A" * 8192, 0)
        os.fsync(fd)
        os.pwrite(fd, b"B" * 8192, 0)
        os.close(fd)
    seen = set()
    for state in states(recorder, len(recorder.ops), tmp_path):
        data = (state / "f").read_bytes()
        assert set(data) <= {ord("A"), ord("B")}  # never the zeros before the synced write
        seen.add(data.count(b"B"[0]))
    assert {0, 8192} <= seen and seen - {0, 8192}  # lost, whole, and torn at a sector boundary
    assert all(count % 512 == 0 for count in seen)


def test_a_rename_needs_its_directory_synced(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    recorder = Recorder(str(root))
    with recorder.recording():
        durable.write_file(str(root / "synced"), [b"x"])  # fsync, rename, fsync of the directory
        staged = durable.Staged.next_to(str(root / "unsynced"))
        staged.write([b"y"])
        staged.finish(str(root / "unsynced"), sync_dir=False)
    names = [sorted(p.name for p in state.iterdir() if not p.name.startswith("."))
             for state in states(recorder, len(recorder.ops), tmp_path)]
    assert all("synced" in found for found in names)
    assert any("unsynced" not in found for found in names) and any("unsynced" in found for found in names)
    for state in states(recorder, len(recorder.ops), tmp_path, 20, seed=1):
        assert (state / "synced").read_bytes() == b"x"
