"""Damaged and hostile VHDX files: every one gets a clear DiskFormatError (exit 2 and one line from
the CLI) — never another exception, a hang, or a huge allocation. A hypothesis fuzzer mutates the
metadata area of real files and checks the same for whatever it produces. A filesystem that fills
up gives a DiskError naming the file."""

from __future__ import annotations

import ast
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_vhdx_disk import leave_log_pending

from hvbackup import disks, stack, tracking
from hvbackup.disks.check import check
from hvbackup.disks.vhdx import region
from hvbackup.disks.vhdx.checksum import crc32c_with_zeroed_field
from hvbackup.disks.vhdx.create import BAT_OFFSET, METADATA_OFFSET
from hvbackup.errors import DiskError, DiskFormatError, HvBackupError, ParentError
from hvbackup.units import MiB

HEADER_1, HEADER_2 = 64 * 1024, 128 * 1024


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A small dynamic disk with data, a differencing child of it, and a disk whose last commit was
    cut off after its log entry was written (so opening it must replay the log)."""
    root = tmp_path_factory.mktemp("images")
    base, child, pending = root / "base.vhdx", root / "child.vhdx", root / "pending.vhdx"
    with disks.create(base, 8 * MiB, block_size=MiB) as d:
        d.write(0, b"\xab" * 3 * MiB)
    with disks.create(child, type="differencing", parent=base, block_size=MiB) as c:
        c.write(MiB + 512, b"\xcd" * 4096)
    disk = disks.create(pending, 8 * MiB, block_size=MiB)
    disk.write(2 * MiB, b"\xef" * MiB)
    with pytest.MonkeyPatch.context() as patch:
        leave_log_pending(disk, patch)
    return {"base": base, "child": child, "pending": pending}


def damaged(images, tmp_path, change, name: str = "base") -> Path:
    """A copy of an image (its parent copied along) with ``change(bytearray)`` applied."""
    for source in images.values():
        shutil.copy(source, tmp_path / source.name)
    target = tmp_path / images[name].name
    data = bytearray(target.read_bytes())
    result = change(data)
    target.write_bytes(bytes(result if isinstance(result, bytearray) else data))
    return target


def flip(offset: int):
    def change(data: bytearray):
        data[offset] ^= 0x10
    return change


def put(offset: int, fmt: str, *values, recrc: int | None = None, crc_span: int = 0):
    """Overwrite a field; with ``recrc`` recompute the structure's checksum so only the field is wrong."""
    def change(data: bytearray):
        struct.pack_into(fmt, data, offset, *values)
        if recrc is not None:
            struct.pack_into("<I", data, recrc + 4, crc32c_with_zeroed_field(data[recrc:recrc + crc_span], 4))
    return change


def _bat_entry_offset(index: int) -> int:
    return BAT_OFFSET + 8 * index


