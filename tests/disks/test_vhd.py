"""The legacy VHD engine: round trips, a model-based test of random writes, trims and reopens on
fixed, dynamic and differencing disks, extents against content, crash ordering, and malformed files."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import tempfile
import uuid

import numpy as np
import pytest
from disk_model import DiskModel, pattern
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant

from hvbackup import disks
from hvbackup.disks import ExtentState, parents
from hvbackup.disks.vhd import VhdDisk, create_vhd
from hvbackup.disks.vhd import disk as diskmod
from hvbackup.disks.vhd.dynamic_header import DynamicHeader
from hvbackup.disks.vhd.footer import MAX_DISK_SIZE, Footer
from hvbackup.disks.vhd.geometry import MAX_GEOMETRY, geometry_for_size, geometry_sectors, standard_geometry
from hvbackup.errors import DiskError, DiskFormatError, ParentError
from hvbackup.units import KiB, MiB

SECTOR = 512
pytestmark = pytest.mark.timeout(300)


def sectors_of(offset: int, length: int) -> slice:
    """The sectors a byte range touches."""
    return slice(offset // SECTOR, -(-(offset + length) // SECTOR))


def extent_map(disk) -> tuple[np.ndarray, np.ndarray]:
    """Per-sector extent state and depth, after checking the extents tile the disk in order."""
    states = np.empty(disk.size // SECTOR, dtype=object)
    depths = np.empty(disk.size // SECTOR, dtype=np.int64)
    covered = 0
    for ext in disk.extents():
        assert ext.offset == covered and ext.length > 0, ext
        assert ext.offset % SECTOR == 0 and ext.length % SECTOR == 0, ext
        states[ext.offset // SECTOR:ext.end // SECTOR] = ext.state
        depths[ext.offset // SECTOR:ext.end // SECTOR] = ext.depth
        covered = ext.end
    assert covered == disk.size
    return states, depths


# -- the model ---------------------------------------------------------------------------------


class VhdModel(DiskModel):
    """One VHD (a differencing child of a dynamic base, or not) and the bytes it should hold. Besides
    content it tracks what the extents must say: for a dynamic disk the blocks a write allocated, for a
    differencing disk the sectors the child holds (written or trimmed)."""

    @initialize(
        kind=st.sampled_from(["fixed", "dynamic", "differencing"]),
        block_size=st.sampled_from([4 * KiB, 64 * KiB, 512 * KiB]),
        blocks=st.integers(1, 6),
        tail_sectors=st.integers(0, 9),
        seed=st.integers(0, 2**32),
    )
    def create(self, kind, block_size, blocks, tail_sectors, seed):
        self.dir = tempfile.mkdtemp(prefix="hvbackup-vhd-model-")
        self.kind = kind
        self.block_size = block_size
        self.size = blocks * block_size + tail_sectors * SECTOR
        self.path = os.path.join(self.dir, "disk.vhd")
        self.model = bytearray(self.size)
        self.owned = np.zeros(self.size // SECTOR, dtype=bool)      # sectors a write touched / child holds
        if kind == "differencing":
            base = os.path.join(self.dir, "base.vhd")
            create_vhd(base, self.size, disk_type="dynamic", block_size=block_size)
            with VhdDisk.open(base) as parent:
                content = pattern(seed, self.size // 2)
                parent.write(self.size // 4, content)
                self.model[self.size // 4:self.size // 4 + len(content)] = content
            create_vhd(self.path, None, disk_type="differencing", parent_path=base, block_size=block_size)
        else:
            create_vhd(self.path, self.size, disk_type=kind, block_size=block_size)
        self.disk = VhdDisk.open(self.path)

    def _granted(self, offset: int, length: int) -> tuple[int, int]:
        """The range a write or trim lands on: a differencing disk works in whole 4 KiB units."""
        if self.kind != "differencing":
            return offset, length
        start = offset // 4096 * 4096
        return start, min(self.size, -(-(offset + length) // 4096) * 4096) - start

    def wrote(self, offset: int, length: int) -> None:
        self.owned[sectors_of(*self._granted(offset, length))] = True

    def trimmed(self, offset: int, length: int) -> None:
        start, end = -(-offset // SECTOR) * SECTOR, (offset + length) // SECTOR * SECTOR
        if self.kind == "differencing" or start >= end:
            self.owned[sectors_of(*self._granted(offset, length))] = True
        else:  # the partial sectors at either end are written; the aligned middle allocates nothing
            if offset < start:
                self.owned[offset // SECTOR] = True
            if end < offset + length:
                self.owned[end // SECTOR] = True

    @invariant()
    def extents_agree(self):
        if not hasattr(self, "disk"):
            return
        states, depths = extent_map(self.disk)
        if self.kind == "fixed":
            assert (states == ExtentState.DATA).all() and not depths.any()
        elif self.kind == "dynamic":
            # A write allocates its whole block with every bitmap bit set; nothing else is allocated.
            per_block = self.block_size // SECTOR
            blocks = np.zeros(-(-len(self.owned) // per_block), dtype=bool)
            blocks[np.flatnonzero(self.owned) // per_block] = True
            allocated = np.repeat(blocks, per_block)[:len(self.owned)]
            assert (states[allocated] == ExtentState.DATA).all()
            assert (states[~allocated] == ExtentState.UNALLOCATED).all()
            assert not depths.any()
        else:
            # The child holds exactly the 4 KiB units written or trimmed through it; the rest is the parent's.
            assert ((depths == 0) == self.owned).all()
            assert (states[self.owned] == ExtentState.DATA).all()


TestVhdModel = VhdModel.TestCase
TestVhdModel.settings = settings(TestVhdModel.settings, stateful_step_count=25)


# -- round trips and creation ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fixed", "dynamic", "differencing"])
def test_round_trip(tmp_path, kind):
    size = 5 * MiB + 7 * SECTOR
    path = str(tmp_path / "disk.vhd")
    parent = None
    if kind == "differencing":
        parent = str(tmp_path / "parent.vhd")
        create_vhd(parent, size, disk_type="dynamic")
        with VhdDisk.open(parent) as disk:
            disk.write(0, pattern(1, size))
    create_vhd(path, None if parent else size, disk_type=kind, parent_path=parent)
    expected = bytearray(pattern(1, size) if parent else bytes(size))
    with VhdDisk.open(path) as disk:
        for seed, offset, length in [(2, 0, 1), (3, 2 * MiB - 100, 300), (4, size - 4000, 4000), (5, 3 * MiB, MiB)]:
            disk.write(offset, pattern(seed, length))
            expected[offset:offset + length] = pattern(seed, length)
    with VhdDisk.open(path, read_only=True) as disk:
        assert disk.read(0, size) == bytes(expected)
        info = disk.info()
        assert (disk.format, disk.disk_type, disk.size) == ("vhd", kind, size)
        assert (disk.logical_sector_size, disk.physical_sector_size) == (512, 512)
        assert disk.block_size == (0 if kind == "fixed" else 2 * MiB)
        assert isinstance(disk.disk_id, uuid.UUID)
        assert info["creator_app"] == "hvbk" and info["log_pending"] is False
        assert info["file_size"] == os.path.getsize(path)
        if kind == "differencing":
            assert disk.parent.path.endswith("parent.vhd")
            assert info["parent_unique_id"] == str(disk.parent.disk_id)
        else:
            assert disk.parent is None and "parent_unique_id" not in info


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_disks_open_recognises_vhd_by_content(tmp_path, kind):
    path = str(tmp_path / "disk.img")
    create_vhd(path, 3 * MiB, disk_type=kind)
    with disks.open(path) as disk:
        assert isinstance(disk, VhdDisk) and disk.disk_type == kind
    with disks.create(str(tmp_path / "other.vhd"), 3 * MiB, format="vhd", type=kind) as disk:
        assert isinstance(disk, VhdDisk) and disk.disk_type == kind


def test_file_layout_of_a_new_dynamic_disk(tmp_path):
    path = str(tmp_path / "d.vhd")
    create_vhd(path, 5 * MiB, disk_type="dynamic", block_size=MiB)
    raw = open(path, "rb").read()
    assert raw[:512] == raw[-512:] and raw[:8] == b"conectix"
    footer = Footer.unpack(raw[-512:])
    assert (footer.features, footer.version) == (2, 0x10000)
    assert (footer.creator_app, footer.creator_host_os, footer.saved_state) == (b"hvbk", b"Wi2k", 0)
    assert footer.original_size == footer.current_size == 5 * MiB and footer.data_offset == 512
    header = DynamicHeader.unpack(raw[512:1536])
    assert (header.table_offset, header.max_table_entries, header.block_size) == (1536, 5, MiB)
    assert raw[1536:2048] == b"\xff" * 512 and len(raw) == 2048 + 512


def test_differencing_header_names_the_parent(tmp_path):
    (tmp_path / "sub").mkdir()
    parent = str(tmp_path / "sub" / "parent.vhd")
    child = str(tmp_path / "child.vhd")
    create_vhd(parent, 2 * MiB, disk_type="dynamic")
    create_vhd(child, None, disk_type="differencing", parent_path=parent)
    with VhdDisk.open(parent, read_only=True) as p, VhdDisk.open(child, read_only=True) as c:
        header = c.header
        assert header.parent_unique_id == p.disk_id and header.parent_timestamp == p.footer.timestamp
        assert header.parent_name == "parent.vhd"
        assert c.parent_paths == {
            "relative_path": ".\\sub\\parent.vhd",
            "absolute_win32_path": os.path.abspath(parent).replace("/", "\\"),
        }
        used = [e for e in header.locators if e.platform_code != bytes(4)]
        assert [e.platform_code for e in used] == [b"W2ru", b"W2ku"]
        assert all(e.data_space == -(-e.data_length // 512) for e in used)
        assert c.disk_id != p.disk_id


def test_copied_chain_finds_its_parent_next_to_it(tmp_path):
    """The absolute locator goes stale when a chain is copied; the relative one still resolves."""
    parent, child = str(tmp_path / "a" / "p.vhd"), str(tmp_path / "a" / "c.vhd")
    os.mkdir(tmp_path / "a")
    create_vhd(parent, MiB, disk_type="dynamic")
    with VhdDisk.open(parent) as disk:
        disk.write(0, b"parent" * 100)
    create_vhd(child, None, disk_type="differencing", parent_path=parent)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    with VhdDisk.open(str(tmp_path / "b" / "c.vhd"), read_only=True) as disk:
        assert disk.read(0, 6) == b"parent"
        assert disk.parent.path == str(tmp_path / "b" / "p.vhd")


def test_chain_made_on_windows_resolves_next_to_the_child(tmp_path, monkeypatch):
    """Locators written by Windows name a drive path; the parent's file name next to the child is tried."""
    from hvbackup.disks.vhd import create as createmod

    parent, child = str(tmp_path / "p.vhd"), str(tmp_path / "c.vhd")
    create_vhd(parent, MiB, disk_type="dynamic")
    monkeypatch.setattr(createmod, "windows_paths",
                        lambda *_: {b"W2ru": "..\\elsewhere\\p.vhd", b"W2ku": "C:\\VMs\\p.vhd"})
    create_vhd(child, None, disk_type="differencing", parent_path=parent)
    with VhdDisk.open(child, read_only=True) as disk:
        assert disk.parent_paths == {"relative_path": "..\\elsewhere\\p.vhd", "absolute_win32_path": "C:\\VMs\\p.vhd"}
        assert disk.parent.path == parent


def test_three_level_chain_and_extent_depths(tmp_path):
    paths = [str(tmp_path / f"{i}.vhd") for i in range(3)]
    create_vhd(paths[0], 4 * MiB, disk_type="dynamic", block_size=MiB)
    with VhdDisk.open(paths[0]) as disk:
        disk.write(0, b"\1" * MiB)
    create_vhd(paths[1], None, disk_type="differencing", parent_path=paths[0], block_size=MiB)
    with VhdDisk.open(paths[1]) as disk:
        disk.write(MiB, b"\2" * 4096)
    create_vhd(paths[2], None, disk_type="differencing", parent_path=paths[1], block_size=MiB)
    with VhdDisk.open(paths[2]) as disk:
        disk.write(MiB + 512, b"\3" * 512)
        disk.trim(0, 1024)
        assert disk.read(0, 1024) == bytes(1024) and disk.read(1024, 1) == b"\1"
        assert disk.read(MiB, 2048) == b"\2" * 512 + b"\3" * 512 + b"\2" * 1024
        # The child holds whole 4 KiB units: the trim's and the write's.
        assert [(e.offset, e.length, e.state, e.depth) for e in disk.extents()] == [
            (0, 4096, ExtentState.DATA, 0),
            (4096, MiB - 4096, ExtentState.DATA, 2),
            (MiB, 4096, ExtentState.DATA, 0),
            (MiB + 4096, 3 * MiB - 4096, ExtentState.UNALLOCATED, 2),
        ]


