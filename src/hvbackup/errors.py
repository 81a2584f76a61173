"""One exception hierarchy for every layer.

The CLI turns any ``HvBackupError`` into one line on stderr and exit code 2; anything else is a bug.
"""

from hvbackup.winerror import name_of


class HvBackupError(Exception):
    """Base of every expected failure in hvbackup."""


class DiskError(HvBackupError):
    """A virtual disk operation could not be performed (bad arguments, read-only disk, I/O failure)."""


class DiskFormatError(DiskError):
    """A file is not a valid virtual disk: corrupt, truncated, or using features this engine refuses.

    ``reason`` names the rule the file breaks as a stable code, ``<format>.<structure>.<what>``
    (docs/disks.md, "Errors and reason codes"): programs and tests match the code, people read the
    message, whose wording may change."""

    reason = "disk.file.invalid"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ParentError(DiskFormatError):
    """The parent of a differencing disk is missing, does not match its linkage, or forms a loop."""

    reason = "disk.parent.unusable"


class TrackingFormatError(DiskFormatError):
    """A change tracking side file (``.rct``, ``.mrt``) is damaged or does not belong to the disk;
    its reason codes are in docs/tracking.md. Loading tracking turns it into lost tracking."""


class DiskBusyError(DiskError):
    """Another process has the disk open for writing."""


class HostError(HvBackupError):
    """The virtualization host cannot do what was asked (unknown VM, wrong state, damaged metadata).
    ``return_value`` is the WMI method return value Hyper-V gives for it (32768 Failed by default)."""

    def __init__(self, message: str, return_value: int = 32768):
        super().__init__(message)
        self.return_value = return_value


class CodedError(HvBackupError):
    """A failure that carries a Windows error code (``hvbackup.winerror``) for API-shaped callers."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code

    @property
    def name(self) -> str:
        return name_of(self.code)


class TrackingError(CodedError):
    """Change tracking cannot answer: disabled, lost, changed offline, or an ID it does not know.
    Each of these tells a backup application to take a full backup."""


class VirtDiskError(CodedError):
    """A ``hvbackup.virtdisk`` call failed; ``code`` is the Windows error the VirtDisk call returns."""


class RepositoryError(HvBackupError):
    """A backup repository cannot do what was asked: not a repository, wrong passphrase, bad arguments."""


class PassphraseNeededError(RepositoryError):
    """The repository is encrypted and no passphrase was given."""


class RepositoryCorruptError(RepositoryError):
    """A repository file failed its checks (magic, version, bounds, checksum, AEAD tag or content hash)."""


class RepositoryLockedError(RepositoryError):
    """Another process holds the repository's writer lock."""


class BackupError(HvBackupError):
    """A VM's backup failed; its checkpoint was removed and its last reference point kept. ``vm``
    is the VM's name (as given, when it could not be found)."""

    def __init__(self, vm: str, message: str):
        super().__init__(f"VM {vm}: {message}")
        self.vm = vm


class Interrupted(BackupError):
    """The backup was stopped (Ctrl-C, SIGTERM) and cleaned up as a failure is."""


class NeedsFull(HvBackupError):
    """The changes since the base cannot be had for this disk, so it is read in full. ``reason`` is
    a stable code (docs/backup.md, "Why a disk is read in full"); the message says it for people."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason
