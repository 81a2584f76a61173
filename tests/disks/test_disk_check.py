"""``disks.check``: every damage the engine can detect is a problem, a name that claims a format the
file does not have is a problem, ``repair`` fixes what it can without losing data and says what it
did, and a damaged file is reported, never raised. Also the rules the name sets for new files
(``disks.format_for_path``)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import subprocess
import sys
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_vhdx_disk import leave_log_pending

from hvbackup import disks, stack, tracking
from hvbackup.disks import CheckReport, check, format_for_path
from hvbackup.disks.vhd.footer import Footer
from hvbackup.disks.vhdx import region
from hvbackup.disks.vhdx.create import BAT_OFFSET
from hvbackup.errors import DiskError
from hvbackup.units import KiB, MiB

HEADER_1 = 64 * KiB
CONTENT = [(0, b"\x5a" * MiB), (3 * MiB + 512, b"\xa5" * 8 * KiB)]


def make(path, fmt: str | None = None, **options) -> str:
    """A small disk holding CONTENT."""
    path = str(path)
    with disks.create(path, 8 * MiB, format=fmt, **options) as disk:
        for offset, data in CONTENT:
            disk.write(offset, data)
    return path


def contents(path: str) -> bytes:
    with disks.open(path, read_only=True) as disk:
        return disk.read(0, disk.size)


def patch(path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes; a negative offset counts from the end of the file."""
    with open(path, "r+b") as f:
        f.seek(offset if offset >= 0 else os.path.getsize(path) + offset)
        f.write(data)


def vhd_footer(path: str, offset: int) -> Footer:
    with open(path, "rb") as f:
        f.seek(offset if offset >= 0 else os.path.getsize(path) + offset)
        return Footer.unpack(f.read(512))


def repaired_intact(path: str, before: bytes, fixed: str) -> None:
    """Repair fixes it, says so, leaves nothing to report and every byte of the disk as it was."""
    report = check(path, repair=True)
    assert report.ok and any(fixed in line for line in report.repaired), report
    assert check(path).ok and contents(path) == before


# -- every damage the engine can detect is a problem -------------------------------------------

@pytest.mark.parametrize("name, fmt, options", [
    ("dynamic.vhdx", None, {"block_size": MiB}), ("fixed.vhdx", None, {"type": "fixed", "block_size": MiB}),
    ("dynamic.vhd", None, {}), ("fixed.vhd", None, {"type": "fixed"}), ("disk.raw", None, {}),
    ("disk.img", "vhdx", {}), ("untold", "vhd", {}),
])
def test_sound_disks_have_no_problems(tmp_path, name, fmt, options):
    report = check(make(tmp_path / name, fmt, **options))
    assert report.ok and report.problems == [] and report.repaired == [], report
    assert report.format == (fmt or disks.format_for_path(name))


def test_sound_differencing_chains_and_tracked_disks_have_no_problems(tmp_path):
    base = make(tmp_path / "base.vhdx", block_size=MiB)
    tracking.enable(base)
    disks.create(tmp_path / "child.avhdx", type="differencing", parent=base).close()
    old = make(tmp_path / "base.vhd")
    disks.create(tmp_path / "child.avhd", type="differencing", parent=old).close()
    for path in (base, tmp_path / "child.avhdx", tmp_path / "child.avhd"):
        assert check(path).ok, check(path)


def test_a_damaged_vhd_footer_at_the_end_is_reported_and_restored_from_the_copy(tmp_path):
    path = make(tmp_path / "d.vhd")
    before = contents(path)
    patch(path, -512 + 40, b"\xff")  # inside the footer: its checksum no longer matches
    assert "footer at the end of the file is invalid" in " ".join(check(path).problems)
    repaired_intact(path, before, "footer at the end")
    assert vhd_footer(path, -512) == vhd_footer(path, 0)