def test_dynamic_sectors_with_a_clear_bitmap_bit_read_as_zeros(tmp_path):
    """Another writer may allocate a block and set bits only for what it wrote (the spec allows it):
    the other sectors read as zeros and are reported ZERO, and a write there sets their bits."""
    path = str(tmp_path / "d.vhd")
    create_vhd(path, 2 * MiB, disk_type="dynamic", block_size=MiB)
    with VhdDisk.open(path) as disk:
        disk.write(0, b"\x55" * MiB)
        location = disk.bat.location(0)
    with open(path, "r+b") as f:
        f.seek(location)
        f.write(b"\xf0" + bytes(511))     # sectors 0-3 present, MSB first
    with VhdDisk.open(path) as disk:
        assert disk.read(0, 4 * 512 + 1) == b"\x55" * 2048 + b"\0"
        assert [(e.offset, e.length, e.state) for e in disk.extents(0, MiB)] == [
            (0, 2048, ExtentState.DATA), (2048, MiB - 2048, ExtentState.ZERO)]
        disk.write(5 * 512, b"\x66" * 512)
        disk.trim(8 * 512, 1024)           # clear bits already read as zeros: a trim leaves them clear
    with VhdDisk.open(path, read_only=True) as disk:
        assert disk.read(4 * 512, 3 * 512) == bytes(512) + b"\x66" * 512 + bytes(512)
        assert [e.state for e in disk.extents(8 * 512, 1024)] == [ExtentState.ZERO]
    with open(path, "rb") as f:
        f.seek(location)
        assert f.read(1) == b"\xf4"


