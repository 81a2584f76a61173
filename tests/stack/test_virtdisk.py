"""hvbackup.virtdisk: the VirtDisk calls a backup application makes, on real VHDX and VHD files."""

from __future__ import annotations

import os
import random

import pytest

from hvbackup import disks, stack, tracking
from hvbackup import virtdisk as vd
from hvbackup import winerror as w
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.errors import CodedError, DiskBusyError
from hvbackup.units import MiB
from hvbackup.virtdisk import VirtDiskError

SIZE = 64 * MiB


@pytest.fixture
def vhdx(tmp_path) -> str:
    path = str(tmp_path / "disk.vhdx")
    disks.create(path, SIZE).close()
    return path


@pytest.fixture
def tracked(vhdx) -> str:
    tracking.enable(vhdx)
    return vhdx


def fails(code: int, call, *args, **kwargs) -> VirtDiskError:
    with pytest.raises(VirtDiskError) as caught:
        call(*args, **kwargs)
    assert caught.value.code == code, (caught.value.name, str(caught.value))
    assert caught.value.name == w.name_of(code) and isinstance(caught.value, CodedError)
    return caught.value


def info(handle, version):
    return vd.get_virtual_disk_information(handle, version)


def state(path: str) -> vd.ChangeTrackingState:
    with vd.open_virtual_disk(path, vd.VIRTUAL_DISK_ACCESS_GET_INFO) as handle:
        return info(handle, vd.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE)


# -- GetVirtualDiskInformation ----------------------------------------------------------------------

def test_information_of_a_dynamic_vhdx(tracked):
    with disks.open(tracked, read_only=True) as disk:
        expected_id, data_write_guid = disk.disk_id, disk.data_write_guid
    with vd.open_virtual_disk(tracked) as handle:
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_SIZE) == vd.Size(SIZE, os.path.getsize(tracked), 32 * MiB, 512)
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_IDENTIFIER) == data_write_guid
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID) == expected_id
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_VIRTUAL_STORAGE_TYPE) == vd.VirtualStorageType(
            vd.VIRTUAL_STORAGE_TYPE_DEVICE_VHDX, vd.VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT)
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE) == 3
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK) == vd.PhysicalDisk(512, 4096, False)
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_VHD_PHYSICAL_SECTOR_SIZE) == 4096
        fails(w.ERROR_VHD_INVALID_TYPE, info, handle, vd.GET_VIRTUAL_DISK_INFO_PARENT_LOCATION)
        current = info(handle, vd.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE)
        assert current == vd.ChangeTrackingState(True, False, tracking.status(tracked).most_recent_id)
        assert current.most_recent_id.startswith("rctX:")
        fails(w.ERROR_NOT_SUPPORTED, info, handle, vd.GET_VIRTUAL_DISK_INFO_PARENT_TIMESTAMP)
        fails(w.ERROR_INVALID_PARAMETER, info, handle, vd.GET_VIRTUAL_DISK_INFO_UNSPECIFIED)
        fails(w.ERROR_INVALID_PARAMETER, info, handle, 99)
    with vd.open_virtual_disk(tracked, vd.VIRTUAL_DISK_ACCESS_ALL) as handle:  # behind the tracking filter
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_IDENTIFIER) == data_write_guid
        vd.write_virtual_disk(handle, 0, b"new data, new DataWriteGuid")
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_IDENTIFIER) != data_write_guid