def test_a_vhd_footer_truncated_away_is_reported_and_restored(tmp_path):
    path = make(tmp_path / "d.vhd")
    before, size = contents(path), os.path.getsize(path)
    os.truncate(path, size - 512)
    assert "footer at the end of the file is missing" in " ".join(check(path).problems)
    repaired_intact(path, before, "footer at the end")
    assert os.path.getsize(path) == size


@pytest.mark.parametrize("damage", ["checksum", "overwritten", "different but valid"])
def test_a_damaged_or_different_vhd_footer_copy_is_reported_and_restored(tmp_path, damage):
    path = make(tmp_path / "d.vhd")
    before = contents(path)
    if damage == "checksum":
        patch(path, 40, b"\xff")
    elif damage == "overwritten":
        patch(path, 0, b"\0" * 512)
    else:
        other = dataclasses.replace(vhd_footer(path, 0), creator_app=b"othr")
        patch(path, 0, other.pack())
    assert any("footer copy at offset 0" in p for p in check(path).problems), check(path)
    repaired_intact(path, before, "footer copy at offset 0")
    assert vhd_footer(path, 0) == vhd_footer(path, -512)


def test_damage_that_stops_a_vhd_from_opening_is_a_problem_not_an_error(tmp_path):
    header = make(tmp_path / "header.vhd")
    patch(header, vhd_footer(header, -512).data_offset + 100, b"\xff\xff")
    fixed = make(tmp_path / "fixed.vhd", type="fixed")
    patch(fixed, -512 + 40, b"\xff")
    truncated = make(tmp_path / "truncated.vhd")
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    for path, why in ((header, "dynamic disk header checksum"), (fixed, "footer at the end of the file is invalid"),
                      (truncated, "past the end of the file")):
        report = check(path, repair=True)
        assert not report.ok and why in " ".join(report.problems), report
        assert report.repaired == []


def test_a_damaged_vhdx_file_identifier_is_reported_and_restored_from_the_headers(tmp_path):
    path = make(tmp_path / "d.vhdx", block_size=MiB)
    before = contents(path)
    patch(path, 0, b"garbage!" * 64)
    report = check(path)
    assert report.format == "vhdx" and "file type identifier" in report.problems[0], report
    repaired_intact(path, before, "file type identifier")


@pytest.mark.parametrize("copy", ["header", "region table"])
def test_one_damaged_vhdx_copy_is_reported_and_rewritten(tmp_path, copy):
    path = make(tmp_path / "d.vhdx", block_size=MiB)
    since = tracking.enable(path).most_recent_id
    before = contents(path)
    patch(path, (HEADER_1 if copy == "header" else region.OFFSETS[0]) + 20, b"\xff")
    assert any(copy in p for p in check(path).problems), check(path)
    repaired_intact(path, before, copy)
    # A repair changes nothing a reader sees: change tracking goes on, with nothing changed.
    assert tracking.status(path).state == "active" and tracking.query(path, since) == ([], 8 * MiB)


def test_a_pending_vhdx_log_is_reported_and_replayed(tmp_path, monkeypatch):
    path = str(tmp_path / "d.vhdx")
    disk = disks.create(path, 8 * MiB, block_size=MiB)
    disk.write(2 * MiB, b"\xef" * MiB)
    leave_log_pending(disk, monkeypatch)
    monkeypatch.undo()
    before = contents(path)
    assert "not yet applied" in " ".join(check(path).problems)
    repaired_intact(path, before, "replayed the log")