@pytest.mark.parametrize(
    "size, message",
    [(0, "positive multiple"), (1000, "positive multiple"), (MAX_DISK_SIZE + 512, "2040 GiB"), (-512, "positive")],
)
def test_create_rejects_bad_sizes(tmp_path, size, message):
    with pytest.raises(DiskError, match=message):
        create_vhd(str(tmp_path / "x.vhd"), size, disk_type="dynamic")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("block_size", [2048, 3 * MiB, 512 * MiB])
def test_create_rejects_bad_block_sizes(tmp_path, block_size):
    with pytest.raises(DiskError, match="block size"):
        create_vhd(str(tmp_path / "x.vhd"), 4 * MiB, disk_type="dynamic", block_size=block_size)


def test_create_refuses_existing_files_and_odd_parents(tmp_path):
    path = str(tmp_path / "x.vhd")
    create_vhd(path, MiB, disk_type="dynamic")
    with pytest.raises(DiskError, match="already exists"):
        create_vhd(path, MiB, disk_type="dynamic")
    with pytest.raises(DiskError, match="needs a parent"):
        create_vhd(str(tmp_path / "y.vhd"), MiB, disk_type="differencing")
    with pytest.raises(DiskError, match="only a differencing"):
        create_vhd(str(tmp_path / "y.vhd"), MiB, disk_type="dynamic", parent_path=path)
    with pytest.raises(DiskError, match="parent's size"):
        create_vhd(str(tmp_path / "y.vhd"), 2 * MiB, disk_type="differencing", parent_path=path)
    raw = str(tmp_path / "raw.img")
    open(raw, "wb").write(bytes(MiB))
    with pytest.raises(DiskFormatError) as caught:
        create_vhd(str(tmp_path / "y.vhd"), None, disk_type="differencing", parent_path=raw)
    assert caught.value.reason == "vhd.footer.cookie"
    with pytest.raises(DiskError, match="unknown VHD type"):
        create_vhd(str(tmp_path / "y.vhd"), MiB, disk_type="sparse")


# -- geometry ----------------------------------------------------------------------------------


def test_standard_geometry_matches_the_spec_algorithm():
    # Worked values: qemu-img's default 10 MiB image, Virtual PC's 127 GiB ceiling, and a mid size.
    assert standard_geometry(20536) == (302, 4, 17)
    assert standard_geometry(2**40) == MAX_GEOMETRY
    assert standard_geometry(4 * 1024 * 1024 * 2) == (8322, 16, 63)
    assert standard_geometry(65535 * 16 * 63) == (16191, 16, 255)


