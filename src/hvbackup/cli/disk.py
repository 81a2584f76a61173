"""``hvbackup disk``: create, inspect, check, convert, map, merge and compare virtual disk files, and
track their changes (cli/tracking.py).

Commands that change a file (create, check --repair, convert, merge, tracking on/off) refuse a file
a host owns (``hvbackup.host.ownership``): a VM's disk or side file, or any path under a host's vms/
directory. Changing one underneath the host would break its VM; the host's own commands (checkpoint,
vm) do it safely. Every path taken is made absolute first, so every path printed is.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Optional

import typer

from hvbackup.cli import tracking
from hvbackup.cli.output import (
    EXIT_FOUND,
    EXIT_OK,
    JSON,
    emit_json,
    group,
    human_size,
    parse_size,
    progress_bar,
    say,
    table,
)

app = group("Virtual disk files: VHDX, VHD and raw.")

SUFFIXES = ".vhdx/.avhdx, .vhd/.avhd, .raw/.img"
SECTOR_SIZES = (512, 4096)
BLOCK_SIZE_HELP = ("A power of two: VHDX 1M to 256M (default 32M; differencing 2M), VHD 4K to 256M (default 2M). "
                   "Not for raw images or fixed VHDs, which have no blocks.")


class Format(str, Enum):
    vhdx = "vhdx"
    vhd = "vhd"
    raw = "raw"


class DiskType(str, Enum):
    fixed = "fixed"
    dynamic = "dynamic"
    differencing = "differencing"


class ConvertType(str, Enum):
    fixed = "fixed"
    dynamic = "dynamic"


def _size(text: Optional[str], option: str) -> Optional[int]:
    return parse_size(text, option) if text is not None else None


def _sector_sizes(fmt: str, logical: Optional[int], physical: Optional[int]) -> dict:
    """The sector sizes to create a disk of format ``fmt`` with; only VHDX has a choice."""
    chosen = {}
    for value, option, key in ((logical, "--logical-sector-size", "logical_sector_size"),
                               (physical, "--physical-sector-size", "physical_sector_size")):
        if value is None:
            continue
        if value not in SECTOR_SIZES:
            raise typer.BadParameter(f"{value} is not a sector size: 512 or 4096", param_hint=option)
        if fmt != "vhdx" and value != 512:
            raise typer.BadParameter(f"a {fmt.upper() if fmt == 'vhd' else fmt} disk has 512-byte sectors only",
                                     param_hint=option)
        if fmt == "vhdx":
            chosen[key] = value
    return chosen


def _block_size(fmt: str, disk_type: str, text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    if fmt == "raw" or (fmt == "vhd" and disk_type == "fixed"):
        raise typer.BadParameter(f"a {'raw image' if fmt == 'raw' else 'fixed VHD'} has no blocks",
                                 param_hint="--block-size")
    return parse_size(text, "--block-size")


def _format_of(path: str, given: Optional[Format]) -> str:
    """The format -O names, else the one PATH's suffix names (an unknown suffix needs -O)."""
    from hvbackup import disks

    return disks.format_for_path(path, given.value if given else None)


def new_file(path: str) -> str:
    """``path`` made absolute (every path printed, error messages too, is), checked as the name of a
    file to create: not an existing file or directory, in a directory that exists."""
    from hvbackup.errors import DiskError

    where = os.path.abspath(path)
    if os.path.isdir(where):
        raise DiskError(f"{where}: is a directory; give the name of the new file")
    if os.path.lexists(where):
        raise DiskError(f"{where}: already exists (an existing file is never replaced)")
    parent = os.path.dirname(where)
    if not os.path.isdir(parent):
        why = "is not a directory" if os.path.lexists(parent) else "no such directory"
        raise DiskError(f"{parent}: {why} (to hold the new file {os.path.basename(where)})")
    return where


def unowned(paths: str | list[str], action: str):
    """A context: refuse to ``action`` a file a host owns (a VM's disk or side file, or a new file
    under a host's vms/ directory), saying to change it through the host; while the block runs the
    host's lock is held, so no host operation starts on the file meanwhile."""
    from hvbackup.host import ownership

    return ownership.changing([os.path.abspath(p) for p in ([paths] if isinstance(paths, str) else paths)], action)


