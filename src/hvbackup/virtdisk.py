"""The VirtDisk calls a backup application makes (virtdisk.h), over the block stack (``hvbackup.stack``).

``OpenVirtualDisk``, ``GetVirtualDiskInformation``, ``SetVirtualDiskInformation``,
``QueryChangesVirtualDisk`` and reads/writes of the opened disk, with the Windows constant names and
values. Every expected failure is a :class:`VirtDiskError` whose ``code`` is the Windows error.

Local only, as on Windows: a shared disk (VHD Set) is refused with ``ERROR_VHD_SHARED``; shared disks
are reached over SMB 3 with RSVD. docs/virtdisk.md maps each call and constant.

Which handles may write: a handle is writable when ``read_only`` is False (``OPEN_VIRTUAL_DISK_VERSION_2``
``ReadOnly = FALSE``), or, with ``read_only`` left as None, when the access mask holds a bit of
``VIRTUAL_DISK_ACCESS_WRITABLE`` (ATTACH_RW, CREATE, METAOPS; so ALL too). GET_INFO, ATTACH_RO, DETACH,
READ and NONE open read-only. A writable handle holds the disk through ``stack.open``, so its writes
are tracked, and excludes every other opener; a read-only handle holds a shared lock, so no hvbackup
writer changes the disk under it. Either way a conflicting open fails with ``ERROR_SHARING_VIOLATION``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import uuid
from dataclasses import dataclass
from typing import Iterator

from hvbackup import disks, stack, tracking
from hvbackup.disks.device import BlockDevice
from hvbackup.errors import (
    CodedError,
    DiskBusyError,
    DiskFormatError,
    HvBackupError,
    ParentError,
    VirtDiskError,
)
from hvbackup.winerror import (
    ERROR_ACCESS_DENIED,
    ERROR_CTLOG_INCONSISTENT_TRACKING_FILE,
    ERROR_CTLOG_INVALID_TRACKING_STATE,
    ERROR_CTLOG_LOGFILE_SIZE_EXCEEDED_MAXSIZE,
    ERROR_CTLOG_TRACKING_NOT_INITIALIZED,
    ERROR_CTLOG_VHD_CHANGED_OFFLINE,
    ERROR_DISK_FULL,
    ERROR_FILE_CORRUPT,
    ERROR_FILE_NOT_FOUND,
    ERROR_INVALID_HANDLE,
    ERROR_INVALID_PARAMETER,
    ERROR_IO_DEVICE,
    ERROR_NOT_SUPPORTED,
    ERROR_PATH_NOT_FOUND,
    ERROR_SHARING_VIOLATION,
    ERROR_VHD_CHANGE_TRACKING_DISABLED,
    ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT,
    ERROR_VHD_FORMAT_UNKNOWN,
    ERROR_VHD_INVALID_CHANGE_TRACKING_ID,
    ERROR_VHD_INVALID_TYPE,
    ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION,
    ERROR_VHD_SHARED,
)

# -- constants of virtdisk.h ------------------------------------------------------------------------

VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN = 0
VIRTUAL_STORAGE_TYPE_DEVICE_ISO = 1
VIRTUAL_STORAGE_TYPE_DEVICE_VHD = 2
VIRTUAL_STORAGE_TYPE_DEVICE_VHDX = 3
VIRTUAL_STORAGE_TYPE_DEVICE_VHDSET = 4
VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT = uuid.UUID("ec984aec-a0f9-47e9-901f-71415a66345b")

VIRTUAL_DISK_ACCESS_NONE = 0x00000000
VIRTUAL_DISK_ACCESS_ATTACH_RO = 0x00010000
VIRTUAL_DISK_ACCESS_ATTACH_RW = 0x00020000
VIRTUAL_DISK_ACCESS_DETACH = 0x00040000
VIRTUAL_DISK_ACCESS_GET_INFO = 0x00080000
VIRTUAL_DISK_ACCESS_CREATE = 0x00100000
VIRTUAL_DISK_ACCESS_METAOPS = 0x00200000
VIRTUAL_DISK_ACCESS_READ = 0x000D0000
VIRTUAL_DISK_ACCESS_ALL = 0x003F0000
VIRTUAL_DISK_ACCESS_WRITABLE = 0x00320000

OPEN_VIRTUAL_DISK_FLAG_NONE = 0x0
OPEN_VIRTUAL_DISK_FLAG_NO_PARENTS = 0x1
OPEN_VIRTUAL_DISK_FLAG_BLANK_FILE = 0x2
OPEN_VIRTUAL_DISK_FLAG_BOOT_DRIVE = 0x4
OPEN_VIRTUAL_DISK_FLAG_CACHED_IO = 0x8
OPEN_VIRTUAL_DISK_FLAG_CUSTOM_DIFF_CHAIN = 0x10
OPEN_VIRTUAL_DISK_FLAG_PARENT_CACHED_IO = 0x20
OPEN_VIRTUAL_DISK_FLAG_VHDSET_FILE_ONLY = 0x40
OPEN_VIRTUAL_DISK_FLAG_IGNORE_RELATIVE_PARENT_LOCATOR = 0x80
OPEN_VIRTUAL_DISK_FLAG_NO_WRITE_HARDENING = 0x100
OPEN_VIRTUAL_DISK_FLAG_SUPPORT_COMPRESSED_VOLUMES = 0x200
OPEN_VIRTUAL_DISK_FLAG_SUPPORT_SPARSE_FILES_ANY_FS = 0x400
OPEN_VIRTUAL_DISK_FLAG_SUPPORT_ENCRYPTED_FILES = 0x800
# Hints about caching and the host file system: they change nothing here, so they are accepted.
_IGNORED_OPEN_FLAGS = (OPEN_VIRTUAL_DISK_FLAG_CACHED_IO | OPEN_VIRTUAL_DISK_FLAG_PARENT_CACHED_IO
                       | OPEN_VIRTUAL_DISK_FLAG_NO_WRITE_HARDENING | OPEN_VIRTUAL_DISK_FLAG_SUPPORT_COMPRESSED_VOLUMES
                       | OPEN_VIRTUAL_DISK_FLAG_SUPPORT_SPARSE_FILES_ANY_FS
                       | OPEN_VIRTUAL_DISK_FLAG_SUPPORT_ENCRYPTED_FILES)
_KNOWN_OPEN_FLAGS = 0xFFF

GET_VIRTUAL_DISK_INFO_UNSPECIFIED = 0
GET_VIRTUAL_DISK_INFO_SIZE = 1
GET_VIRTUAL_DISK_INFO_IDENTIFIER = 2
GET_VIRTUAL_DISK_INFO_PARENT_LOCATION = 3
GET_VIRTUAL_DISK_INFO_PARENT_IDENTIFIER = 4
GET_VIRTUAL_DISK_INFO_PARENT_TIMESTAMP = 5
GET_VIRTUAL_DISK_INFO_VIRTUAL_STORAGE_TYPE = 6
GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE = 7
GET_VIRTUAL_DISK_INFO_IS_4K_ALIGNED = 8
GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK = 9
GET_VIRTUAL_DISK_INFO_VHD_PHYSICAL_SECTOR_SIZE = 10
GET_VIRTUAL_DISK_INFO_SMALLEST_SAFE_VIRTUAL_SIZE = 11
GET_VIRTUAL_DISK_INFO_FRAGMENTATION = 12
GET_VIRTUAL_DISK_INFO_IS_LOADED = 13
GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID = 14
GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE = 15

SET_VIRTUAL_DISK_INFO_UNSPECIFIED = 0
SET_VIRTUAL_DISK_INFO_PARENT_PATH = 1
SET_VIRTUAL_DISK_INFO_IDENTIFIER = 2
SET_VIRTUAL_DISK_INFO_PARENT_PATH_WITH_DEPTH = 3
SET_VIRTUAL_DISK_INFO_PHYSICAL_SECTOR_SIZE = 4
SET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID = 5
SET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE = 6
SET_VIRTUAL_DISK_INFO_PARENT_LOCATOR = 7

QUERY_CHANGES_VIRTUAL_DISK_FLAG_NONE = 0x0
VIRTUAL_DISK_MAXIMUM_CHANGE_TRACKING_ID_LENGTH = 256

# ProviderSubtype values of GET_VIRTUAL_DISK_INFO (2 fixed, 3 dynamic, 4 differencing).
_PROVIDER_SUBTYPES = {"fixed": 2, "dynamic": 3, "differencing": 4}
_DEVICE_IDS = {"vhd": VIRTUAL_STORAGE_TYPE_DEVICE_VHD, "vhdx": VIRTUAL_STORAGE_TYPE_DEVICE_VHDX}

# Codes that mean change tracking cannot answer for an ID: the next backup of the disk must be full.
CHANGE_TRACKING_RESET_ERRORS = frozenset({
    ERROR_CTLOG_TRACKING_NOT_INITIALIZED, ERROR_CTLOG_LOGFILE_SIZE_EXCEEDED_MAXSIZE, ERROR_CTLOG_VHD_CHANGED_OFFLINE,
    ERROR_CTLOG_INCONSISTENT_TRACKING_FILE, ERROR_VHD_INVALID_CHANGE_TRACKING_ID, ERROR_VHD_CHANGE_TRACKING_DISABLED,
    ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION,
})

_SHARED_SUFFIXES = (".vhds", ":sharedvirtualdisk")  # a VHD Set file; the path form guests use over RSVD


# -- GET_VIRTUAL_DISK_INFO members ----------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    """GET_VIRTUAL_DISK_INFO.Size. ``physical_size`` is the size of this file (not its parents)."""

    virtual_size: int
    physical_size: int
    block_size: int
    sector_size: int


@dataclass(frozen=True)
class ParentLocation:
    """GET_VIRTUAL_DISK_INFO.ParentLocation: the resolved parent path (the disk opens only with its
    parents, so ``parent_resolved`` is always true)."""

    parent_resolved: bool
    parent_location_buffer: tuple[str, ...]


@dataclass(frozen=True)
class VirtualStorageType:
    """VIRTUAL_STORAGE_TYPE: a VIRTUAL_STORAGE_TYPE_DEVICE_* value and the provider's vendor."""

    device_id: int
    vendor_id: uuid.UUID


