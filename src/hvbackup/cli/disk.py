"""``hvbackup disk``: create, inspect, check, convert, map, merge and compare virtual disk files, and
track their changes (cli/tracking.py)."""

from __future__ import annotations

import os
from enum import Enum
from typing import Optional

import typer
from rich.table import Table

from hvbackup import disks
from hvbackup.cli import tracking
from hvbackup.cli.output import (
    EXIT_FOUND,
    EXIT_OK,
    emit_json,
    human_size,
    parse_size,
    progress_bar,
    show_help_without_command,
    stdout,
)

app = typer.Typer(help="Virtual disk files: VHDX, VHD and raw.")
app.callback(invoke_without_command=True)(show_help_without_command)


class Format(str, Enum):
    vhdx = "vhdx"
    vhd = "vhd"
    raw = "raw"


class DiskType(str, Enum):
    fixed = "fixed"
    dynamic = "dynamic"
    differencing = "differencing"


JSON = typer.Option(False, "--json", help="Print one JSON object instead of text.")


@app.command()
def create(
    path: str,
    size: Optional[str] = typer.Option(None, "--size", help="Virtual size, e.g. 10G (not needed for differencing)."),
    format: Format = typer.Option(Format.vhdx, "--format"),
    type: DiskType = typer.Option(DiskType.dynamic, "--type"),
    parent: Optional[str] = typer.Option(None, "--parent", help="Parent disk of a differencing disk."),
    block_size: Optional[str] = typer.Option(None, "--block-size", help="1M to 256M, a power of two."),
    logical_sector_size: int = typer.Option(512, "--logical-sector-size"),
    physical_sector_size: int = typer.Option(4096, "--physical-sector-size"),
    json: bool = JSON,
) -> None:
    """Create a new disk file."""
    if size is None and type != DiskType.differencing:
        raise typer.BadParameter("--size is required", param_hint="--size")
    with disks.create(
        path,
        parse_size(size) if size else None,
        format=format.value,
        type=type.value,
        parent=parent,
        block_size=parse_size(block_size) if block_size else None,
        logical_sector_size=logical_sector_size,
        physical_sector_size=physical_sector_size,
    ) as disk:
        info = disk.info()
    if json:
        emit_json(info)
    else:
        stdout.print(f"created {path}: {info['format']} {info['type']}, {human_size(info['virtual_size'])}")


@app.command()
def info(path: str, json: bool = JSON) -> None:
    """Show what a disk file is: format, type, sizes, identifiers, parent."""
    with disks.open(path, read_only=True) as disk:
        details = disk.info()
    if json:
        emit_json(details)
        return
    table = Table(show_header=False, box=None)
    for key, value in details.items():
        sized = key in ("virtual_size", "file_size")
        table.add_row(key, f"{human_size(value)} ({value} bytes)" if sized else str(value))
    stdout.print(table)


@app.command()
def check(
    path: str,
    repair: bool = typer.Option(False, "--repair", help="Fix what can be fixed without losing data."),
    json: bool = JSON,
) -> None:
    """Check a disk file for damage. Exit 0: sound; 1: problems found (listed)."""
    report = disks.check(path, repair=repair)
    if json:
        emit_json(report.as_dict())
    else:
        for line in report.repaired:
            stdout.print(f"repaired: {line}", markup=False)
        for line in report.problems:
            stdout.print(f"problem: {line}", markup=False)
        if report.ok:
            stdout.print(f"{path}: no problems found", markup=False)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_FOUND)


@app.command()
def convert(
    src: str,
    dst: str,
    output_format: Optional[Format] = typer.Option(None, "-O", "--output-format",
                                                   help="Default: from DST's suffix (.vhdx, .vhd, else raw)."),
    type: DiskType = typer.Option(DiskType.dynamic, "--type"),
    block_size: Optional[str] = typer.Option(None, "--block-size"),
    json: bool = JSON,
) -> None:
    """Convert between raw, VHD and VHDX; a differencing chain is flattened."""
    with progress_bar(f"converting {os.path.basename(src)}", enabled=not json) as progress:
        disks.convert(
            src, dst,
            format=output_format.value if output_format else None,
            type=type.value,
            block_size=parse_size(block_size) if block_size else None,
            progress=progress,
        )
    with disks.open(dst, read_only=True) as disk:
        details = disk.info()
    if json:
        emit_json(details)
    else:
        stdout.print(f"converted {src} -> {dst} ({details['format']} {details['type']}, "
                     f"file {human_size(details['file_size'])})", markup=False)


@app.command("map")
def map_(path: str, json: bool = JSON) -> None:
    """Show the runs of data, zeros and unallocated space (and which layer of a chain holds them)."""
    with disks.open(path, read_only=True) as disk:
        extents = [
            {"offset": e.offset, "length": e.length, "state": e.state.value, "depth": e.depth}
            for e in disk.extents()
        ]
    if json:
        emit_json(extents)
        return
    table = Table("offset", "length", "state", "depth", box=None)
    for e in extents:
        table.add_row(f"{e['offset']:#x}", f"{e['length']:#x}", e["state"], str(e["depth"]))
    stdout.print(table)


@app.command()
def merge(child: str, json: bool = JSON) -> None:
    """Fold a differencing disk into its parent and remove it (like Merge-VHD)."""
    with progress_bar(f"merging {os.path.basename(child)}", enabled=not json) as progress:
        parent = disks.merge(child, progress=progress)
    if json:
        emit_json({"merged": child, "into": parent})
    else:
        stdout.print(f"merged {child} into {parent}", markup=False)


@app.command()
def compare(a: str, b: str, json: bool = JSON) -> None:
    """Compare the contents two disks present. Exit 0: identical; 1: different."""
    with progress_bar("comparing", enabled=not json) as progress:
        result = disks.compare(a, b, progress=progress)
    if json:
        emit_json({"identical": result.identical, "first_difference": result.first_difference,
                   "reason": result.reason})
    elif result.identical:
        stdout.print("identical")
    else:
        stdout.print(f"different: {result.reason}", markup=False)
    raise typer.Exit(EXIT_OK if result.identical else EXIT_FOUND)


app.command("tracking")(tracking.tracking_command)
app.command("changes")(tracking.changes)
