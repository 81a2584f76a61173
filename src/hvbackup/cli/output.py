"""What every command shares: size arguments, JSON and human output, progress bars, exit codes.

Exit codes: 0 success; 1 a check found problems or a comparison found a difference; 2 the input is
not a readable disk or the command failed (one line on stderr).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from typing import Iterator

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from hvbackup.errors import CodedError, HvBackupError
from hvbackup.virtdisk import CHANGE_TRACKING_RESET_ERRORS

EXIT_OK, EXIT_FOUND, EXIT_FAILED = 0, 1, 2

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'10G', '512M', '1.5T', '4096' — K/M/G/T are powers of 1024."""
    match = _SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a size (a number with an optional K, M, G or T suffix)")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value != int(value):
        raise typer.BadParameter(f"{text!r} is not a whole number of bytes")
    return int(value)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def emit_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def error_line(exc: HvBackupError) -> str:
    """An expected failure as one line; a Windows-coded one starts with the code's name, and one
    that means change tracking cannot answer says what to do about it."""
    if not isinstance(exc, CodedError):
        return str(exc)
    advice = "; a full backup is needed" if exc.code in CHANGE_TRACKING_RESET_ERRORS else ""
    return f"{exc.name}: {exc}{advice}"


def show_help_without_command(ctx: typer.Context) -> None:
    """A group called without a command prints its help."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(EXIT_OK)


def byte_progress() -> Progress:
    """Rich progress bars on stderr counting bytes: done, speed, time left."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=stderr, transient=True)


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator:
    """A callback (done, total) that drives a progress bar on stderr when it is a terminal."""
    if not (enabled and stderr.is_terminal):
        yield None
        return
    with byte_progress() as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


@contextlib.contextmanager
def count_progress(description: str, enabled: bool = True) -> Iterator:
    """A callback (done, total) counting items (chunks, directories) on stderr when it is a terminal."""
    if not (enabled and stderr.is_terminal):
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


@contextlib.contextmanager
def job_progress(description: str, enabled: bool = True) -> Iterator:
    """A callback (percent) that drives a percentage bar for a host job (Msvm_ConcreteJob's
    PercentComplete) on stderr when it is a terminal."""
    if not (enabled and stderr.is_terminal):
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=100)
        yield lambda percent: bar.update(task, completed=percent)