@app.command()
def create(
    path: str = typer.Argument(..., metavar="PATH", help=f"The new disk file (its suffix, {SUFFIXES}, chooses "
                                                          "the format unless -O is given)."),
    size: Optional[str] = typer.Option(None, "--size", metavar="SIZE",
                                       help="Virtual size, e.g. 10G (a differencing disk takes its parent's)."),
    format: Optional[Format] = typer.Option(None, "-O", "--format",
                                            help="The format (default: from PATH's suffix)."),
    type: DiskType = typer.Option(DiskType.dynamic, "--type", help="fixed, dynamic or differencing (with --parent)."),
    parent: Optional[str] = typer.Option(None, "--parent", metavar="FILE", help="Parent of a differencing disk."),
    block_size: Optional[str] = typer.Option(None, "--block-size", metavar="SIZE", help=BLOCK_SIZE_HELP),
    logical_sector_size: Optional[int] = typer.Option(None, "--logical-sector-size", metavar="BYTES",
                                                      help="VHDX: 512 (default) or 4096; VHD and raw have 512."),
    physical_sector_size: Optional[int] = typer.Option(None, "--physical-sector-size", metavar="BYTES",
                                                       help="VHDX: 4096 (default) or 512; VHD and raw have 512."),
    json: bool = JSON,
) -> None:
    """Create a new disk file; an existing file is never replaced. A differencing disk takes its size,
    sector sizes and disk ID from --parent."""
    from hvbackup import stack

    path = new_file(path)
    parent = os.path.abspath(parent) if parent is not None else None
    differencing = type == DiskType.differencing
    if differencing and parent is None:
        raise typer.BadParameter("a differencing disk needs one", param_hint="--parent")
    if parent is not None and not differencing:
        raise typer.BadParameter("only a differencing disk (--type differencing) has a parent", param_hint="--parent")
    if size is None and not differencing:
        raise typer.BadParameter("--size is required (except for a differencing disk)", param_hint="--size")
    if size is not None and differencing:
        raise typer.BadParameter("a differencing disk takes its size from --parent", param_hint="--size")
    virtual_size = _size(size, "--size")
    if virtual_size == 0:
        raise typer.BadParameter("a disk cannot be 0 bytes", param_hint="--size")
    if differencing and (logical_sector_size is not None or physical_sector_size is not None):
        given = "--logical-sector-size" if logical_sector_size else "--physical-sector-size"
        raise typer.BadParameter("a differencing disk has its parent's sector sizes", param_hint=given)
    fmt = _format_of(path, format)
    sized = {"block_size": _block_size(fmt, type.value, block_size),
             **_sector_sizes(fmt, logical_sector_size, physical_sector_size)}
    with unowned(path, "create"):
        with stack.create(path, virtual_size, format=fmt, type=type.value, parent=parent, **sized) as disk:
            details = absolute(disk.info())
    if json:
        emit_json(details)
    else:
        say(f"created {path}: {details['format']} {details['type']}, "
            f"{human_size(details['virtual_size'])}")


def absolute(details: dict) -> dict:
    """A disk's info with its own and its parent's paths absolute: every path printed is."""
    for key in ("path", "parent"):
        if isinstance(details.get(key), str):
            details[key] = os.path.abspath(details[key])
    return details


def _field(key: str, value) -> str:
    if key in ("virtual_size", "file_size") and isinstance(value, int):
        return f"{human_size(value)} ({value} bytes)"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def show_fields(fields: dict) -> None:
    """``key  value`` lines, keys padded; values never wrapped."""
    width = max((len(k) for k in fields), default=0)
    for key, value in fields.items():
        say(f"{key.ljust(width)}  {value}")


@app.command()
def info(path: str = typer.Argument(..., metavar="FILE", help="A VHDX, VHD or raw disk file."),
         json: bool = JSON) -> None:
    """Show what a disk file is: format, type, sizes, identifiers, parent, log state."""
    from hvbackup import stack

    path = os.path.abspath(path)
    with stack.open(path, read_only=True) as disk:
        details = absolute(disk.info())
    if json:
        emit_json(details)
    else:
        show_fields({key: _field(key, value) for key, value in details.items()})