@dataclass(frozen=True)
class PhysicalDisk:
    """GET_VIRTUAL_DISK_INFO.PhysicalDisk: the sector sizes the disk presents; never remote."""

    logical_sector_size: int
    physical_sector_size: int
    is_remote: bool


@dataclass(frozen=True)
class ChangeTrackingState:
    """GET_VIRTUAL_DISK_INFO.ChangeTrackingState. ``most_recent_id`` is empty when tracking cannot
    name a point (off, lost, or changed offline), as Windows leaves the string empty."""

    enabled: bool
    newer_changes: bool
    most_recent_id: str


# -- the handle -----------------------------------------------------------------------------------

class VirtualDiskHandle:
    """The HANDLE OpenVirtualDisk returns; close it (or use ``with``) as CloseHandle would."""

    def __init__(self, path: str, device: BlockDevice, *, writable: bool, get_info_only: bool,
                 lock_fd: int | None):
        self.path, self.writable, self.get_info_only = path, writable, get_info_only
        self.closed = False
        self._device, self._lock_fd = device, lock_fd

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._device.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)

    def __enter__(self) -> VirtualDiskHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "writable" if self.writable else "read-only"
        return f"<VirtualDiskHandle {self.path!r} {state}>"

    @property
    def device(self) -> BlockDevice:
        """The opened disk (the top of its stack), for what no VirtDisk call gives: its extents and
        geometry. ERROR_INVALID_HANDLE once the handle is closed."""
        if self.closed:
            raise VirtDiskError(ERROR_INVALID_HANDLE, f"{self.path}: the virtual disk handle is closed")
        return self._device

    def _reopen_around(self, action) -> None:
        """Run ``action`` on the closed disk file, then take the disk back for writing: the
        tracking switch needs the file to itself. If the disk cannot be taken back, the handle
        is closed."""
        self._device.close()
        try:
            action()
        finally:
            try:
                self._device = stack.open(self.path)
            except BaseException:
                self.close()
                raise