FATAL = {
    "empty file": lambda d: bytearray(),
    "truncated inside the header section": lambda d: d[:100_000],
    "truncated inside the BAT": lambda d: d[:BAT_OFFSET + 4096],
    "truncated inside a data block": lambda d: d[:len(d) - MiB // 2],
    "signature": flip(0),
    "both headers": lambda d: [flip(HEADER_1 + 20)(d), flip(HEADER_2 + 20)(d)],
    "both region tables": lambda d: [flip(region.OFFSETS[0] + 20)(d), flip(region.OFFSETS[1] + 20)(d)],
    "metadata table signature": flip(METADATA_OFFSET),
    "absurd metadata entry count": put(METADATA_OFFSET + 10, "<H", 60000),
    "absurd region entry count": lambda d: [
        put(o + 8, "<I", 5000, recrc=o, crc_span=64 * 1024)(d) for o in region.OFFSETS],
    "regions overlap": lambda d: [
        put(o + 16 + 16, "<Q", METADATA_OFFSET, recrc=o, crc_span=64 * 1024)(d) for o in region.OFFSETS],
    "region past the end of the file": lambda d: [
        put(o + 16 + 16, "<Q", 1 << 40, recrc=o, crc_span=64 * 1024)(d) for o in region.OFFSETS],
    "BAT entry points outside the file": put(_bat_entry_offset(0), "<Q", (1 << 30) << 20 | 6),
    "BAT entry in the header section": put(_bat_entry_offset(0), "<Q", 6),
    "two BAT entries share a block": lambda d: d.__setitem__(
        slice(_bat_entry_offset(1), _bat_entry_offset(1) + 8), d[_bat_entry_offset(0):_bat_entry_offset(0) + 8]),
    "BAT reserved bits": put(_bat_entry_offset(0), "<Q", 6 | 1 << 12),
    "BAT state not allowed in a dynamic disk": put(_bat_entry_offset(0), "<Q", 7),
}
# The reason code each damage is refused with.
FATAL_REASONS = {
    "empty file": "disk.file.empty",
    "truncated inside the header section": "disk.file.truncated",
    "truncated inside the BAT": "vhdx.region.beyond-file",
    "truncated inside a data block": "vhdx.bat.entry-beyond-file",
    "signature": "vhdx.identifier.damaged",
    "both headers": "vhdx.header.checksum",
    "both region tables": "vhdx.region.checksum",
    "metadata table signature": "vhdx.metadata.signature",
    "absurd metadata entry count": "vhdx.metadata.entry-count",
    "absurd region entry count": "vhdx.region.entry-count",
    "regions overlap": "vhdx.region.overlap",
    "region past the end of the file": "vhdx.region.beyond-file",
    "BAT entry points outside the file": "vhdx.bat.entry-beyond-file",
    "BAT entry in the header section": "vhdx.bat.entry-beyond-file",
    "two BAT entries share a block": "vhdx.layout.overlap",
    "BAT reserved bits": "vhdx.bat.reserved-bits",
    "BAT state not allowed in a dynamic disk": "vhdx.bat.state",
}


@pytest.mark.parametrize("case", sorted(FATAL))
def test_fatal_damage_is_a_clear_error(images, tmp_path, case):
    path = damaged(images, tmp_path, FATAL[case])
    started = time.monotonic()
    with pytest.raises(DiskFormatError) as caught:
        disks.open(path, read_only=True)
    assert time.monotonic() - started < 5
    assert str(path.name) in str(caught.value) or "parent" in str(caught.value)
    assert caught.value.reason == FATAL_REASONS[case]
    assert not check(str(path)).ok  # a damaged file is reported, even an empty one, never raised
    result = subprocess.run([sys.executable, "-m", "hvbackup", "disk", "info", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("hvbackup: error:"), result.stderr
    assert "Traceback" not in result.stderr


REASON_CODE = re.compile(r"(disk|raw|vhd|vhdx|rct|mrt)\.[a-z]+(-[a-z]+)*\.[a-z]+(-[a-z]+)*")
ROOT = Path(__file__).resolve().parents[2]


def test_every_reason_code_is_documented_and_every_documented_code_is_raised():
    """Reason codes are string literals in src/hvbackup; the tables of docs/disks.md and
    docs/tracking.md list them, one row each."""
    in_source = set()
    for module in (ROOT / "src" / "hvbackup").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and REASON_CODE.fullmatch(node.value):
                in_source.add(node.value)
    rows = [m.group(1) for doc in ("disks.md", "tracking.md")
            for m in re.finditer(r"^\| `([^`]+)` \|", (ROOT / "docs" / doc).read_text(), re.MULTILINE)
            if REASON_CODE.fullmatch(m.group(1))]
    documented = set(rows)
    assert len(rows) == len(documented), "a code has two rows"
    assert in_source - documented == set(), "raised but not documented"
    assert documented - in_source == set(), "documented but never raised"
    assert len(in_source) > 90


LOG_ENTRY = MiB  # the log starts at 1 MiB; a session's first entry is written at its start


@pytest.mark.parametrize("where", ["entry header", "descriptor", "data sector", "log GUID in the header"])
def test_a_damaged_pending_log_is_refused(images, tmp_path, where):
    """With LogGuid set the log must replay; if no valid sequence remains the file is not opened."""
    offset = {"entry header": LOG_ENTRY + 20, "descriptor": LOG_ENTRY + 64 + 8,
              "data sector": LOG_ENTRY + 4096 + 100}.get(where)
    if offset is None:  # both headers name another log GUID (checksums recomputed)
        def change(data: bytearray):
            for at in (HEADER_1, HEADER_2):
                data[at + 48] ^= 1
                struct.pack_into("<I", data, at + 4, crc32c_with_zeroed_field(data[at:at + 4096], 4))
    else:
        change = flip(offset)
    path = damaged(images, tmp_path, change, name="pending")
    for read_only in (True, False):
        with pytest.raises(DiskFormatError) as caught:
            disks.open(path, read_only=read_only)
        assert caught.value.reason == "vhdx.log.sequence"


def test_the_pending_log_image_replays(images):
    with disks.open(images["pending"], read_only=True) as d:
        assert d.log_pending and d.read(2 * MiB, 4) == b"\xef" * 4


@pytest.mark.parametrize("field, reason", [
    ("virtual size", "vhdx.metadata.virtual-size"),
    ("block size", "vhdx.metadata.block-size"),
    ("logical sector size", "vhdx.metadata.logical-sector-size"),
    ("required item", "vhdx.metadata.unknown-required"),
])
def test_bad_metadata_values(images, tmp_path, field, reason):
    from hvbackup.disks.vhdx.metadata import Metadata

    def change(data: bytearray):
        region_bytes = bytes(data[METADATA_OFFSET:METADATA_OFFSET + MiB])
        md = Metadata.read(lambda off, n: region_bytes[off:off + n], MiB)
        import dataclasses

        from hvbackup.disks.vhdx.metadata import FileParameters, MetadataEntry
        if field == "virtual size":
            md = dataclasses.replace(md, virtual_size=1 << 62)
        elif field == "block size":
            md = dataclasses.replace(md, file_parameters=FileParameters(3 * MiB))
        elif field == "logical sector size":
            md = dataclasses.replace(md, logical_sector_size=1000)
        else:
            md = dataclasses.replace(md, other_items=((MetadataEntry(uuid.uuid4(), 0, 4, is_required=True), b"new!"),))
        data[METADATA_OFFSET:METADATA_OFFSET + MiB] = md.pack(MiB)

    with pytest.raises(DiskFormatError) as caught:
        disks.open(damaged(images, tmp_path, change), read_only=True)
    assert caught.value.reason == reason


def test_one_damaged_copy_is_survived_reported_and_repaired(images, tmp_path):
    path = damaged(images, tmp_path, lambda d: [flip(HEADER_1 + 20)(d), flip(region.OFFSETS[0] + 20)(d)])
    with disks.open(path, read_only=True) as d:
        assert d.read(0, 4) == b"\xab" * 4
    report = check(str(path))
    assert len(report.problems) == 2
    repaired = check(str(path), repair=True)
    assert repaired.ok and len(repaired.repaired) == 2
    result = subprocess.run([sys.executable, "-m", "hvbackup", "disk", "check", str(path)], capture_output=True)
    assert result.returncode == 0


def test_missing_parent(tmp_path):
    disks.create(tmp_path / "base.vhdx", 4 * MiB).close()
    disks.create(tmp_path / "child.vhdx", type="differencing", parent=tmp_path / "base.vhdx").close()
    os.unlink(tmp_path / "base.vhdx")
    with pytest.raises(ParentError) as caught:
        disks.open(tmp_path / "child.vhdx", read_only=True)
    assert caught.value.reason == "disk.parent.not-found"


def test_parent_loop_is_detected(tmp_path):
    """a -> b -> a: each child names the other as parent with a matching linkage."""
    base = tmp_path / "base.vhdx"
    disks.create(base, 4 * MiB).close()
    a, b = tmp_path / "a.vhdx", tmp_path / "b.vhdx"
    disks.create(a, type="differencing", parent=base).close()
    disks.create(b, type="differencing", parent=a).close()
    import dataclasses

    from hvbackup.disks.vhdx.disk import VhdxDisk
    from hvbackup.disks.vhdx.locator import ParentLocator, format_linkage

    with VhdxDisk.open(str(b), read_only=True) as disk_b:
        b_guid = disk_b.data_write_guid
    with VhdxDisk.open(str(a)) as disk_a:
        locator = ParentLocator({"parent_linkage": format_linkage(b_guid), "relative_path": "b.vhdx"})
        disk_a._rewrite_metadata(dataclasses.replace(disk_a.metadata, parent_locator=locator))
    started = time.monotonic()
    with pytest.raises(ParentError) as caught:
        disks.open(b, read_only=True)
    assert caught.value.reason == "disk.parent.loop"
    assert time.monotonic() - started < 5


def _fuzz_source(images) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in images.items()}


@pytest.mark.slow
@settings(deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_metadata_area(images, tmp_path_factory, data):
    """Random byte changes in the header, log, metadata and BAT areas, and random truncation."""
    name = data.draw(st.sampled_from(["base", "child", "pending"]))
    work = tmp_path_factory.mktemp("fuzz")
    for source in images.values():
        shutil.copy(source, work / source.name)
    target = work / images[name].name
    blob = bytearray(target.read_bytes())
    spots = data.draw(st.lists(st.tuples(
        st.sampled_from([0, HEADER_1, HEADER_2, *region.OFFSETS, LOG_ENTRY, METADATA_OFFSET, BAT_OFFSET]),
        st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8))
    for base_offset, delta, value in spots:
        blob[base_offset + delta] = value
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    target.write_bytes(bytes(blob))
    tracemalloc.start()
    started = time.monotonic()
    try:
        with disks.open(target, read_only=data.draw(st.booleans())) as disk:
            disk.read(0, disk.size)
            list(disk.extents())
    except HvBackupError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - started < 10
    assert peak < 256 * MiB
    shutil.rmtree(work)


def _rewrite_headers(data: bytearray, **changes) -> None:
    """Change fields in both headers and recompute their checksums."""
    import dataclasses

    from hvbackup.disks.vhdx.header import Header

    for at in (HEADER_1, HEADER_2):
        h = Header.unpack(bytes(data[at:at + 4096]))
        data[at:at + 4096] = dataclasses.replace(h, **changes).pack()


def test_a_log_past_the_end_of_the_file_is_refused(images, tmp_path):
    path = damaged(images, tmp_path, lambda d: _rewrite_headers(d, log_offset=1 << 62))
    with pytest.raises(DiskFormatError) as caught:
        disks.open(path, read_only=True)
    assert caught.value.reason == "vhdx.log.beyond-file"


def test_a_foreign_log_version_opens_read_only_only(images, tmp_path):
    path = damaged(images, tmp_path, lambda d: _rewrite_headers(d, log_version=1))
    with disks.open(path, read_only=True) as d:
        assert d.read(0, 4) == b"\xab" * 4
    with pytest.raises(DiskFormatError) as caught:
        disks.open(path)
    assert caught.value.reason == "vhdx.log.not-writable"


def _log_entry(guid: uuid.UUID, sequence: int, *, last: int, zero_at: int | None = None) -> bytes:
    """One log entry: no data sectors, and a zero descriptor if ``zero_at`` is given."""
    from hvbackup.disks.vhdx import log

    entry = bytearray(4096)
    count = 0 if zero_at is None else 1
    struct.pack_into("<4sIIIQII16sQQ", entry, 0, b"loge", 0, 4096, 0, sequence, count, 0, guid.bytes_le, 0, last)
    if zero_at is not None:
        struct.pack_into("<4sIQQQ", entry, 64, b"zero", 0, 4096, zero_at, sequence)
    struct.pack_into("<I", entry, 4, log.crc32c_with_zeroed_field(entry, 4))
    return bytes(entry)


@pytest.mark.parametrize("case", ["last file offset beyond any file", "zero descriptor past the filesystem limit"])
def test_hostile_log_entries(images, tmp_path, case):
    from hvbackup.disks.vhdx.header import Header

    guid = Header.unpack(images["pending"].read_bytes()[HEADER_1:HEADER_1 + 4096]).log_guid
    if case.startswith("last"):
        entry = _log_entry(guid, 99, last=(1 << 64) - (1 << 20))
    else:
        entry = _log_entry(guid, 99, last=0, zero_at=100 << 40)

    def change(data: bytearray):
        data[LOG_ENTRY:LOG_ENTRY + 4096] = entry

    path = damaged(images, tmp_path, change, name="pending")
    with pytest.raises(HvBackupError):
        with disks.open(path) as d:
            d.read(0, 4096)


def test_searching_a_forged_log_is_fast():
    """Every 4 KiB of a 64 MiB log claims to start an entry as long as the log: each claim is
    refused by its descriptors before the long read and checksum it asks for."""
    from hvbackup.disks.vhdx.replay import MAX_LOG_LENGTH, find_active_sequence

    guid = uuid.uuid4()
    head = bytearray(4096)
    struct.pack_into("<4sIIIQII16sQQ", head, 0, b"loge", 0, MAX_LOG_LENGTH, 0, 5, 126, 0, guid.bytes_le, 0, 0)
    started = time.monotonic()
    with pytest.raises(DiskFormatError) as caught:
        find_active_sequence(bytes(head) * (MAX_LOG_LENGTH // 4096), guid)
    assert caught.value.reason == "vhdx.log.sequence"
    assert time.monotonic() - started < 20


@pytest.fixture
def small_filesystem(small_fs):
    return small_fs(4 * MiB)


@pytest.mark.parametrize("name", ["disk.vhdx", "disk.vhd", "disk.raw", "tracked.vhdx"])
def test_a_full_filesystem_is_an_error_naming_the_disk(small_filesystem, name):
    path = small_filesystem / name
    disks.create(path, 64 * MiB).close()
    if name.startswith("tracked"):
        tracking.enable(path)
    with pytest.raises(DiskError, match="No space left on device") as caught:
        with stack.open(path) as disk:
            disk.write(0, b"\x77" * 8 * MiB)
    assert str(path) in str(caught.value)  # the disk, or (tracked) its side file the seal could not save


def test_no_room_to_create_a_disk_or_save_tracking_is_an_error_naming_the_file(small_filesystem):
    tracked = small_filesystem / "tracked.vhdx"
    disks.create(tracked, 64 * MiB).close()
    (small_filesystem / "filler").write_bytes(b"")
    with open(small_filesystem / "filler", "wb") as f, pytest.raises(OSError):
        f.write(bytes(8 * MiB))  # fills the filesystem
    for name in ("new.vhdx", "new.vhd"):
        with pytest.raises(DiskError, match="No space left on device") as caught:
            disks.create(small_filesystem / name, 64 * MiB)
        assert name in str(caught.value) and not os.path.exists(small_filesystem / name)
    with pytest.raises(DiskError, match="No space left on device") as caught:
        tracking.enable(tracked)
    assert "tracked.vhdx" in str(caught.value)
    assert sorted(os.listdir(small_filesystem)) == ["filler", "tracked.vhdx"]  # no half-written files left