@app.command()
def check(
    path: str = typer.Argument(..., metavar="FILE", help="The disk file to check."),
    repair: bool = typer.Option(False, "--repair", help="Replay a pending log and rewrite a damaged header or "
                                                        "region table copy (nothing that holds data is lost)."),
    json: bool = JSON,
) -> None:
    """Check a disk file for damage. Exit 0: sound; 1: problems remain (listed)."""
    from hvbackup import stack

    path = os.path.abspath(path)
    if repair:
        with unowned(path, "repair"):
            report = stack.check(path, repair=True)
    else:
        report = stack.check(path)
    if json:
        emit_json({**report.as_dict(), "path": path})
    else:
        for line in report.repaired:
            say(f"repaired: {line}")
        for line in report.problems:
            say(f"problem: {line}")
        if report.ok:
            say(f"{path}: no problems found")
    raise typer.Exit(EXIT_OK if report.ok else EXIT_FOUND)


@app.command()
def convert(
    src: str = typer.Argument(..., metavar="SRC", help="The disk to read (a differencing chain is flattened)."),
    dst: str = typer.Argument(..., metavar="DST", help="The new file to write; it must not exist."),
    output_format: Optional[Format] = typer.Option(None, "-O", "--format", "--output-format",
                                                   help=f"DST's format (default: from its suffix, {SUFFIXES})."),
    type: ConvertType = typer.Option(ConvertType.dynamic, "--type", help="fixed or dynamic (VHDX and VHD)."),
    block_size: Optional[str] = typer.Option(None, "--block-size", metavar="SIZE", help=BLOCK_SIZE_HELP),
    json: bool = JSON,
) -> None:
    """Write SRC's contents as a new disk file DST, in any format."""
    from hvbackup import disks, stack

    src, dst = os.path.abspath(src), new_file(dst)
    fmt = _format_of(dst, output_format)
    size = _block_size(fmt, type.value, block_size)
    with unowned(dst, "convert into"), progress_bar(f"converting {os.path.basename(src)}", enabled=not json) as bar:
        disks.convert(src, dst, format=fmt, type=type.value, block_size=size, progress=bar)
    with stack.open(dst, read_only=True) as disk:
        details = absolute(disk.info())
    if json:
        emit_json(details)
    else:
        say(f"converted {src} -> {dst} ({details['format']} {details['type']}, "
            f"file {human_size(details['file_size'])})")


@app.command("map")
def map_(path: str = typer.Argument(..., metavar="FILE", help="The disk file."), json: bool = JSON) -> None:
    """Show the runs of data, zeros and unallocated space, and which file of a chain holds each
    (depth 0: this file, 1: its parent, ...)."""
    from hvbackup import stack

    path = os.path.abspath(path)
    with stack.open(path, read_only=True) as disk:
        extents = [{"offset": e.offset, "length": e.length, "state": e.state.value, "depth": e.depth}
                   for e in disk.extents()]
    if json:
        emit_json(extents)
    else:
        table(["offset", "length", "state", "depth"],
              [[f"{e['offset']:#x}", f"{e['length']:#x}", e["state"], str(e["depth"])] for e in extents])


@app.command()
def merge(child: str = typer.Argument(..., metavar="CHILD", help="The differencing disk to fold into its parent."),
          json: bool = JSON) -> None:
    """Fold a differencing disk into its parent and delete it (like Merge-VHD)."""
    from hvbackup import stack

    child = os.path.abspath(child)
    with stack.open(child, read_only=True) as disk:
        parent = disk.parent.path if disk.parent is not None else None
    with unowned([child, parent] if parent else [child], "merge"), \
            progress_bar(f"merging {os.path.basename(child)}", enabled=not json) as bar:
        parent = stack.merge(child, progress=bar)  # a disk with no parent: says there is nothing to merge into
    merged, into = os.path.abspath(child), os.path.abspath(parent)
    if json:
        emit_json({"merged": merged, "into": into})
    else:
        say(f"merged {merged} into {into}")


@app.command()
def compare(a: str = typer.Argument(..., metavar="A", help="A disk file."),
            b: str = typer.Argument(..., metavar="B", help="Another disk file, of any format."),
            json: bool = JSON) -> None:
    """Compare the contents two disks present. Exit 0: identical; 1: different (the first differing
    offset is printed)."""
    from hvbackup import disks

    a, b = os.path.abspath(a), os.path.abspath(b)
    with progress_bar("comparing", enabled=not json) as bar:
        result = disks.compare(a, b, progress=bar)
    if json:
        emit_json({"identical": result.identical, "first_difference": result.first_difference,
                   "reason": result.reason})
    elif result.identical:
        say("identical")
    else:
        say(f"different: {result.reason}")
    raise typer.Exit(EXIT_OK if result.identical else EXIT_FOUND)


app.command("tracking")(tracking.tracking_command)
app.command("changes")(tracking.changes)