def _device_of(handle) -> BlockDevice:
    if not isinstance(handle, VirtualDiskHandle):
        raise VirtDiskError(ERROR_INVALID_HANDLE, f"{handle!r} is not a virtual disk handle")
    return handle.device


# -- Windows errors -------------------------------------------------------------------------------

def _os_error_code(path: str, exc: OSError) -> int:
    if exc.errno == errno.ENOENT:
        return ERROR_FILE_NOT_FOUND if os.path.isdir(os.path.dirname(os.path.abspath(path))) else ERROR_PATH_NOT_FOUND
    if exc.errno == errno.ENOTDIR:
        return ERROR_PATH_NOT_FOUND
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.EROFS):
        return ERROR_ACCESS_DENIED
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ERROR_DISK_FULL
    return ERROR_IO_DEVICE


@contextlib.contextmanager
def _windows_errors(path: str) -> Iterator[None]:
    """Turn the failures of the layers below into the Windows errors a VirtDisk call returns."""
    try:
        yield
    except VirtDiskError:
        raise
    except CodedError as exc:  # change tracking already speaks Windows
        raise VirtDiskError(exc.code, str(exc)) from exc
    except DiskBusyError as exc:
        raise VirtDiskError(ERROR_SHARING_VIOLATION, str(exc)) from exc
    except ParentError as exc:
        raise VirtDiskError(ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT, str(exc)) from exc
    except DiskFormatError as exc:
        raise VirtDiskError(ERROR_FILE_CORRUPT, str(exc)) from exc
    except HvBackupError as exc:
        cause = exc.__cause__
        code = _os_error_code(path, cause) if isinstance(cause, OSError) else ERROR_INVALID_PARAMETER
        raise VirtDiskError(code, str(exc)) from exc
    except OSError as exc:
        raise VirtDiskError(_os_error_code(path, exc), f"{path}: {exc.strerror or exc}") from exc