@given(st.integers(1, MAX_DISK_SIZE // 512))
def test_new_geometry_always_yields_the_exact_size(sectors):
    geometry = geometry_for_size(sectors * 512)
    assert geometry == MAX_GEOMETRY or geometry_sectors(geometry) == sectors
    standard = standard_geometry(sectors)
    assert geometry_sectors(standard) <= sectors  # the spec's algorithm never rounds up


# -- crash ordering ----------------------------------------------------------------------------


class FileOps:
    """Records the pwrite, ftruncate and fdatasync calls made on one descriptor (while letting them
    happen), so that the states a power loss could leave can be rebuilt afterwards."""

    def __init__(self, monkeypatch, fd: int):
        self.ops: list[tuple] = []
        real_pwrite, real_ftruncate, real_sync = os.pwrite, os.ftruncate, os.fdatasync

        def pwrite(target, data, offset):
            if target == fd:
                self.ops.append(("write", offset, bytes(data)))
            return real_pwrite(target, data, offset)

        def ftruncate(target, length):
            if target == fd:
                self.ops.append(("truncate", length))
            return real_ftruncate(target, length)

        def fdatasync(target):
            if target == fd:
                self.ops.append(("sync",))
            return real_sync(target)

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def crash_states(self, limit: int = 32):
        """(ops that reached the file, every op issued so far was durable) for a power loss after each
        op: all ops before the last completed sync, plus any subset (sampled) of the later ones."""
        rng = np.random.default_rng(7)
        for issued in range(len(self.ops) + 1):
            synced = max((i for i in range(issued) if self.ops[i][0] == "sync"), default=-1) + 1
            durable = [op for op in self.ops[:synced] if op[0] != "sync"]
            pending = [op for op in self.ops[synced:issued] if op[0] != "sync"]
            masks = range(2 ** len(pending))
            if len(masks) > limit:
                masks = sorted({0, len(masks) - 1, *rng.integers(0, len(masks), limit - 2).tolist()})
            for mask in masks:
                kept = [op for i, op in enumerate(pending) if mask >> i & 1]
                yield durable + kept, not pending and issued == len(self.ops)


def replay(path: str, ops: list[tuple]) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for op in ops:
            if op[0] == "write":
                os.pwrite(fd, op[2], op[1])
            else:
                os.ftruncate(fd, op[1])
    finally:
        os.close(fd)


def sectors_each_old_or_new(content: bytes, old: bytes, new: bytes) -> bool:
    def sectors(data):
        return np.frombuffer(bytes(data), dtype=np.uint8).reshape(-1, SECTOR)

    got = sectors(content)
    return bool(((got == sectors(old)).all(axis=1) | (got == sectors(new)).all(axis=1)).all())


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
@pytest.mark.parametrize(
    "offset, length",
    [(0, 3 * 64 * KiB), (64 * KiB - 1536, 64 * KiB + 3072), (64 * KiB + 100, 700), (3 * 64 * KiB, 512)],
    ids=["new blocks", "new and existing blocks", "bits in an existing block", "one new sector"],
)
def test_power_loss_at_any_point_leaves_a_valid_disk(tmp_path, monkeypatch, kind, offset, length):
    """A write then flush, with a power loss after any of its file operations, losing any subset of
    what was not yet synced: the file must open, every sector must hold its old or its new content
    (all new once the flush returned), and the disk must keep working."""
    size, bs = 4 * 64 * KiB, 64 * KiB
    parent = None
    old = bytearray(size)
    if kind == "differencing":
        parent = str(tmp_path / "parent.vhd")
        create_vhd(parent, size, disk_type="dynamic", block_size=bs)
        with VhdDisk.open(parent) as disk:
            disk.write(0, pattern(0, size))
        old[:] = pattern(0, size)
    baseline = str(tmp_path / "baseline.vhd")
    create_vhd(baseline, None if parent else size, disk_type=kind, block_size=bs, parent_path=parent)
    with VhdDisk.open(baseline) as disk:
        disk.write(bs + 4096, pattern(1, 8192))
        old[bs + 4096:bs + 4096 + 8192] = pattern(1, 8192)
    new = bytearray(old)
    new[offset:offset + length] = pattern(2, length)

    work = str(tmp_path / "work.vhd")
    shutil.copyfile(baseline, work)
    with VhdDisk.open(work) as disk:
        with monkeypatch.context() as patch:
            recorder = FileOps(patch, disk._fd)
            disk.write(offset, pattern(2, length))
            disk.flush()
    assert any(op[0] == "sync" for op in recorder.ops)

    states = 0
    for ops, all_durable in recorder.crash_states():
        shutil.copyfile(baseline, work)
        replay(work, ops)
        with VhdDisk.open(work) as disk:
            content = disk.read(0, size)
            assert sectors_each_old_or_new(content, old, new), ops
            if all_durable:
                assert content == new
            disk.write(size - 1000, b"later" * 200)
        with VhdDisk.open(work, read_only=True) as disk:
            assert disk.read(size - 1000, 1000) == b"later" * 200
        states += 1
    assert states > len(recorder.ops)


# -- malformed files ---------------------------------------------------------------------------


@pytest.fixture
def dynamic_file(tmp_path):
    """A dynamic disk with three allocated 64 KiB blocks."""
    path = str(tmp_path / "d.vhd")
    create_vhd(path, MiB, disk_type="dynamic", block_size=64 * KiB)
    with VhdDisk.open(path) as disk:
        for i in (0, 3, 7):
            disk.write(i * 64 * KiB, pattern(i, 64 * KiB))
    return path


def poke(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset if offset >= 0 else os.path.getsize(path) + offset)
        f.write(data)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset if offset >= 0 else os.path.getsize(path) + offset)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x41]))


