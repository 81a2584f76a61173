"""The VHDX engine against a model: random writes, trims, flushes and reopens on fixed, dynamic and
differencing disks must read back exactly as a plain bytearray would, and extents must agree."""

from __future__ import annotations

import hashlib
import os
import tempfile

import pytest
from disk_model import DiskModel, pattern
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize

from hvbackup import disks
from hvbackup.disks import ExtentState
from hvbackup.disks.vhdx import bat as batmod
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.disks.vhdx.journal import Journal
from hvbackup.errors import DiskBusyError, DiskError, ParentError
from hvbackup.units import MiB


class VhdxModel(DiskModel):
    """A VHDX disk of each type (a differencing child of a random base, or not)."""

    @initialize(
        kind=st.sampled_from(["fixed", "dynamic", "differencing"]),
        block_size=st.sampled_from([MiB, 2 * MiB]),
        sector=st.sampled_from([512, 4096]),
        blocks=st.integers(1, 4),
        tail_sectors=st.integers(0, 7),
        seed=st.integers(0, 2**32),
    )
    def create(self, kind, block_size, sector, blocks, tail_sectors, seed):
        self.dir = tempfile.mkdtemp(prefix="hvbackup-vhdx-model-")
        self.block_size = block_size
        self.size = blocks * block_size + tail_sectors * sector
        self.path = os.path.join(self.dir, "disk.vhdx")
        self.model = bytearray(self.size)
        if kind == "differencing":
            base = os.path.join(self.dir, "base.vhdx")
            with disks.create(base, self.size, block_size=block_size, logical_sector_size=sector) as d:
                content = pattern(seed, self.size // 3)
                d.write(self.size // 3, content)
                self.model[self.size // 3:self.size // 3 + len(content)] = content
            self.disk = disks.create(self.path, type="differencing", parent=base, block_size=block_size)
        else:
            self.disk = disks.create(self.path, self.size, type=kind, block_size=block_size,
                                     logical_sector_size=sector)


TestVhdxModel = VhdxModel.TestCase
TestVhdxModel.settings = settings(stateful_step_count=25, deadline=None)


def test_unaligned_io_and_bounds(tmp_path):
    with disks.create(tmp_path / "d.vhdx", 3 * MiB + 512, block_size=MiB) as d:
        d.write(MiB - 3, b"abcdefgh")  # crosses a block boundary inside a sector
        assert d.read(MiB - 5, 12) == b"\0\0abcdefgh\0\0"
        with pytest.raises(DiskError, match="outside the disk"):
            d.write(3 * MiB, b"x" * 1024)
        with pytest.raises(DiskError, match="outside the disk"):
            d.read(-1, 2)
    with disks.open(tmp_path / "d.vhdx", read_only=True) as d:
        with pytest.raises(DiskError, match="read-only"):
            d.write(0, b"x")


def test_a_second_writer_is_refused(tmp_path):
    with disks.create(tmp_path / "d.vhdx", 4 * MiB):
        with pytest.raises(DiskBusyError):
            disks.open(tmp_path / "d.vhdx")
        with disks.open(tmp_path / "d.vhdx", read_only=True) as reader:
            assert reader.size == 4 * MiB


def test_trim_states(tmp_path):
    """Whole-block trims: UNMAPPED with the space kept as a soft anchor (dynamic), FULLY_PRESENT zeros
    (differencing: the parent must not show through), zeroed in place (fixed)."""
    with disks.create(tmp_path / "dyn.vhdx", 4 * MiB, block_size=MiB) as d:
        d.write(0, b"\1" * 4 * MiB)
        location = d.bat.payload(1) >> batmod.OFFSET_SHIFT
        d.trim(MiB, MiB)
        assert d.bat.payload(1) == batmod.entry(batmod.UNMAPPED, location * MiB)
        d.write(MiB + 4096, b"\2" * 4096)  # reuses the anchor, the rest of the block reads zeros
        assert d.bat.payload(1) == batmod.entry(batmod.FULLY_PRESENT, location * MiB)
        assert d.read(MiB, 3 * 4096) == bytes(4096) + b"\2" * 4096 + bytes(4096)
    with disks.create(tmp_path / "child.vhdx", type="differencing", parent=tmp_path / "dyn.vhdx", block_size=MiB) as c:
        c.trim(0, 2 * MiB)
        assert c.bat.payload(0) & batmod.STATE_MASK == batmod.FULLY_PRESENT
        assert c.read(0, 2 * MiB) == bytes(2 * MiB)
        assert c.read(2 * MiB, 4) == b"\1" * 4
    with disks.create(tmp_path / "fixed.vhdx", 2 * MiB, type="fixed", block_size=MiB) as f:
        f.write(0, b"\3" * 2 * MiB)
        before = f.bat.payload(0)
        f.trim(0, MiB)
        assert f.bat.payload(0) == before and f.read(0, MiB) == bytes(MiB)


def test_differencing_chain_and_parent_rules(tmp_path):
    base = tmp_path / "base.vhdx"
    with disks.create(base, 8 * MiB) as d:
        d.write(0, b"B" * 8 * MiB)
    mid, top = tmp_path / "mid.avhdx", tmp_path / "top.avhdx"
    disks.create(mid, type="differencing", parent=base).close()
    with disks.create(top, type="differencing", parent=mid) as t:
        t.write(4096, b"T" * 4096)
        assert t.read(0, 3 * 4096) == b"B" * 4096 + b"T" * 4096 + b"B" * 4096
        assert {e.depth for e in t.extents()} == {0, 2}
    # The chain is found again after the whole directory moves (relative_path).
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in (base, mid, top):
        os.rename(p, moved / p.name)
    with disks.open(moved / "top.avhdx") as t:
        assert t.read(4096, 4) == b"TTTT"
        assert t.parent.parent.path.endswith("moved/base.vhdx")
    # A parent changed after the child was made no longer matches its linkage.
    with disks.open(moved / "base.vhdx") as b:
        b.write(0, b"x")
    with pytest.raises(ParentError) as caught:
        disks.open(moved / "mid.avhdx")
    assert caught.value.reason == "disk.parent.identity-mismatch"
    os.unlink(moved / "base.vhdx")
    with pytest.raises(ParentError) as caught:
        disks.open(moved / "mid.avhdx", read_only=True)
    assert caught.value.reason == "disk.parent.not-found"


def test_stale_parent_paths_are_updated_on_a_writable_open(tmp_path):
    (tmp_path / "a").mkdir()
    base, child = tmp_path / "a" / "base.vhdx", tmp_path / "a" / "child.vhdx"
    disks.create(base, 4 * MiB).close()
    disks.create(child, type="differencing", parent=base).close()
    (tmp_path / "b").mkdir()
    os.rename(child, tmp_path / "b" / "child.vhdx")  # relative path now wrong, absolute still right
    with disks.open(tmp_path / "b" / "child.vhdx") as c:
        assert c.metadata.parent_locator.entries["relative_path"] == "..\\a\\base.vhdx"


class _Crash(Exception):
    pass


def flush_and_die(disk: VhdxDisk, monkeypatch) -> None:
    """Flush with the patches in ``monkeypatch`` raising _Crash part way; then drop the file as a
    killed process would, and lift the patches."""
    with pytest.raises(_Crash):
        disk.flush()
    os.close(disk._fd)
    disk.closed = True
    monkeypatch.undo()


def leave_log_pending(disk: VhdxDisk, monkeypatch) -> None:
    """Stop a commit after its log entry is durable and named by the header, before the pages reach
    their places."""
    def crash(self, pages):
        raise _Crash
    monkeypatch.setattr(Journal, "_apply", crash)
    flush_and_die(disk, monkeypatch)


def test_pending_log_replays_in_memory_read_only_and_in_place_read_write(tmp_path, monkeypatch):
    path = tmp_path / "d.vhdx"
    disk = disks.create(path, 8 * MiB, block_size=MiB)
    disk.write(3 * MiB, b"\7" * MiB)
    leave_log_pending(disk, monkeypatch)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with disks.open(path, read_only=True) as d:
        assert d.log_pending and d.read(3 * MiB, MiB) == b"\7" * MiB
        assert d.info()["log_pending"] is True
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "a read-only open changed the file"
    with disks.open(path) as d:
        assert d.log_pending and d.read(3 * MiB, MiB) == b"\7" * MiB
    with disks.open(path, read_only=True) as d:
        assert not d.log_pending and d.read(3 * MiB, MiB) == b"\7" * MiB


def test_large_disk_interleaves_bitmap_entries(tmp_path):
    """Past the first chunk (4 GiB with 512-byte sectors) each payload entry is shifted by the
    sector bitmap entries before it."""
    size = 10 << 30
    with disks.create(tmp_path / "big.vhdx", size, block_size=MiB) as d:
        for offset in (4 << 30) - 4096, 4 << 30, (8 << 30) + 12345, size - 512:
            d.write(offset, offset.to_bytes(8, "little") * 64)
    with disks.open(tmp_path / "big.vhdx", read_only=True) as d:
        assert d.bat.table[4096] == 0  # the bitmap entry of chunk 0 stays empty in a dynamic disk
        for offset in (4 << 30) - 4096, 4 << 30, (8 << 30) + 12345:
            assert d.read(offset, 8) == offset.to_bytes(8, "little")
        data = [e for e in d.extents() if e.state == ExtentState.DATA]
        assert len(data) == 3  # the blocks either side of 4 GiB coalesce


def test_sector_bitmaps_of_more_chunks_than_are_cached_read_and_write_right(tmp_path):
    """A differencing disk with partial blocks in more chunks (4 GiB each) than the bitmap cache
    keeps: clean bitmaps are dropped and read again, changed ones stay until committed."""
    from hvbackup.disks.vhdx.bitmap import MAX_CACHED

    chunks = MAX_CACHED + 4
    base, child = tmp_path / "base.vhdx", tmp_path / "child.avhdx"
    with disks.create(base, chunks << 32, block_size=MiB) as d:
        for chunk in range(chunks):
            d.write(chunk << 32, b"\x01" * 8192)
    expected = {}
    with disks.create(child, type="differencing", parent=base, block_size=MiB) as d:
        for round_ in range(2):  # the second round rewrites bitmaps the first let go of
            for chunk in range(chunks):
                offset = (chunk << 32) + 512 * (1 + round_)
                d.write(offset, bytes([2 + round_]) * 512)
                expected[offset] = bytes([2 + round_]) * 512
        for offset, data in expected.items():
            assert d.read(offset, 512) == data
    with disks.open(child, read_only=True) as d:
        for chunk in range(chunks):
            assert d.read(chunk << 32, 2048) == b"\x01" * 512 + b"\x02" * 512 + b"\x03" * 512 + b"\x01" * 512
        data = [e for e in d.extents() if e.state == ExtentState.DATA]
        assert sum(e.length for e in data if e.depth == 0) == chunks * 1024
        assert len(d._bitmaps._blocks) <= MAX_CACHED


def test_64_tib_sparse_disk(tmp_path):
    size = 64 << 40
    with disks.create(tmp_path / "huge.vhdx", size) as d:
        d.write(size - 4096, b"end!" * 1024)
        d.write(0, b"start")
    assert os.path.getsize(tmp_path / "huge.vhdx") < 100 * MiB
    with disks.open(tmp_path / "huge.vhdx", read_only=True) as d:
        assert d.size == size and d.read(size - 4, 4) == b"end!" and d.read(0, 5) == b"start"
        assert sum(e.length for e in d.extents()) == size
    with pytest.raises(DiskError):
        disks.create(tmp_path / "too-big.vhdx", size + 512)


def test_create_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path):
    disks.create(tmp_path / "d.vhdx", MiB).close()
    with pytest.raises(DiskError, match="already exists"):
        disks.create(tmp_path / "d.vhdx", MiB)
    with pytest.raises(DiskError):
        disks.create(tmp_path / "bad.vhdx", MiB, block_size=3 * MiB)
    assert sorted(os.listdir(tmp_path)) == ["d.vhdx"]


def test_many_metadata_pages_commit_in_several_entries(tmp_path):
    """A differencing disk whose writes dirty more bitmap pages than one log entry holds."""
    base = tmp_path / "base.vhdx"
    disks.create(base, 2 << 30, block_size=MiB).close()
    with disks.create(tmp_path / "c.vhdx", type="differencing", parent=base, block_size=MiB) as c:
        assert c._journal.capacity < 256  # so the 256 bitmap pages below need several commits
        # One sector in every 16 MiB bitmap page: 128 pages of bitmap per GiB.
        for offset in range(0, 2 << 30, 8 * MiB):
            c.write(offset, b"s" * 512)
    with disks.open(tmp_path / "c.vhdx", read_only=True) as c:
        for offset in range(0, 2 << 30, 8 * MiB):
            assert c.read(offset, 513) == b"s" * 512 + b"\0"


def test_a_torn_entry_after_the_log_wraps_never_brings_back_an_older_one(tmp_path, monkeypatch):
    """Entries too large to fit twice in the 1 MiB log: the second wraps onto the first. A crash
    tearing it must leave the first's updates (and everything flushed before) in place."""
    from hvbackup.disks.vhdx import journal

    base = tmp_path / "base.vhdx"
    disks.create(base, 8 << 30, block_size=MiB).close()
    child = tmp_path / "child.vhdx"
    disk = disks.create(child, type="differencing", parent=base, block_size=MiB)
    stride = 16 * MiB  # one sector bitmap page of 512-byte sectors covers 16 MiB
    for round_no in range(6):  # small commits first: older entries of the same log GUID
        disk.write(round_no * 512, bytes([round_no + 1]) * 512)
        disk.flush()
    for i in range(150):  # one big commit: a bitmap page and a BAT entry per region
        disk.write(i * stride + 8192, b"A" * 512)
    disk.flush()
    for i in range(150):
        disk.write(i * stride + 16384, b"B" * 512)

    def torn(fd, data, offset):
        if MiB <= offset < 2 * MiB and len(data) > 256 * 1024:  # the big log entry
            os.pwrite(fd, memoryview(data)[:len(data) // 2], offset)
            raise _Crash
        journal_write(fd, data, offset)

    journal_write = journal.write_at
    monkeypatch.setattr(journal, "write_at", torn)
    flush_and_die(disk, monkeypatch)
    for read_only in (True, False):
        with disks.open(child, read_only=read_only) as d:
            assert d.read(0, 6 * 512) == b"".join(bytes([n + 1]) * 512 for n in range(6))
            for i in range(150):
                assert d.read(i * stride + 8192, 512) == b"A" * 512


def test_a_windows_drive_path_survives_a_writable_open(tmp_path):
    """A chain copied from Windows: its drive-letter absolute path cannot resolve here and is left
    as it is; the stale relative path is rewritten to the parent actually found (next to the child)."""
    import dataclasses

    from hvbackup.disks.vhdx.locator import ParentLocator

    base, child = tmp_path / "base.vhdx", tmp_path / "child.vhdx"
    disks.create(base, 4 * MiB).close()
    disks.create(child, type="differencing", parent=base).close()
    windows = {"relative_path": "..\\Old\\base.vhdx", "absolute_win32_path": "\\\\?\\C:\\VMs\\base.vhdx"}
    with VhdxDisk.open(str(child), read_only=True) as c:
        linkage = c.metadata.parent_locator.entries["parent_linkage"]
    with VhdxDisk.open(str(child)) as c:
        locator = ParentLocator({"parent_linkage": linkage, **windows})
        c._rewrite_metadata(dataclasses.replace(c.metadata, parent_locator=locator))
    with disks.open(child) as c:
        assert c.parent.path == str(base)
    with VhdxDisk.open(str(child), read_only=True) as c:
        entries = c.metadata.parent_locator.entries
        assert entries["relative_path"] == "base.vhdx"
        assert entries["absolute_win32_path"] == windows["absolute_win32_path"]