# -- OpenVirtualDisk ------------------------------------------------------------------------------

def open_virtual_disk(path: str | os.PathLike, access: int = VIRTUAL_DISK_ACCESS_READ,
                      flags: int = OPEN_VIRTUAL_DISK_FLAG_NONE, *, read_only: bool | None = None,
                      get_info_only: bool = False) -> VirtualDiskHandle:
    """OpenVirtualDisk: open a VHDX or VHD (with its parents) and return a handle.

    ``access`` is a VIRTUAL_DISK_ACCESS_* mask; ``read_only`` and ``get_info_only`` are the
    OPEN_VIRTUAL_DISK_PARAMETERS Version2 members (a get-info-only handle reads no data). The module
    docstring says which combinations may write."""
    path = os.fspath(path)
    if path.lower().endswith(_SHARED_SUFFIXES):
        raise VirtDiskError(ERROR_VHD_SHARED, f"{path}: a shared virtual disk (VHD Set) is not opened locally; "
                            "reach it over SMB 3 with RSVD, the Remote Shared Virtual Disk protocol")
    writable = _writable(access, read_only, get_info_only)
    if flags & ~_KNOWN_OPEN_FLAGS:
        raise VirtDiskError(ERROR_INVALID_PARAMETER,
                            f"unknown OPEN_VIRTUAL_DISK_FLAG bits {flags & ~_KNOWN_OPEN_FLAGS:#x}")
    if flags & ~_IGNORED_OPEN_FLAGS:
        raise VirtDiskError(ERROR_NOT_SUPPORTED,
                            f"OPEN_VIRTUAL_DISK_FLAG {flags & ~_IGNORED_OPEN_FLAGS:#x} is not supported")
    with _windows_errors(path):
        if stat.S_ISDIR(os.stat(path).st_mode):
            raise VirtDiskError(ERROR_ACCESS_DENIED, f"{path}: is a directory, not a virtual disk")
        _check_format(path)
        if writable:
            return VirtualDiskHandle(path, stack.open(path), writable=True, get_info_only=False, lock_fd=None)
        lock_fd = _shared_lock(path)
        try:
            device = stack.open(path, read_only=True)
        except BaseException:
            os.close(lock_fd)
            raise
        return VirtualDiskHandle(path, device, writable=False, get_info_only=get_info_only, lock_fd=lock_fd)


def _writable(access: int, read_only: bool | None, get_info_only: bool) -> bool:
    if not isinstance(access, int) or access & ~VIRTUAL_DISK_ACCESS_ALL:
        raise VirtDiskError(ERROR_INVALID_PARAMETER, f"{access!r} is not a VIRTUAL_DISK_ACCESS_MASK")
    if get_info_only or read_only:
        return False
    if read_only is None:
        return bool(access & VIRTUAL_DISK_ACCESS_WRITABLE)
    if access and not access & VIRTUAL_DISK_ACCESS_WRITABLE:
        raise VirtDiskError(ERROR_INVALID_PARAMETER,
                            f"read_only=False contradicts the read-only access mask {access:#x}")
    return True