def rewrite_header(path: str, **changes) -> None:
    """Change dynamic header fields and re-checksum, so only the change itself is wrong."""
    with open(path, "rb") as f:
        f.seek(512)
        header = DynamicHeader.unpack(f.read(1024))
    poke(path, 512, dataclasses.replace(header, **changes).pack())


def rewrite_footer(path: str, both: bool = True, **changes) -> None:
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        footer = Footer.unpack(f.read(512))
    packed = dataclasses.replace(footer, **changes).pack()
    poke(path, -512, packed)
    if both:
        poke(path, 0, packed)


def expect_format_error(path: str, reason: str, error=DiskFormatError) -> None:
    with pytest.raises(error) as caught:
        VhdDisk.open(path, read_only=True).close()
    assert caught.value.reason == reason, caught.value


@pytest.mark.timeout(20)
def test_damaged_trailing_footer_falls_back_to_the_copy(dynamic_file):
    expected = VhdDisk.open(dynamic_file, read_only=True)
    content = expected.read(0, MiB)
    expected.close()
    flip(dynamic_file, -512 + 70)
    with VhdDisk.open(dynamic_file) as disk:
        assert disk.read(0, MiB) == content
        disk.write(9 * 64 * KiB, b"x" * 512)      # appends a block: the footer is rewritten
    raw = open(dynamic_file, "rb").read()
    assert raw[:512] == raw[-512:]
    with VhdDisk.open(dynamic_file, read_only=True) as disk:
        assert disk.read(0, 9 * 64 * KiB) == content[:9 * 64 * KiB]


