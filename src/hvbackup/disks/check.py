"""Checking a disk file for damage, and repairing what can be repaired without losing data.

Every damage the engine detects is a problem: what stops the file from opening (with its parents),
the damage it survives (a damaged copy of a redundant structure, a log not yet replayed), what the
layers above find wrong with their own records of the disk (``inspect``: lost change tracking), and
a name that claims a format the file does not have. Checking reads only; a path that cannot be read
at all is an error, any damaged file a report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from hvbackup import disks
from hvbackup.disks.device import BlockDevice
from hvbackup.disks.fileio import open_disk_file, read_exact
from hvbackup.disks.naming import format_claimed
from hvbackup.disks.probe import detect_format
from hvbackup.disks.vhd import VhdDisk
from hvbackup.disks.vhdx import identifier
from hvbackup.disks.vhdx.create import CREATOR
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.errors import DiskError, DiskFormatError

_NAMES = {"vhdx": "VHDX", "vhd": "VHD"}
_OPENERS = {"vhdx": VhdxDisk.open, "vhd": VhdDisk.open}
Inspect = Callable[[BlockDevice], list[str]]  # problems a layer above finds in the opened disk


@dataclass
class CheckReport:
    path: str
    format: str
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "ok": self.ok,
                "problems": self.problems, "repaired": self.repaired}


def check(path: str | os.PathLike, *, repair: bool = False, inspect: Inspect | None = None) -> CheckReport:
    """Problems found in ``path``, with those ``inspect`` finds in the disk opened read-only; with
    ``repair``, those fixed are moved to ``repaired`` and only what remains is reported as a problem.
    Raises DiskError only for a path that cannot be read."""
    path = os.fspath(path)
    try:
        fmt = detect_format(path)
    except DiskFormatError:  # readable but empty
        fmt = None
    report = CheckReport(path, fmt or "raw")
    not_repaired = None
    if repair and fmt is not None:
        report.repaired, not_repaired = _repair(path, fmt)
    report.problems = _problems(path, fmt, inspect)
    if not_repaired and report.problems and not_repaired not in report.problems:
        report.problems.append(f"not repaired: {not_repaired}")
    return report


def _problems(path: str, fmt: str | None, inspect: Inspect | None) -> list[str]:
    problems = []
    if fmt is None:
        problems.append("the file is empty: it holds no disk")
    else:
        try:
            with disks.open(path, read_only=True) as disk:
                problems += disk.problems()
                if inspect is not None:
                    problems += inspect(disk)
        except DiskError as exc:
            problems.append(_without_path(str(exc), path))
    claimed = format_claimed(path)
    if claimed not in (None, fmt):
        problems.append(_misnamed(path, claimed, fmt))
    return problems


def _misnamed(path: str, claimed: str, fmt: str | None) -> str:
    claim = f"the name says {_NAMES[claimed]}"
    if fmt in _NAMES:
        return f"{claim}, but the file is a {_NAMES[fmt]}"
    if fmt is None:
        return f"{claim}, but the file is empty"
    try:  # why the file is not one: what opening it as one finds wrong
        _OPENERS[claimed](path, read_only=True).close()
    except DiskError as exc:
        return f"{claim}, but the file is not one: {_without_path(str(exc), path)}"
    return f"{claim}, but the file is not recognised as one"


def _repair(path: str, fmt: str) -> tuple[list[str], str | None]:
    """What was repaired, and why repairing could not run (None if it could)."""
    done = []
    try:
        if fmt == "vhdx" and _restore_identifier(path):
            done.append("restored the file type identifier")
        # The format alone: no repair changes what a reader sees, so the layers above have nothing to record.
        with disks.open(path) as disk:
            done += disk.repair()
    except DiskError as exc:
        return done, _without_path(str(exc), path)
    return done, None


def _restore_identifier(path: str) -> bool:
    """Rewrite a damaged VHDX file type identifier; only a file whose headers are valid gets here
    (that is how it was recognised), and its creator string is informational only."""
    fd = open_disk_file(path, read_only=False)
    try:
        if read_exact(fd, len(identifier.SIGNATURE), identifier.OFFSET, "file type identifier") == identifier.SIGNATURE:
            return False
        identifier.restore(fd, CREATOR)
        return True
    finally:
        os.close(fd)


def _without_path(message: str, path: str) -> str:
    """A problem line without the file name the report already carries."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message