def _check_format(path: str) -> None:
    try:
        format = disks.detect_format(path)
    except DiskFormatError as exc:  # an empty file
        raise VirtDiskError(ERROR_VHD_FORMAT_UNKNOWN, str(exc)) from exc
    if format not in _DEVICE_IDS:
        raise VirtDiskError(ERROR_VHD_FORMAT_UNKNOWN, f"{path}: not a VHD or VHDX file")


def _shared_lock(path: str) -> int:
    """A shared lock for a reader: it waits for no writer, and no hvbackup writer starts while it is held."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VirtDiskError(ERROR_SHARING_VIOLATION, f"{path}: the disk is open for writing elsewhere") from None
    return fd


# -- GetVirtualDiskInformation / SetVirtualDiskInformation ----------------------------------------

def _tracking_status(handle: VirtualDiskHandle, device: BlockDevice) -> tracking.TrackingStatus:
    # A writer's tracking filter knows writes not yet saved; otherwise the files on disk tell.
    tracker = device.change_tracker()
    return tracker.status() if tracker is not None else tracking.status(handle.path)


def _size(handle: VirtualDiskHandle, device: BlockDevice) -> Size:
    return Size(device.size, os.path.getsize(handle.path), device.block_size, device.logical_sector_size)


def _identifier(handle: VirtualDiskHandle, device: BlockDevice) -> uuid.UUID:
    # What a differencing child records as its parent's identity: a VHDX's DataWriteGuid, a VHD's UniqueId.
    return device.linkage_id


def _parent_location(handle: VirtualDiskHandle, device: BlockDevice) -> ParentLocation:
    if device.parent is None:
        raise VirtDiskError(ERROR_VHD_INVALID_TYPE,
                            f"{handle.path}: not a differencing disk, so it has no parent location")
    return ParentLocation(True, (device.parent.path,))


def _change_tracking_state(handle: VirtualDiskHandle, device: BlockDevice) -> ChangeTrackingState:
    status = _tracking_status(handle, device)
    return ChangeTrackingState(status.enabled, status.newer_changes, status.most_recent_id or "")


_GETTERS = {
    GET_VIRTUAL_DISK_INFO_SIZE: _size,
    GET_VIRTUAL_DISK_INFO_IDENTIFIER: _identifier,
    GET_VIRTUAL_DISK_INFO_PARENT_LOCATION: _parent_location,
    GET_VIRTUAL_DISK_INFO_VIRTUAL_STORAGE_TYPE:
        lambda handle, device: VirtualStorageType(_DEVICE_IDS[device.format], VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT),
    GET_VIRTUAL_DISK_INFO_PROVIDER_SUBTYPE: lambda handle, device: _PROVIDER_SUBTYPES[device.disk_type],
    GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK:
        lambda handle, device: PhysicalDisk(device.logical_sector_size, device.physical_sector_size, False),
    GET_VIRTUAL_DISK_INFO_VHD_PHYSICAL_SECTOR_SIZE: lambda handle, device: device.physical_sector_size,
    GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID: lambda handle, device: device.disk_id,
    GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE: _change_tracking_state,
}


def get_virtual_disk_information(handle: VirtualDiskHandle, version: int):
    """GetVirtualDiskInformation for one GET_VIRTUAL_DISK_INFO_* version: a dataclass for the
    struct members (SIZE, PARENT_LOCATION, VIRTUAL_STORAGE_TYPE, PHYSICAL_DISK, CHANGE_TRACKING_STATE),
    a ``uuid.UUID`` for IDENTIFIER and VIRTUAL_DISK_ID, an int for PROVIDER_SUBTYPE and
    VHD_PHYSICAL_SECTOR_SIZE. Other versions fail with ERROR_NOT_SUPPORTED."""
    device = _device_of(handle)
    getter = _GETTERS.get(version)
    if getter is None:
        known = GET_VIRTUAL_DISK_INFO_UNSPECIFIED < version <= GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE
        raise VirtDiskError(ERROR_NOT_SUPPORTED if known else ERROR_INVALID_PARAMETER,
                      f"GET_VIRTUAL_DISK_INFO version {version!r} is not supported")
    with _windows_errors(handle.path):
        return getter(handle, device)


def set_virtual_disk_information(handle: VirtualDiskHandle, version: int, value) -> None:
    """SetVirtualDiskInformation with SET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE: switch resilient
    change tracking on (``value`` true) or off. Needs a writable handle, which stays usable; asking
    for the state tracking is already in fails with ERROR_CTLOG_INVALID_TRACKING_STATE, as on Windows."""
    device = _device_of(handle)
    if version != SET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE:
        known = SET_VIRTUAL_DISK_INFO_UNSPECIFIED < version <= SET_VIRTUAL_DISK_INFO_PARENT_LOCATOR
        raise VirtDiskError(ERROR_NOT_SUPPORTED if known else ERROR_INVALID_PARAMETER,
                      f"SET_VIRTUAL_DISK_INFO version {version!r} is not supported")
    if not handle.writable:
        raise VirtDiskError(ERROR_ACCESS_DENIED, f"{handle.path}: the handle is read-only; changing change tracking "
                                           "needs a writable one")
    enable = bool(value)
    with _windows_errors(handle.path):
        if _tracking_status(handle, device).enabled == enable:
            raise VirtDiskError(ERROR_CTLOG_INVALID_TRACKING_STATE,
                          f"{handle.path}: change tracking is already {'on' if enable else 'off'}")
        handle._reopen_around(lambda: tracking.enable(handle.path) if enable else tracking.disable(handle.path))


# -- QueryChangesVirtualDisk ----------------------------------------------------------------------

def query_changes_virtual_disk(handle: VirtualDiskHandle, change_tracking_id: str, byte_offset: int,
                               byte_length: int, flags: int = QUERY_CHANGES_VIRTUAL_DISK_FLAG_NONE,
                               max_ranges: int = tracking.DEFAULT_MAX_RANGES) -> tuple[list[tuple[int, int]], int]:
    """QueryChangesVirtualDisk: the ranges ``(byte_offset, byte_length)`` written after
    ``change_tracking_id`` inside the area, at most ``max_ranges`` (the RangeCount capacity), and
    ProcessedLength, how much of the area the answer covers. A caller continues at
    ``byte_offset + processed_length`` until it has covered the whole area."""
    device = _device_of(handle)
    if flags != QUERY_CHANGES_VIRTUAL_DISK_FLAG_NONE:
        raise VirtDiskError(ERROR_INVALID_PARAMETER, f"QUERY_CHANGES_VIRTUAL_DISK_FLAG {flags!r} is not defined")
    with _windows_errors(handle.path):
        tracker = device.change_tracker()
        if tracker is not None:  # a writer's answer includes its writes not yet sealed
            return tracker.query(change_tracking_id, byte_offset, byte_length, max_ranges)
        return tracking.query(handle.path, change_tracking_id, byte_offset, byte_length, max_ranges=max_ranges)


# -- reading and writing --------------------------------------------------------------------------

def _data_device(handle: VirtualDiskHandle, offset: int, length: int, *, write: bool = False) -> BlockDevice:
    device = _device_of(handle)
    if handle.get_info_only:
        raise VirtDiskError(ERROR_ACCESS_DENIED, f"{handle.path}: the handle was opened to get information only")
    if write and not handle.writable:
        raise VirtDiskError(ERROR_ACCESS_DENIED, f"{handle.path}: the handle is read-only")
    if offset < 0 or length < 0 or offset + length > device.size:
        raise VirtDiskError(ERROR_INVALID_PARAMETER, f"{handle.path}: range {offset:#x}+{length:#x} lies outside the "
                                               f"disk ({device.size} bytes)")
    return device


def read_virtual_disk(handle: VirtualDiskHandle, offset: int, length: int) -> bytes:
    """Read ``length`` bytes of the virtual disk at ``offset`` (ReadFile on an attached disk)."""
    device = _data_device(handle, offset, length)
    with _windows_errors(handle.path):
        return device.read(offset, length)


def write_virtual_disk(handle: VirtualDiskHandle, offset: int, data) -> None:
    """Write ``data`` at ``offset`` (WriteFile on an attached disk); through the tracking filter
    when tracking is on. Needs a writable handle."""
    view = memoryview(data).cast("B")
    device = _data_device(handle, offset, len(view), write=True)
    with _windows_errors(handle.path):
        device.write(offset, view)