@pytest.mark.timeout(20)
def test_old_511_byte_footer_is_read(tmp_path, dynamic_file):
    fixed = str(tmp_path / "f.vhd")
    create_vhd(fixed, MiB, disk_type="fixed")
    with VhdDisk.open(fixed) as disk:
        disk.write(MiB - 512, b"\7" * 512)
    for path in (fixed, dynamic_file):
        with VhdDisk.open(path, read_only=True) as disk:
            content = disk.read(0, MiB)
        os.truncate(path, os.path.getsize(path) - 1)   # the last reserved byte is zero: checksum holds
        assert disks.detect_format(path) == "vhd"
        with VhdDisk.open(path, read_only=True) as disk:
            assert disk.size == MiB and disk.read(0, MiB) == content
    with VhdDisk.open(dynamic_file) as disk:
        disk.write(10 * 64 * KiB, b"y" * 512)
    assert os.path.getsize(dynamic_file) % 512 == 0
    with VhdDisk.open(dynamic_file, read_only=True) as disk:
        assert disk.read(0, MiB)[:10 * 64 * KiB] == content[:10 * 64 * KiB]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: os.truncate(p, 300), "vhd.footer.truncated"),
        (lambda p: open(p, "wb").write(b"\0" * 4096), "vhd.footer.cookie"),
        (lambda p: (flip(p, -512 + 20), flip(p, 20)), "vhd.footer.checksum"),
        (lambda p: (flip(p, -512), flip(p, 0)), "vhd.footer.cookie"),
        (lambda p: flip(p, 512 + 30), "vhd.dynamic-header.checksum"),
        (lambda p: flip(p, 512), "vhd.dynamic-header.cookie"),
        (lambda p: os.truncate(p, os.path.getsize(p) - 4096), "vhd.bat.entry-beyond-file"),
        (lambda p: poke(p, 1536 + 4, struct.pack(">I", 0x7FFFFFF0)), "vhd.bat.entry-beyond-file"),
        (lambda p: poke(p, 1536 + 4, open(p, "rb").read()[1536:1540]), "vhd.bat.overlap"),
        (lambda p: poke(p, 1536 + 4, struct.pack(">I", 2)), "vhd.bat.overlap"),
        (lambda p: rewrite_header(p, max_table_entries=0xFFFFFFFF), "vhd.bat.beyond-file"),
        (lambda p: rewrite_header(p, max_table_entries=3), "vhd.dynamic-header.max-table-entries"),
        (lambda p: rewrite_header(p, block_size=3 * 64 * KiB), "vhd.dynamic-header.block-size"),
        (lambda p: rewrite_header(p, block_size=1 << 31), "vhd.dynamic-header.block-size"),
        (lambda p: rewrite_header(p, table_offset=1 << 40), "vhd.bat.beyond-file"),
        (lambda p: rewrite_header(p, table_offset=600), "vhd.bat.overlap"),
        (lambda p: rewrite_header(p, version=0x20000), "vhd.dynamic-header.version"),
        (lambda p: rewrite_footer(p, disk_type=5), "vhd.footer.disk-type"),
        (lambda p: rewrite_footer(p, current_size=MiB + 100), "vhd.footer.disk-size"),
        (lambda p: rewrite_footer(p, current_size=4 * MiB), "vhd.dynamic-header.max-table-entries"),
        (lambda p: rewrite_footer(p, current_size=1 << 50), "vhd.footer.disk-size"),
        (lambda p: rewrite_footer(p, data_offset=1 << 40), "vhd.dynamic-header.beyond-file"),
        (lambda p: rewrite_footer(p, data_offset=100), "vhd.footer.data-offset"),
        (lambda p: rewrite_footer(p, version=0x30000), "vhd.footer.version"),
        # The footer at the end gone, and the copy claiming a fixed disk, which has no copy.
        (lambda p: (rewrite_footer(p, disk_type=2), poke(p, -512, bytes(512))), "vhd.footer.missing"),
    ],
)
def test_malformed_dynamic_disks_are_refused(dynamic_file, damage, reason):
    damage(dynamic_file)
    expect_format_error(dynamic_file, reason)


@pytest.mark.timeout(20)
def test_malformed_fixed_disks_are_refused(tmp_path):
    path = str(tmp_path / "f.vhd")
    create_vhd(path, MiB, disk_type="fixed")
    flip(path, -512 + 40)
    expect_format_error(path, "vhd.footer.checksum")
    create_vhd(path + "2", MiB, disk_type="fixed")
    rewrite_footer(path + "2", both=False, current_size=2 * MiB)
    expect_format_error(path + "2", "disk.file.truncated")


@pytest.fixture
def chain(tmp_path):
    parent, child = str(tmp_path / "parent.vhd"), str(tmp_path / "child.vhd")
    create_vhd(parent, MiB, disk_type="dynamic")
    create_vhd(child, None, disk_type="differencing", parent_path=parent)
    return parent, child


@pytest.mark.timeout(20)
def test_missing_parent(chain):
    parent, child = chain
    os.unlink(parent)
    expect_format_error(child, "disk.parent.not-found", ParentError)


@pytest.mark.timeout(20)
def test_replaced_parent_is_refused(chain):
    parent, child = chain
    os.unlink(parent)
    create_vhd(parent, MiB, disk_type="dynamic")
    expect_format_error(child, "disk.parent.identity-mismatch", ParentError)


@pytest.mark.timeout(20)
def test_parent_that_is_not_a_vhd(chain):
    parent, child = chain
    open(parent, "wb").write(bytes(MiB))
    expect_format_error(child, "disk.parent.unusable", ParentError)


@pytest.mark.timeout(20)
def test_parent_loop(tmp_path, chain):
    parent, child = chain
    # parent.vhd becomes a child of child.vhd: child -> parent -> child.
    looped = str(tmp_path / "looped.vhd")
    create_vhd(looped, None, disk_type="differencing", parent_path=child)
    os.replace(looped, parent)
    expect_format_error(child, "disk.parent.loop", ParentError)


@pytest.mark.timeout(20)
def test_chain_depth_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(parents, "MAX_CHAIN_DEPTH", 3)
    previous = str(tmp_path / "0.vhd")
    create_vhd(previous, MiB, disk_type="dynamic")
    for i in range(1, 4):
        path = str(tmp_path / f"{i}.vhd")
        create_vhd(path, None, disk_type="differencing", parent_path=previous)
        previous = path
    VhdDisk.open(previous, read_only=True).close()   # 4 files: 3 links
    deepest = str(tmp_path / "4.vhd")
    create_vhd(deepest, None, disk_type="differencing", parent_path=previous)
    expect_format_error(deepest, "disk.parent.chain-too-deep", ParentError)