def test_damage_that_stops_a_vhdx_from_opening_is_a_problem_not_an_error(tmp_path):
    out_of_range = make(tmp_path / "bat.vhdx", block_size=MiB)
    patch(out_of_range, BAT_OFFSET, struct.pack("<Q", (1 << 30) << 20 | 6))
    headers = make(tmp_path / "headers.vhdx", block_size=MiB)
    patch(headers, HEADER_1, bytes(128 * KiB))
    truncated = make(tmp_path / "truncated.vhdx", block_size=MiB)
    os.truncate(truncated, os.path.getsize(truncated) - MiB // 2)
    for path, why in ((out_of_range, "BAT entry points outside the file"), (headers, "no valid VHDX header"),
                      (truncated, "outside the file")):
        report = check(path, repair=True)
        assert report.format == "vhdx" and why in " ".join(report.problems), report
        assert report.repaired == []


@pytest.mark.parametrize("fmt", ["vhdx", "vhd"])
def test_a_missing_or_replaced_parent_is_a_problem(tmp_path, fmt):
    base = make(tmp_path / f"base.{fmt}")
    child = str(tmp_path / f"child.a{fmt}")
    disks.create(child, type="differencing", parent=base).close()
    os.unlink(base)
    report = check(child)
    assert not report.ok and "parent not found" in report.problems[0], report
    make(base)  # another disk in its place
    report = check(child, repair=True)
    assert not report.ok and "parent" in report.problems[0] and report.repaired == [], report


def test_lost_change_tracking_is_a_problem(tmp_path):
    path = make(tmp_path / "d.vhdx")
    tracking.enable(path)
    patch(path + ".rct", 0, b"junk")
    report = stack.check(path)
    assert report.problems == [report.problems[0]] and "change tracking is lost" in report.problems[0], report
    assert check(path).ok  # the format alone knows nothing of tracking: the file itself is sound
    os.unlink(path + ".mrt")
    assert "change tracking is lost" in stack.check(path).problems[0]


# -- a name that claims a format the file does not have is a problem ---------------------------

@pytest.mark.parametrize("name, holds, says", [
    ("notes.vhdx", "text", "not one"), ("notes.vhd", "text", "not one"), ("empty.avhdx", "empty", "empty"),
    ("disk.vhdx", "vhd", "is a VHD"), ("disk.avhd", "vhdx", "is a VHDX"), ("disk.vhd", "raw", "not one"),
])
def test_a_name_that_claims_another_format_is_a_problem(tmp_path, name, holds, says):
    path = str(tmp_path / name)
    if holds == "text":
        with open(path, "w") as f:
            f.write("hello\n" * 1000)
    elif holds == "empty":
        open(path, "wb").close()
    else:
        make(tmp_path / f"source.{holds}")
        os.rename(tmp_path / f"source.{holds}", path)
    report = check(path, repair=True)
    claimed = "VHDX" if ".vhdx" in name or ".avhdx" in name else "VHD"
    assert any(p.startswith(f"the name says {claimed}") and says in p for p in report.problems), report
    assert report.repaired == []


def test_a_vhd_with_its_only_footer_gone_is_raw_but_its_name_is_reported(tmp_path):
    path = make(tmp_path / "fixed.vhd", type="fixed")
    patch(path, -512, b"\0" * 8)  # no cookie left anywhere
    report = check(path)
    assert report.format == "raw" and "the name says VHD, but the file is not one" in report.problems[0], report


def test_raw_names_claim_nothing(tmp_path):
    for name, fmt in (("a.img", "vhdx"), ("b.raw", "vhd")):
        assert check(make(tmp_path / name, fmt)).ok


# -- checking never raises for a damaged file; only for a path it cannot read -----------------

def test_a_path_that_cannot_be_read_is_an_error_naming_it(tmp_path):
    for path, why in ((tmp_path / "missing.vhdx", "No such file"), (tmp_path, "directory")):
        with pytest.raises(DiskError, match=why) as caught:
            check(path)
        assert str(path) in str(caught.value)


def test_an_unreadable_file_is_an_error_naming_it(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = make(tmp_path / "d.vhdx")
    os.chmod(path, 0)
    with pytest.raises(DiskError, match="Permission denied") as caught:
        check(path)
    assert path in str(caught.value)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("sources")
    made = {name: make(root / name, block_size=MiB if name.endswith("vhdx") else None)
            for name in ("d.vhdx", "d.vhd")}
    return {name: open(path, "rb").read() for name, path in made.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_damage_is_reported_never_raised(sources, tmp_path_factory, data):
    name = data.draw(st.sampled_from(sorted(sources)))
    blob = bytearray(sources[name])
    for _ in range(data.draw(st.integers(1, 6))):
        spot = data.draw(st.sampled_from([0, 512, 1024, HEADER_1, 2 * HEADER_1, *region.OFFSETS, MiB, 2 * MiB,
                                          BAT_OFFSET, len(blob) - 512]))
        at = min(len(blob) - 1, spot + data.draw(st.integers(0, 600)))
        blob[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del blob[data.draw(st.integers(0, len(blob))):]
    path = str(tmp_path_factory.mktemp("damaged") / name)
    with open(path, "wb") as f:
        f.write(blob)
    for repair in (False, True):
        report = check(path, repair=repair)
        assert isinstance(report, CheckReport) and report.ok == (not report.problems)
    shutil.rmtree(os.path.dirname(path))


def test_the_cli_lists_problems_and_exits_1_while_any_remain(tmp_path):
    path = make(tmp_path / "d.vhd")
    patch(path, 0, b"\0" * 512)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "hvbackup", "disk", "check", path, *args],
                              capture_output=True, text=True)

    found = run()
    assert found.returncode == 1 and "footer copy at offset 0" in found.stdout + found.stderr
    assert run("--repair").returncode == 0 and run().returncode == 0


# -- the name sets the format of a new file ---------------------------------------------------

@pytest.mark.parametrize("name, fmt", [("a.vhdx", "vhdx"), ("a.AVHDX", "vhdx"), ("a.vhd", "vhd"), ("a.avhd", "vhd"),
                                       ("a.raw", "raw"), ("a.img", "raw")])
def test_the_suffix_chooses_the_format(tmp_path, name, fmt):
    assert format_for_path(name) == fmt
    with disks.create(tmp_path / name, MiB) as disk:
        assert disk.format == fmt
    disks.convert(str(tmp_path / name), str(tmp_path / f"copy{os.path.splitext(name)[1]}"))
    assert disks.detect_format(str(tmp_path / f"copy{os.path.splitext(name)[1]}")) == fmt


def test_a_name_that_tells_no_format_needs_one(tmp_path):
    for name in ("disk", "disk.qcow2", "disk.vhdx.partial"):
        with pytest.raises(DiskError, match="cannot be told from the file name"):
            format_for_path(name)
        with pytest.raises(DiskError, match="cannot be told"):
            disks.create(tmp_path / name, MiB)
        assert format_for_path(name, "vhd") == "vhd"
    with disks.create(tmp_path / "disk", MiB, format="vhd") as disk:
        assert disk.format == "vhd"
    with pytest.raises(DiskError, match="cannot be told"):
        disks.convert(str(tmp_path / "disk"), str(tmp_path / "copy.bin"))
    assert not os.path.exists(tmp_path / "copy.bin")


def test_a_format_that_contradicts_the_name_or_is_unknown_is_refused(tmp_path):
    for name, fmt in (("x.vhd", "vhdx"), ("x.vhdx", "raw"), ("x.avhd", "raw"), ("x.avhdx", "vhd")):
        with pytest.raises(DiskError, match="the name says"):
            format_for_path(name, fmt)
        with pytest.raises(DiskError, match="the name says"):
            disks.create(tmp_path / name, MiB, format=fmt)
        assert not os.path.exists(tmp_path / name)
    with pytest.raises(DiskError, match="unknown disk format"):
        format_for_path("x.vhdx", "qcow2")
    # .raw and .img only suggest raw: any file reads as one, and .img names qcow2 cloud images too.
    assert format_for_path("x.img", "vhdx") == "vhdx" and format_for_path("x.raw", "vhd") == "vhd"


def test_a_differencing_disk_whose_name_tells_no_format_takes_its_parents(tmp_path):
    for fmt in ("vhdx", "vhd"):
        parent = make(tmp_path / f"base.{fmt}")
        with disks.create(tmp_path / f".child.{fmt}.{uuid.uuid4().hex}", type="differencing", parent=parent) as child:
            assert child.format == fmt and child.read(0, MiB) == CONTENT[0][1]
