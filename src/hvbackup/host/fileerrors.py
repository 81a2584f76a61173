"""File system failures at the host's boundary.

A full disk, a missing permission or a directory removed underneath is an expected failure: every
host operation runs under ``file_errors``, so such an OSError reaches the caller as a HostError
naming the file, with Hyper-V's vendor return value (32769 Access denied, else 32768 Failed).
"""

from __future__ import annotations

import contextlib
import errno
from typing import Iterator

from hvbackup.errors import DiskError, HostError
from hvbackup.host.returns import ACCESS_DENIED, FAILED

_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def return_value(exc: OSError) -> int:
    return ACCESS_DENIED if exc.errno in _DENIED else FAILED


def describe(exc: OSError) -> str:
    """``path: reason`` (both paths of a rename)."""
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    reason = exc.strerror or str(exc)
    return f"{' -> '.join(names)}: {reason}" if names else reason


@contextlib.contextmanager
def file_errors(doing: str) -> Iterator[None]:
    """Turn an OSError raised inside into HostError("<doing>: <file>: <reason>"); usable as a
    decorator too."""
    try:
        yield
    except OSError as exc:
        raise HostError(f"{doing}: {describe(exc)}", return_value(exc)) from exc


def write_failed(exc: DiskError) -> HostError:
    """A DiskError from writing a metadata file (it names the file) as the host's error."""
    cause = exc.__cause__
    return HostError(str(exc), return_value(cause) if isinstance(cause, OSError) else FAILED)
