"""Whole-disk operations: convert between every pair of formats and types, merge (and merging again
after a merge stopped half way), compare."""

from __future__ import annotations

import os

import pytest
from disk_model import pattern

from hvbackup import disks
from hvbackup.disks import copy as copymod
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.errors import DiskError
from hvbackup.units import MiB

SIZE = 24 * MiB


def make_chain(tmp_path, fmt: str) -> tuple[str, str, bytearray]:
    """A base with data and a differencing child that overwrites some of it and trims some."""
    base, child = str(tmp_path / f"base.{fmt}"), str(tmp_path / f"child.{fmt}")
    expected = bytearray(SIZE)
    with disks.create(base, SIZE, format=fmt, block_size=2 * MiB) as d:
        d.write(MiB, pattern(1, 10 * MiB))
        expected[MiB:11 * MiB] = pattern(1, 10 * MiB)
    with disks.create(child, format=fmt, type="differencing", parent=base, block_size=MiB) as c:
        for seed, (offset, length) in enumerate([(0, 4096), (3 * MiB + 512, 5000), (9 * MiB, 4 * MiB)], 2):
            c.write(offset, pattern(seed, length))
            expected[offset:offset + length] = pattern(seed, length)
        c.trim(5 * MiB, 2 * MiB)
        expected[5 * MiB:7 * MiB] = bytes(2 * MiB)
    return base, child, expected


@pytest.mark.parametrize("source_format", ["vhdx", "vhd"])
@pytest.mark.parametrize("target", [("vhdx", "dynamic"), ("vhdx", "fixed"), ("vhd", "dynamic"),
                                    ("vhd", "fixed"), ("raw", "dynamic")])
def test_convert_flattens_any_chain_to_any_format(tmp_path, source_format, target):
    _, child, expected = make_chain(tmp_path, source_format)
    fmt, kind = target
    out = str(tmp_path / "out")
    disks.convert(child, out, format=fmt, type=kind)
    with disks.open(out, read_only=True) as d:
        assert (d.format, d.disk_type, d.parent) == (fmt, kind if fmt != "raw" else "fixed", None)
        assert d.read(0, SIZE) == bytes(expected)
    assert disks.compare(child, out).identical
    assert not [f for f in os.listdir(tmp_path) if "converting" in f]


def test_convert_refuses_and_cleans_up(tmp_path, monkeypatch):
    _, child, _ = make_chain(tmp_path, "vhdx")
    with pytest.raises(DiskError, match="differencing"):
        disks.convert(child, str(tmp_path / "x.vhdx"), type="differencing")

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(copymod, "bounded_map", broken)
    with pytest.raises(OSError):
        disks.convert(child, str(tmp_path / "y.vhdx"))
    assert not os.path.exists(tmp_path / "y.vhdx")
    assert not [f for f in os.listdir(tmp_path) if "converting" in f]


@pytest.mark.parametrize("fmt", ["vhdx", "vhd"])
def test_merge_folds_the_child_into_its_parent(tmp_path, fmt):
    base, child, expected = make_chain(tmp_path, fmt)
    assert disks.merge(child) == base
    assert not os.path.exists(child)
    with disks.open(base, read_only=True) as d:
        assert d.read(0, SIZE) == bytes(expected)


def test_an_interrupted_merge_leaves_a_working_chain_and_finishes_when_run_again(tmp_path, monkeypatch):
    base, child, expected = make_chain(tmp_path, "vhdx")
    real_write = VhdxDisk._write
    calls = {"n": 0}

    def failing_write(self, offset, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the merge stops after writing part of the child into the parent
        return real_write(self, offset, data)

    monkeypatch.setattr(VhdxDisk, "_write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        disks.merge(child)
    monkeypatch.undo()
    with disks.open(child, read_only=True) as d:  # the parent changed, the child still opens
        assert d.read(0, SIZE) == bytes(expected)
        assert len(d.metadata.parent_locator.linkages) == 2
    assert disks.merge(child) == base
    with disks.open(base, read_only=True) as d:
        assert d.read(0, SIZE) == bytes(expected)


def test_compare_reports_the_first_difference(tmp_path):
    a, b = str(tmp_path / "a.vhdx"), str(tmp_path / "b.raw")
    with disks.create(a, 8 * MiB) as d:
        d.write(3 * MiB, b"x" * 100)
    disks.convert(a, b)
    assert disks.compare(a, b).identical
    with disks.open(b) as d:
        d.write(3 * MiB + 50, b"y")
    result = disks.compare(a, b)
    assert not result.identical and result.first_difference == 3 * MiB + 50
    disks.create(str(tmp_path / "c.vhdx"), 4 * MiB).close()
    sizes = disks.compare(a, str(tmp_path / "c.vhdx"))
    assert not sizes.identical and "sizes differ" in sizes.reason


def test_merge_repoints_later_children_at_the_parent(tmp_path):
    base, middle, top = (str(tmp_path / n) for n in ("base.vhdx", "middle.avhdx", "top.avhdx"))
    with disks.create(base, 64 * MiB) as d:
        d.write(0, b"B" * (3 * MiB))
    with disks.create(middle, type="differencing", parent=base) as d:
        d.write(MiB, b"M" * MiB)
    with disks.create(top, type="differencing", parent=middle) as d:
        d.write(2 * MiB, b"T" * 4096)
    with disks.open(top, read_only=True) as d:
        before = d.read(0, d.size)
    disks.merge(middle, children=[top])
    assert not os.path.exists(middle)
    with disks.open(top, read_only=True) as d:
        assert d.parent.path == base and d.read(0, d.size) == before
    assert disks.check(top).ok and disks.check(base).ok
