"""Checking a disk file for damage, and repairing what can be repaired without losing data."""

from __future__ import annotations

from dataclasses import dataclass, field

from hvbackup import disks
from hvbackup.disks.probe import detect_format
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.errors import DiskFormatError


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


def check(path: str, *, repair: bool = False) -> CheckReport:
    """Problems found in ``path``; with ``repair``, those fixed are moved to ``repaired`` and only
    what remains is reported as a problem."""
    fmt = detect_format(path)
    report = CheckReport(path, fmt)
    if repair:
        try:
            with disks.open(path) as disk:
                if isinstance(disk, VhdxDisk):
                    report.repaired = disk.repair()
        except DiskFormatError:
            pass  # the read-only pass below says what is wrong
    try:
        with disks.open(path, read_only=True) as disk:
            if isinstance(disk, VhdxDisk):
                report.problems = _vhdx_problems(disk)
    except DiskFormatError as exc:
        report.problems.append(str(exc))
    return report


def _vhdx_problems(disk: VhdxDisk) -> list[str]:
    problems = []
    if disk.log_pending:
        problems.append("the log holds metadata updates not yet applied (opening read-write replays them)")
    if not disk.headers.both_valid:
        problems.append("one of the two headers is damaged")
    problems += disk.region_table_problems
    return problems