@pytest.mark.timeout(20)
def test_locator_data_past_the_end(chain):
    _parent, child = chain
    with VhdDisk.open(child, read_only=True) as disk:
        header = disk.header
    bad = dataclasses.replace(header.locators[0], data_offset=1 << 40)
    rewrite_header(child, locators=(bad, *header.locators[1:]))
    expect_format_error(child, "vhd.parent-locator.beyond-file")


@settings(max_examples=150, deadline=None)
@given(
    target=st.sampled_from(["footer copy", "header", "bat", "bitmap", "trailing footer", "locator"]),
    offset=st.integers(0, 1023),
    value=st.integers(0, 255),
    count=st.integers(1, 8),
)
def test_random_damage_never_escapes_as_another_error(target, offset, value, count):
    """Bytes overwritten anywhere in the metadata: the disk opens and reads, or DiskFormatError."""
    with tempfile.TemporaryDirectory() as tmp:
        parent, child = os.path.join(tmp, "p.vhd"), os.path.join(tmp, "c.vhd")
        create_vhd(parent, 256 * KiB, disk_type="dynamic", block_size=64 * KiB)
        create_vhd(child, None, disk_type="differencing", parent_path=parent, block_size=64 * KiB)
        with VhdDisk.open(child) as disk:
            disk.write(3 * 512, b"z" * 700)
            block = disk.bat.location(0)
        starts = {"footer copy": 0, "header": 512, "bat": 1536, "bitmap": block,
                  "trailing footer": os.path.getsize(child) - 512, "locator": 2048}
        at = min(starts[target] + offset % (1024 if target == "header" else 512), os.path.getsize(child) - count)
        poke(child, at, bytes([value]) * count)
        try:
            disk = VhdDisk.open(child)
        except DiskFormatError as exc:
            assert str(exc)
            return
        with disk:
            disk.read(0, disk.size)
            list(disk.extents())
            disk.write(100 * 512, b"w" * 512)
            assert disk.read(100 * 512, 512) == b"w" * 512


def test_guest_data_that_looks_like_a_footer_never_ends_the_file(tmp_path, monkeypatch):
    """A block is appended where the old footer was. If the process dies before the new footer is
    written and the block ends in a sector that is a valid fixed-disk footer, that sector must not
    become the file's footer: hvbackup writes the new footer first."""
    path = str(tmp_path / "d.vhd")
    create_vhd(path, 4 * MiB, disk_type="dynamic", block_size=64 * KiB)
    lookalike = Footer(disk_type=2, current_size=MiB, geometry=(1, 1, 1), unique_id=uuid.uuid4()).pack()

    class Crash(Exception):
        pass

    real_write = diskmod.write_at

    def crash_after_the_data(fd, data, offset):
        real_write(fd, data, offset)
        if bytes(data) == lookalike:
            raise Crash
    with VhdDisk.open(path) as disk:
        monkeypatch.setattr(diskmod, "write_at", crash_after_the_data)
        with pytest.raises(Crash):
            disk.write(64 * KiB - 512, lookalike)  # the last sector of the first block
        monkeypatch.undo()
        disk._release()
        disk.closed = True
    with VhdDisk.open(path, read_only=True) as disk:
        assert disk.disk_type == "dynamic" and disk.size == 4 * MiB


def test_a_huge_declared_bat_in_a_sparse_file_is_not_read_whole(tmp_path):
    """The table may declare far more entries than the disk uses; only the used ones are read."""
    import time
    import tracemalloc

    path = str(tmp_path / "d.vhd")
    create_vhd(path, 64 * MiB, disk_type="dynamic")
    rewrite_header(path, max_table_entries=1 << 28)
    with open(path, "r+b") as f:  # room for the declared table, as holes, then the footer again
        footer = f.read(512)
        f.truncate(2 << 30)
        f.seek(0, os.SEEK_END)
        f.write(footer)
    tracemalloc.start()
    started = time.monotonic()
    with VhdDisk.open(path, read_only=True) as disk:
        assert disk.read(0, 512) == bytes(512)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * MiB and time.monotonic() - started < 5