def test_information_of_a_differencing_chain_and_of_vhd(tmp_path, vhdx):
    child = str(tmp_path / "child.avhdx")
    disks.create(child, type="differencing", parent=vhdx).close()
    with vd.open_virtual_disk(child) as handle:
        location = info(handle, vd.GET_VIRTUAL_DISK_INFO_PARENT_LOCATION)
        assert location.parent_resolved and len(location.parent_location_buffer) == 1
        assert os.path.samefile(location.parent_location_buffer[0], vhdx)
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE) == 4
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_SIZE).physical_size == os.path.getsize(child)
        with disks.open(vhdx, read_only=True) as parent:  # the child names its parent by this identifier
            assert parent.data_write_guid in VhdxDisk.open(child, read_only=True).metadata.parent_locator.linkages

    fixed = str(tmp_path / "fixed.vhd")
    disks.create(fixed, 8 * MiB, format="vhd", type="fixed").close()
    with vd.open_virtual_disk(fixed) as handle, disks.open(fixed, read_only=True) as disk:
        storage = info(handle, vd.GET_VIRTUAL_DISK_INFO_VIRTUAL_STORAGE_TYPE)
        assert storage.device_id == vd.VIRTUAL_STORAGE_TYPE_DEVICE_VHD
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE) == 2
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_IDENTIFIER) == disk.disk_id
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_SIZE).block_size == 0
        # Change tracking is a VHDX feature.
        fails(w.ERROR_VHD_INVALID_TYPE, info, handle, vd.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE)
        fails(w.ERROR_VHD_INVALID_TYPE, vd.query_changes_virtual_disk, handle, "rctX:x", 0, 8 * MiB)
    with vd.open_virtual_disk(fixed, vd.VIRTUAL_DISK_ACCESS_ALL) as handle:
        fails(w.ERROR_VHD_INVALID_TYPE, vd.set_virtual_disk_information, handle,
              vd.SET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE, True)
        vd.write_virtual_disk(handle, 0, b"still open")
    fixed_vhdx = str(tmp_path / "fixed.vhdx")
    disks.create(fixed_vhdx, 8 * MiB, type="fixed").close()
    with vd.open_virtual_disk(fixed_vhdx) as handle:
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE) == 2


# -- SetVirtualDiskInformation ----------------------------------------------------------------------

def test_set_change_tracking_state_on_off_and_twice(vhdx):
    ON = vd.SET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE
    with vd.open_virtual_disk(vhdx, vd.VIRTUAL_DISK_ACCESS_ALL) as handle:
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE) == vd.ChangeTrackingState(False, False, "")
        fails(w.ERROR_CTLOG_INVALID_TRACKING_STATE, vd.set_virtual_disk_information, handle, ON, False)
        vd.set_virtual_disk_information(handle, ON, True)
        first = info(handle, vd.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE)
        assert first.enabled and not first.newer_changes and first.most_recent_id
        assert os.path.exists(vhdx + ".rct") and os.path.exists(vhdx + ".mrt")
        fails(w.ERROR_CTLOG_INVALID_TRACKING_STATE, vd.set_virtual_disk_information, handle, ON, True)
        # The handle stayed valid and now writes through the tracking filter.
        vd.write_virtual_disk(handle, 5 * MiB, b"a" * 4096)
        after = info(handle, vd.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE)
        assert after == vd.ChangeTrackingState(True, True, first.most_recent_id)
        ranges, processed = vd.query_changes_virtual_disk(handle, first.most_recent_id, 0, SIZE)
        assert ranges == [(5 * MiB, 64 * 1024)] and processed == SIZE
        vd.set_virtual_disk_information(handle, ON, False)
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE) == vd.ChangeTrackingState(False, False, "")
        assert not os.path.exists(vhdx + ".rct") and not os.path.exists(vhdx + ".mrt")
        fails(w.ERROR_CTLOG_INVALID_TRACKING_STATE, vd.set_virtual_disk_information, handle, ON, False)
        fails(w.ERROR_VHD_CHANGE_TRACKING_DISABLED, vd.query_changes_virtual_disk, handle, first.most_recent_id,
              0, SIZE)
        assert vd.read_virtual_disk(handle, 5 * MiB, 4) == b"aaaa"
        fails(w.ERROR_NOT_SUPPORTED, vd.set_virtual_disk_information, handle, vd.SET_VIRTUAL_DISK_INFO_PARENT_PATH, "x")
        fails(w.ERROR_INVALID_PARAMETER, vd.set_virtual_disk_information, handle, 42, True)
    with vd.open_virtual_disk(vhdx) as handle:
        fails(w.ERROR_ACCESS_DENIED, vd.set_virtual_disk_information, handle, ON, True)


def test_writes_through_a_handle_are_tracked_and_sealed_at_close(tracked):
    since = state(tracked).most_recent_id
    with vd.open_virtual_disk(tracked, vd.VIRTUAL_DISK_ACCESS_WRITABLE) as handle:
        vd.write_virtual_disk(handle, 7, b"x")
        vd.write_virtual_disk(handle, SIZE - 1, b"y")
    with vd.open_virtual_disk(tracked, vd.VIRTUAL_DISK_ACCESS_GET_INFO) as handle:
        ranges, processed = vd.query_changes_virtual_disk(handle, since, 0, SIZE)
        assert ranges == [(0, 64 * 1024), (SIZE - 64 * 1024, 64 * 1024)] and processed == SIZE
        newest = info(handle, vd.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE)
        assert newest.most_recent_id != since and not newest.newer_changes
        assert vd.query_changes_virtual_disk(handle, newest.most_recent_id, 0, SIZE) == ([], SIZE)


# -- QueryChangesVirtualDisk: the paging contract -------------------------------------------------

def test_paging_covers_exactly_what_one_call_returns(vhdx):
    granularity = 4096
    tracking.enable(vhdx, granularity=granularity)
    since = state(vhdx).most_recent_id
    rng = random.Random(3)
    written = set()
    with vd.open_virtual_disk(vhdx, vd.VIRTUAL_DISK_ACCESS_ALL) as handle:
        for _ in range(1000):
            offset, length = rng.randrange(SIZE - 3 * granularity), rng.choice((1, 512, granularity, 9000))
            vd.write_virtual_disk(handle, offset, rng.randbytes(length))
            written.update(range(offset // granularity, (offset + length - 1) // granularity + 1))

    with vd.open_virtual_disk(vhdx, vd.VIRTUAL_DISK_ACCESS_NONE, read_only=True) as handle:
        whole, processed = vd.query_changes_virtual_disk(handle, since, 0, SIZE)
        assert processed == SIZE and len(whole) > 100
        granules = {g for o, n in whole for g in range(o // granularity, (o + n) // granularity)}
        assert granules == written  # exact: nothing crashed

        for start, end in ((0, SIZE), (12345, SIZE - 54321)):
            pages, offset = [], start
            while offset < end:
                page, processed = vd.query_changes_virtual_disk(handle, since, offset, end - offset, max_ranges=7)
                assert len(page) <= 7 and 0 < processed <= end - offset
                assert all(offset <= o and o + n <= offset + processed for o, n in page)
                pages += page
                offset += processed
            clipped = [(max(o, start), min(o + n, end) - max(o, start)) for o, n in whole if o < end and o + n > start]
            assert pages == clipped


# -- errors -----------------------------------------------------------------------------------------

def test_bad_paths_and_files(tmp_path):
    fails(w.ERROR_FILE_NOT_FOUND, vd.open_virtual_disk, tmp_path / "missing.vhdx")
    fails(w.ERROR_PATH_NOT_FOUND, vd.open_virtual_disk, tmp_path / "no" / "such.vhdx")
    fails(w.ERROR_ACCESS_DENIED, vd.open_virtual_disk, tmp_path)
    (tmp_path / "notes.vhdx").write_bytes(b"not a virtual disk at all")
    fails(w.ERROR_VHD_FORMAT_UNKNOWN, vd.open_virtual_disk, tmp_path / "notes.vhdx")
    (tmp_path / "empty.vhdx").write_bytes(b"")
    fails(w.ERROR_VHD_FORMAT_UNKNOWN, vd.open_virtual_disk, tmp_path / "empty.vhdx")
    damaged = tmp_path / "damaged.vhdx"
    disks.create(damaged, MiB).close()
    data = bytearray(damaged.read_bytes())
    data[192 * 1024:320 * 1024] = bytes(128 * 1024)  # both region tables
    damaged.write_bytes(bytes(data))
    fails(w.ERROR_FILE_CORRUPT, vd.open_virtual_disk, damaged)
    child = tmp_path / "orphan.avhdx"
    disks.create(tmp_path / "gone.vhdx", MiB).close()
    disks.create(child, type="differencing", parent=tmp_path / "gone.vhdx").close()
    os.unlink(tmp_path / "gone.vhdx")
    fails(w.ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT, vd.open_virtual_disk, child)


def test_shared_disks_are_refused_and_pointed_to_rsvd(tmp_path, vhdx):
    (tmp_path / "set.vhds").write_bytes(b"")
    for path in (tmp_path / "set.vhds", tmp_path / "SET.VHDS", vhdx + ":SharedVirtualDisk"):
        error = fails(w.ERROR_VHD_SHARED, vd.open_virtual_disk, path)
        assert error.code == 0xC05CFF0A and "RSVD" in str(error) and "SMB 3" in str(error)


def test_change_tracking_ids_that_cannot_be_answered(tracked):
    now = tracking.status(tracked).most_recent_id
    lineage, sequence = now.rsplit(":", 1)
    with vd.open_virtual_disk(tracked) as handle:
        for bad in ("", "bogus", now[:-1], now + "0", "rctX:" + "a" * 300, 17,
                    "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001",  # another disk's lineage
                    f"{lineage}:00000009", f"{lineage}:00000000"):  # never issued
            fails(w.ERROR_VHD_INVALID_CHANGE_TRACKING_ID, vd.query_changes_virtual_disk, handle, bad, 0, SIZE)
        assert vd.query_changes_virtual_disk(handle, now.upper().replace("RCTX", "rctX"), 0, SIZE) == ([], SIZE)
        fails(w.ERROR_INVALID_PARAMETER, vd.query_changes_virtual_disk, handle, now, 0, SIZE + 1)
        fails(w.ERROR_INVALID_PARAMETER, vd.query_changes_virtual_disk, handle, now, -1, 10)
        fails(w.ERROR_INVALID_PARAMETER, vd.query_changes_virtual_disk, handle, now, 0, SIZE, flags=1)


def test_ids_of_a_history_changed_offline_or_lost(tmp_path, tracked):
    old = state(tracked).most_recent_id
    with VhdxDisk.open(tracked) as foreign:  # a writer that does not track, like qemu-io
        foreign.write(0, b"f" * 4096)
    assert state(tracked) == vd.ChangeTrackingState(True, True, "")
    with vd.open_virtual_disk(tracked) as handle:
        fails(w.ERROR_CTLOG_VHD_CHANGED_OFFLINE, vd.query_changes_virtual_disk, handle, old, 0, SIZE)
    with vd.open_virtual_disk(tracked, vd.VIRTUAL_DISK_ACCESS_ALL) as handle:  # a tracked writer starts anew
        fresh = info(handle, vd.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE).most_recent_id
        assert fresh and fresh.split(":")[1:6] != old.split(":")[1:6]
        fails(w.ERROR_CTLOG_VHD_CHANGED_OFFLINE, vd.query_changes_virtual_disk, handle, old, 0, SIZE)
        assert vd.query_changes_virtual_disk(handle, fresh, 0, SIZE) == ([], SIZE)

    os.unlink(tracked + ".rct")
    assert state(tracked) == vd.ChangeTrackingState(True, True, "")
    with vd.open_virtual_disk(tracked) as handle:
        fails(w.ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION, vd.query_changes_virtual_disk, handle, fresh, 0, SIZE)
    vd.open_virtual_disk(tracked, vd.VIRTUAL_DISK_ACCESS_ALL).close()
    with vd.open_virtual_disk(tracked) as handle:
        fails(w.ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION, vd.query_changes_virtual_disk, handle, fresh, 0, SIZE)
        # The record of the first history went with the deleted .rct file: its IDs are now unknown ones.
        fails(w.ERROR_VHD_INVALID_CHANGE_TRACKING_ID, vd.query_changes_virtual_disk, handle, old, 0, SIZE)


def test_disabled_tracking(vhdx):
    with vd.open_virtual_disk(vhdx) as handle:
        assert info(handle, vd.GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE) == vd.ChangeTrackingState(False, False, "")
        fails(w.ERROR_VHD_CHANGE_TRACKING_DISABLED, vd.query_changes_virtual_disk, handle,
              "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001", 0, SIZE)


@pytest.mark.parametrize("access, read_only, get_info_only, writable", [
    (vd.VIRTUAL_DISK_ACCESS_GET_INFO, None, False, False),
    (vd.VIRTUAL_DISK_ACCESS_ATTACH_RO, None, False, False),
    (vd.VIRTUAL_DISK_ACCESS_READ, None, False, False),
    (vd.VIRTUAL_DISK_ACCESS_NONE, None, False, False),
    (vd.VIRTUAL_DISK_ACCESS_NONE, True, False, False),
    (vd.VIRTUAL_DISK_ACCESS_NONE, False, False, True),
    (vd.VIRTUAL_DISK_ACCESS_ATTACH_RW, None, False, True),
    (vd.VIRTUAL_DISK_ACCESS_WRITABLE, None, False, True),
    (vd.VIRTUAL_DISK_ACCESS_ALL, None, False, True),
    (vd.VIRTUAL_DISK_ACCESS_ALL, True, False, False),
    (vd.VIRTUAL_DISK_ACCESS_ALL, None, True, False),
])
def test_access_masks(vhdx, access, read_only, get_info_only, writable):
    with vd.open_virtual_disk(vhdx, access, read_only=read_only, get_info_only=get_info_only) as handle:
        assert handle.writable == writable
        if writable:
            vd.write_virtual_disk(handle, 0, b"w")
        else:
            fails(w.ERROR_ACCESS_DENIED, vd.write_virtual_disk, handle, 0, b"w")
        if get_info_only:
            fails(w.ERROR_ACCESS_DENIED, vd.read_virtual_disk, handle, 0, 1)
        else:
            assert vd.read_virtual_disk(handle, 0, 1) == (b"w" if writable else b"\0")


def test_handles_flags_and_sharing(vhdx):
    fails(w.ERROR_INVALID_PARAMETER, vd.open_virtual_disk, vhdx, 0x1)
    fails(w.ERROR_INVALID_PARAMETER, vd.open_virtual_disk, vhdx, vd.VIRTUAL_DISK_ACCESS_GET_INFO, read_only=False)
    fails(w.ERROR_INVALID_PARAMETER, vd.open_virtual_disk, vhdx, flags=0x10000)
    fails(w.ERROR_NOT_SUPPORTED, vd.open_virtual_disk, vhdx, flags=vd.OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS)
    vd.open_virtual_disk(vhdx, flags=vd.OPEN_VIRTUAL_DISK_FLAG_CACHED_IO).close()

    with vd.open_virtual_disk(vhdx, vd.VIRTUAL_DISK_ACCESS_ALL) as writer:
        fails(w.ERROR_SHARING_VIOLATION, vd.open_virtual_disk, vhdx)
        fails(w.ERROR_SHARING_VIOLATION, vd.open_virtual_disk, vhdx, vd.VIRTUAL_DISK_ACCESS_ALL)
        fails(w.ERROR_INVALID_PARAMETER, vd.read_virtual_disk, writer, SIZE - 1, 2)
    with vd.open_virtual_disk(vhdx) as reader, vd.open_virtual_disk(vhdx) as second:
        fails(w.ERROR_SHARING_VIOLATION, vd.open_virtual_disk, vhdx, vd.VIRTUAL_DISK_ACCESS_ATTACH_RW)
        with pytest.raises(DiskBusyError):  # nor may any other hvbackup writer
            stack.open(vhdx)
        assert vd.read_virtual_disk(second, 0, 4) == bytes(4)
    vd.open_virtual_disk(vhdx, vd.VIRTUAL_DISK_ACCESS_ALL).close()  # every lock was released

    reader.close()  # closing twice is harmless
    fails(w.ERROR_INVALID_HANDLE, vd.read_virtual_disk, reader, 0, 1)
    fails(w.ERROR_INVALID_HANDLE, info, reader, vd.GET_VIRTUAL_DISK_INFO_SIZE)
    fails(w.ERROR_INVALID_HANDLE, vd.query_changes_virtual_disk, "not a handle", "rctX:x", 0, 1)
