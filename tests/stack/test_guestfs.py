"""hvbackup.guestfs against the real e2fsprogs, on small images."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from hvbackup import disks, guestfs, stack, tracking
from hvbackup.units import MiB

GRANULE = guestfs.GRANULE


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def files(tmp_path):
    """A directory tree to build filesystems from: guest path -> contents."""
    contents = {"/etc/hostname": b"guest\n", "/home/u/notes.txt": b"notes\n" * 1000,
                "/srv/data.bin": bytes(range(256)) * 8192, "/empty": b""}
    for path, data in contents.items():
        local = tmp_path / "src" / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
    return contents


@pytest.fixture
def image(tmp_path, files):
    path = str(tmp_path / "fs.img")
    guestfs.make_filesystem(str(tmp_path / "src"), path, 16 * MiB)
    return path


def test_a_built_filesystem_holds_the_files_and_is_clean(image, files):
    guestfs.check(image)
    assert guestfs.checksums(image) == {path: sha(data) for path, data in sorted(files.items())}
    assert guestfs.read_file(image, "/srv/data.bin") == files["/srv/data.bin"]
    assert guestfs.read_file(image, "/empty") == b""


def test_edit_writes_replaces_and_removes(image, files):
    guestfs.edit(image, {"/etc/hostname": b"renamed\n", "/new/deep/dir/file": b"x" * 100_000,
                         "/home/u/notes.txt": None})
    guestfs.check(image)
    expected = {path: sha(data) for path, data in files.items() if path != "/home/u/notes.txt"}
    expected |= {"/etc/hostname": sha(b"renamed\n"), "/new/deep/dir/file": sha(b"x" * 100_000)}
    assert guestfs.checksums(image) == dict(sorted(expected.items()))
    assert guestfs.read_file(image, "/new/deep/dir/file") == b"x" * 100_000


@pytest.mark.parametrize("call", [
    lambda image: guestfs.read_file(image, "/no/such/file"),
    lambda image: guestfs.edit(image, {"/no/such/file": None}),
    lambda image: guestfs.read_file(image, "relative/path"),
    lambda image: guestfs.edit(image, {"/with space": b""}),
    lambda image: guestfs.make_filesystem("/", image, 16 * MiB),
])
def test_refusals_are_guest_fs_errors(image, call):
    with pytest.raises(guestfs.GuestFsError):
        call(image)


def test_check_reports_damage_with_e2fsck_output(image):
    # A wrong link count: the kind of damage e2fsck finds in pass 4.
    subprocess.run(["debugfs", "-w", "-R", "set_inode_field /etc/hostname links_count 5", image],
                   check=True, capture_output=True, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    with pytest.raises(guestfs.FilesystemDamaged) as caught:
        guestfs.check(image)
    assert "e2fsck exited 4: Inode" in str(caught.value) and "\n" not in str(caught.value)
    assert "ref count is 5" in caught.value.output


def test_missing_e2fsprogs_names_the_package(image, monkeypatch, tmp_path):
    monkeypatch.setattr(guestfs, "_SEARCH_PATH", str(tmp_path))
    with pytest.raises(guestfs.GuestFsError, match="install the e2fsprogs package"):
        guestfs.check(image)


def test_write_differences_writes_only_differing_granules(tmp_path):
    size = 8 * MiB
    with disks.create(tmp_path / "a.raw", size, format="raw") as source, \
            disks.create(tmp_path / "b.raw", size, format="raw") as target:
        source.write(0, b"s" * 3 * GRANULE)
        target.write(0, b"s" * 3 * GRANULE)
        source.write(GRANULE + 10, b"changed")        # differs inside granule 1
        source.write(5 * MiB, b"only in the source")  # target holds a hole there
        target.write(7 * MiB, b"only in the target")  # source holds a hole there: must become zeros
        assert guestfs.write_differences(source, target) == 3 * GRANULE
        assert target.read(0, size) == source.read(0, size)
        assert guestfs.write_differences(source, target) == 0


def test_apply_changes_reaches_a_tracked_disk_in_granules(tmp_path, image, files):
    path = str(tmp_path / "guest.vhdx")
    with disks.create(path, 16 * MiB) as disk, disks.open(image, read_only=True) as built:
        guestfs.write_differences(built, disk)
    since = tracking.enable(path).most_recent_id
    with stack.open(path) as disk:
        written = guestfs.apply_changes(disk, {"/etc/hostname": b"changed\n"}, str(tmp_path))
        with guestfs.image_of(disk, str(tmp_path)) as copy:
            guestfs.check(copy)
            assert guestfs.read_file(copy, "/etc/hostname") == b"changed\n"
            assert guestfs.read_file(copy, "/srv/data.bin") == files["/srv/data.bin"]
    changed, _ = tracking.query(path, since)
    assert 0 < written < 16 * MiB and written % GRANULE == 0
    assert sum(length for _, length in changed) == written
