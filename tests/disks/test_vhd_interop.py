"""Legacy VHD against real peers: qemu-img/qemu-io (qemu's "vpc" driver) and libvhdi.

qemu-img has no consistency check for vpc ("This image format does not support checks", exit 63), so
qemu's view is tested by what it reports (virtual size) and what it reads (convert to raw).
"""

from __future__ import annotations

import hashlib
import os

import pytest
from tools import libvhdi_read, qemu_info, qemu_io, qemu_to_raw, run

from hvbackup import disks
from hvbackup.disks.vhd import VhdDisk, create_vhd
from hvbackup.disks.vhd.geometry import MAX_GEOMETRY, geometry_sectors

pytestmark = pytest.mark.interop
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def pattern(seed: int, length: int) -> bytes:
    return hashlib.shake_128(seed.to_bytes(8, "little")).digest(length)


def qemu_content(path: str, tmp_path) -> bytes:
    raw = str(tmp_path / f"{os.path.basename(path)}.raw")
    if os.path.exists(raw):
        os.unlink(raw)
    qemu_to_raw(path, "vhd", raw)
    return open(raw, "rb").read()


def fill(disk, writes) -> bytearray:
    """Apply (offset, length, seed) writes (seed None: trim) and return the expected content."""
    expected = bytearray(disk.read(0, disk.size))
    for offset, length, seed in writes:
        if seed is None:
            disk.trim(offset, length)
            expected[offset:offset + length] = bytes(length)
        else:
            disk.write(offset, pattern(seed, length))
            expected[offset:offset + length] = pattern(seed, length)
    return expected


WRITES = [
    (0, 4096, 1),
    (2 * MiB - 700, 1400, 2),           # unaligned, across a block boundary
    (5 * MiB + 512, 3 * MiB, 3),        # several blocks, one partially
    (6 * MiB, 64 * KiB + 100, None),    # trim inside written data
    (12 * MiB - 512, 512, 4),           # the last sector
]


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_qemu_reads_what_hvbackup_writes(tmp_path, kind):
    size = 12 * MiB                      # not a CHS size: qemu must read the current size
    path = str(tmp_path / f"{kind}.vhd")
    create_vhd(path, size, disk_type=kind)
    with VhdDisk.open(path) as disk:
        expected = fill(disk, WRITES)
    info = qemu_info(path, "vhd")
    assert (info["format"], info["virtual-size"]) == ("vpc", size)
    assert qemu_content(path, tmp_path) == expected
    # libvhdi agrees as well
    run("vhdiinfo", path)
    assert libvhdi_read(path, 0, size) == expected


@pytest.mark.parametrize(
    "size",
    [10514432, 100 * MiB, GiB + 512, 3 * GiB, 127 * GiB],
    ids=["chs-exact", "100MiB", "1GiB+512", "3GiB", "127GiB"],
)
def test_qemu_sees_the_exact_size(tmp_path, size):
    path = str(tmp_path / "d.vhd")
    create_vhd(path, size, disk_type="dynamic")
    with VhdDisk.open(path, read_only=True) as disk:
        geometry = disk.footer.geometry
    assert geometry == MAX_GEOMETRY or geometry_sectors(geometry) * 512 == size
    assert qemu_info(path, "vhd")["virtual-size"] == size


def test_qemu_sees_the_exact_size_of_fixed_disks(tmp_path):
    for size in (10514432, 5 * MiB + 512):
        path = str(tmp_path / f"{size}.vhd")
        create_vhd(path, size, disk_type="fixed")
        assert qemu_info(path, "vhd")["virtual-size"] == size


@pytest.mark.parametrize("force_size", [False, True], ids=["chs", "force_size"])
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_hvbackup_reads_and_writes_qemu_disks(tmp_path, subformat, force_size):
    path = str(tmp_path / "q.vhd")
    options = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", options, path, str(9 * MiB + 512))
    qemu_io(path, "vhd", "write -P 0xab 0 64k", "write -P 0xcd 3M 1M", "write -P 0xef 4607k 2k",
            "write -z 3200k 64k")
    size = qemu_info(path, "vhd")["virtual-size"]
    assert size == 9 * MiB + 512 if force_size else size >= 9 * MiB + 512
    before = qemu_content(path, tmp_path)
    with VhdDisk.open(path) as disk:
        assert disk.size == size and disk.disk_type == subformat
        assert disk.read(0, size) == before
        for ext in disk.extents():
            if ext.state != "data":
                assert not any(before[ext.offset:ext.end])
        expected = fill(disk, [(100, 5000, 7), (6 * MiB - 1024, 2 * MiB + 3072, 8), (3 * MiB + 4096, 8192, None),
                               (size - 1024, 1024, 9)])
    assert qemu_content(path, tmp_path) == expected
    qemu_io(path, "vhd", "write -P 0x11 8M 4k")
    expected[8 * MiB:8 * MiB + 4096] = b"\x11" * 4096
    with VhdDisk.open(path, read_only=True) as disk:
        assert disk.read(0, size) == expected
    run("vhdiinfo", path)
    assert libvhdi_read(path, 0, size) == expected


def test_libvhdi_reads_a_differencing_chain(tmp_path):
    """Single sectors and unaligned runs in the child: libvhdi (20210425 and the pyvhdi in use)
    misreads a bitmap byte in which a run of present sectors ends before its last bit (it shifts the
    byte without masking), which is why a differencing VHD takes writes in whole 4 KiB units."""
    size = 12 * MiB
    base, child = str(tmp_path / "base.vhd"), str(tmp_path / "child.vhd")
    create_vhd(base, size, disk_type="dynamic")
    with VhdDisk.open(base) as disk:
        disk.write(0, pattern(1, 8 * MiB))
    create_vhd(child, None, disk_type="differencing", parent_path=base)
    with VhdDisk.open(child) as disk:
        expected = fill(disk, [(4096, 8192, 2), (2 * MiB - 4096, 12288, 3), (5 * MiB, 4096, None),
                               (9 * MiB, MiB + 4096, 4), (512, 512, 5), (3 * MiB + 1536, 700, 6),
                               (6 * MiB + 100, 3000, None), (11 * MiB - 512, 513, 7)])
        assert disk.read(0, size) == expected
    result = run("vhdiinfo", child)
    assert "Differential" in result.stdout and "base.vhd" in result.stdout
    assert libvhdi_read(child, 0, size, [base]) == expected


def test_disks_open_chain_through_the_package(tmp_path):
    base, child = str(tmp_path / "base.vhd"), str(tmp_path / "child.vhd")
    disks.create(base, 4 * MiB, format="vhd", type="dynamic").close()
    with disks.create(child, format="vhd", type="differencing", parent=base) as disk:
        disk.write(MiB, b"x" * 4096)
    with disks.open(child, read_only=True) as disk:
        assert isinstance(disk, VhdDisk) and disk.parent is not None
        assert disk.read(MiB, 4097) == b"x" * 4096 + b"\0"
    assert libvhdi_read(child, MiB, 4097, [base]) == b"x" * 4096 + b"\0"
