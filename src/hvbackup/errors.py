"""One exception hierarchy for every layer.

The CLI turns any ``HvBackupError`` into one line on stderr and exit code 2; anything else is a bug.
"""


class HvBackupError(Exception):
    """Base of every expected failure in hvbackup."""


class DiskError(HvBackupError):
    """A virtual disk operation could not be performed (bad arguments, read-only disk, I/O failure)."""


class DiskFormatError(DiskError):
    """A file is not a valid virtual disk: corrupt, truncated, or using features this engine refuses."""


class ParentError(DiskFormatError):
    """The parent of a differencing disk is missing, does not match its linkage, or forms a loop."""


class DiskBusyError(DiskError):
    """Another process has the disk open for writing."""
