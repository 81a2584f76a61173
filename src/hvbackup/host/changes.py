"""Msvm_ImageManagementService.GetVirtualDiskChanges: the WMI (remotable) form of
QueryChangesVirtualDisk, answered from a disk file's change tracking, with WMI return values.

It takes a VHDX path, not a handle, and gives the changed ranges as two parallel arrays of byte
offsets and lengths into the virtual disk, plus ProcessedByteLength: how much of the asked area the
answer covers (a caller continues at ByteOffset + ProcessedByteLength).
"""

from __future__ import annotations

import os

from hvbackup import tracking
from hvbackup.errors import DiskError, HostError, TrackingError
from hvbackup.host.returns import FAILED, FILE_NOT_FOUND, INVALID_PARAMETER, INVALID_STATE, NOT_SUPPORTED
from hvbackup.winerror import ERROR_INVALID_PARAMETER, ERROR_VHD_INVALID_CHANGE_TRACKING_ID, ERROR_VHD_INVALID_TYPE

# A tracking error the caller caused is a bad parameter; one the disk's tracking state causes
# (off, lost, changed offline) is an invalid state: the answer is to take a full backup.
_RETURN_VALUES = {
    ERROR_INVALID_PARAMETER: INVALID_PARAMETER,
    ERROR_VHD_INVALID_CHANGE_TRACKING_ID: INVALID_PARAMETER,
    ERROR_VHD_INVALID_TYPE: NOT_SUPPORTED,
}


def get_virtual_disk_changes(path: str, limit_id: str, byte_offset: int,
                             byte_length: int) -> tuple[int, list[int], list[int]]:
    """(ProcessedByteLength, ChangedByteOffsets[], ChangedByteLengths[]) of the ranges written
    after ``limit_id`` (an RCT ID) inside [ByteOffset, ByteOffset + ByteLength); ByteLength may be
    at most the disk's size."""
    if not os.path.isfile(path):
        raise HostError(f"{path}: file not found", FILE_NOT_FOUND)
    try:
        ranges, processed = tracking.query(path, limit_id, byte_offset, byte_length)
    except TrackingError as exc:
        raise HostError(str(exc), _RETURN_VALUES.get(exc.code, INVALID_STATE)) from None
    except DiskError as exc:
        raise HostError(str(exc), FAILED) from None
    return processed, [offset for offset, _ in ranges], [length for _, length in ranges]


def changed_ranges(path: str, limit_id: str, size: int) -> list[tuple[int, int]]:
    """Every range of the disk written after ``limit_id``, the area paged through as a caller of
    GetVirtualDiskChanges does."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        processed, offsets, lengths = get_virtual_disk_changes(path, limit_id, offset, size - offset)
        if processed <= 0:
            raise HostError(f"{path}: the change query made no progress at offset {offset}", FAILED)
        ranges.extend(zip(offsets, lengths))
        offset += processed
    return ranges
