"""What every command shares: options, size arguments, JSON and text output, tables, progress bars,
exit codes.

Exit codes: 0 success; 1 a check found problems or a comparison found a difference; 2 the input is
not a readable disk or the command failed (one line on stderr); 130 interrupted (SIGINT), 143
terminated (SIGTERM).

Loading this module costs almost nothing (no rich, no numpy): every command starts fast, and rich is
imported only to draw a progress bar on a terminal.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from typing import Iterator, Optional

import typer

from hvbackup.errors import CodedError, HvBackupError

EXIT_OK, EXIT_FOUND, EXIT_FAILED = 0, 1, 2

JSON = typer.Option(False, "--json", help="Print one JSON value instead of text.")
HOST = typer.Option(None, "--host", envvar="HVBACKUP_HOST", show_envvar=True, metavar="DIR",
                    help="The host directory (hvbackup host init).")
REPO = typer.Option(None, "--repo", envvar="HVBACKUP_REPO", show_envvar=True, metavar="DIR",
                    help="The repository (hvbackup repo init).")
PASSPHRASE_ENV = "HVBACKUP_PASSPHRASE"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, option: str | None = None) -> int:
    """'10G', '512M', '1.5T', '4096' — K/M/G/T are powers of 1024."""
    match = _SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a size (a number with an optional K, M, G or T suffix)",
                                 param_hint=option)
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value != int(value):
        raise typer.BadParameter(f"{text!r} is not a whole number of bytes", param_hint=option)
    return int(value)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def emit_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def say(text: str) -> None:
    """One line (or more) of text output on stdout."""
    sys.stdout.write(text + "\n")


def warn(text: str) -> None:
    sys.stderr.write(f"hvbackup: {text}\n")


def table(headers: list[str], rows: list[list[str]]) -> None:
    """Columns padded to their widest cell, never wrapped: an ID or a path stays on one line however
    narrow the terminal, so it can be copied, and a pipe gets whole values."""
    cells = [headers, *rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(headers))]
    for row in cells:
        say("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def error_line(exc: HvBackupError) -> str:
    """An expected failure as one line; a Windows-coded one starts with the code's name, and one
    that means change tracking cannot answer says what to do about it."""
    if not isinstance(exc, CodedError):
        return str(exc)
    from hvbackup.virtdisk import CHANGE_TRACKING_RESET_ERRORS

    advice = "; a full backup is needed" if exc.code in CHANGE_TRACKING_RESET_ERRORS else ""
    return f"{exc.name}: {exc}{advice}"


def show_help_without_command(ctx: typer.Context) -> None:
    """A group called without a command prints its help."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(EXIT_OK)


def group(help: str) -> typer.Typer:
    """A command group: plain help (no rich rendering to load), its help when called bare."""
    app = typer.Typer(help=help, rich_markup_mode=None, add_completion=False)
    app.callback(invoke_without_command=True)(show_help_without_command)
    return app


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def terminal():
    """The rich console progress bars draw on: stderr."""
    from rich.console import Console

    return Console(stderr=True)


def byte_progress():
    """Rich progress bars on stderr counting bytes: done, speed, time left."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=terminal(), transient=True)


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Optional[object]]:
    """A callback (done, total) that drives a progress bar on stderr when it is a terminal."""
    if not (enabled and stderr_is_terminal()):
        yield None
        return
    with byte_progress() as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


@contextlib.contextmanager
def count_progress(description: str, enabled: bool = True) -> Iterator[Optional[object]]:
    """A callback (done, total) counting items (chunks, directories) on stderr when it is a terminal."""
    if not (enabled and stderr_is_terminal()):
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=terminal(), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


@contextlib.contextmanager
def job_progress(description: str, enabled: bool = True) -> Iterator[Optional[object]]:
    """A callback (percent) that drives a percentage bar for a host job (Msvm_ConcreteJob's
    PercentComplete) on stderr when it is a terminal."""
    if not (enabled and stderr_is_terminal()):
        yield None
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=terminal(), transient=True) as bar:
        task = bar.add_task(description, total=100)
        yield lambda percent: bar.update(task, completed=percent)
