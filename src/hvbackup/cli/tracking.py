"""``hvbackup disk tracking`` and ``hvbackup disk changes``: resilient change tracking of a VHDX.

``tracking`` switches tracking on or off and shows its status (GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE
plus why tracking cannot answer). ``changes`` asks what changed since an ID the way a backup
application does: QueryChangesVirtualDisk, continued on ProcessedLength until the area is covered.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

import typer
from rich.table import Table

from hvbackup import tracking, virtdisk
from hvbackup.cli.output import emit_json, human_size, parse_size, stdout

JSON = typer.Option(False, "--json", help="Print one JSON value instead of text.")


class Action(str, Enum):
    on = "on"
    off = "off"
    status = "status"


def tracking_command(
    path: str,
    action: Action = typer.Argument(..., help="on, off or status."),
    granularity: Optional[str] = typer.Option(
        None, "--granularity", help="With 'on': the size ranges are reported in, a power of two from 4K to 256M."),
    json: bool = JSON,
) -> None:
    """Switch change tracking of a VHDX on or off, or show whether it can answer queries."""
    if granularity is not None and action != Action.on:
        raise typer.BadParameter("only 'on' takes a granularity", param_hint="--granularity")
    if action == Action.on:
        wanted = parse_size(granularity) if granularity is not None else None
        before = tracking.status(path)
        if wanted and before.state == tracking.Condition.ACTIVE and before.granularity != wanted:
            raise typer.BadParameter(f"tracking is already on with granularity {before.granularity}; switch it off "
                                     "first to change it", param_hint="--granularity")
        status = tracking.enable(path, granularity=wanted)
    elif action == Action.off:
        tracking.disable(path)
        status = tracking.status(path)
    else:
        status = tracking.status(path)
    if json:
        emit_json(status.to_dict())
        return
    table = Table(show_header=False, box=None)
    table.add_row("enabled", _yes_no(status.enabled))
    table.add_row("newer_changes", _yes_no(status.newer_changes))
    table.add_row("most_recent_id", status.most_recent_id or "-")
    table.add_row("state", status.state)
    if status.granularity:
        table.add_row("granularity", human_size(status.granularity))
    if status.problem:
        table.add_row("problem", status.problem)
    stdout.print(table)
    if status.state in (tracking.Condition.LOST, tracking.Condition.CHANGED_OFFLINE):
        stdout.print("earlier IDs can no longer be answered: the next backup of this disk must be a full one "
                     "(the next writer, or 'tracking on', starts a new history)", markup=False, soft_wrap=True)


def changes(
    path: str,
    since: str = typer.Option(..., "--since", help="The change tracking ID to compare with (rctX:...)."),
    offset: Optional[str] = typer.Option(None, "--offset", help="Start of the area to look at (default 0)."),
    length: Optional[str] = typer.Option(None, "--length", help="Length of the area (default: to the end)."),
    json: bool = JSON,
) -> None:
    """List the byte ranges written after a change tracking ID."""
    with virtdisk.open_virtual_disk(path, virtdisk.VIRTUAL_DISK_ACCESS_GET_INFO) as handle:
        size = virtdisk.get_virtual_disk_information(handle, virtdisk.GET_VIRTUAL_DISK_INFO_SIZE).virtual_size
        start = parse_size(offset) if offset is not None else 0
        end = size if length is None else start + parse_size(length)
        ranges, position = [], start
        while True:  # asked at least once, so a bad ID fails even for an empty area
            page, processed = virtdisk.query_changes_virtual_disk(handle, since, position, end - position)
            ranges += page
            position += processed
            if position >= end:
                break
    if json:
        emit_json([{"offset": o, "length": n} for o, n in ranges])
        return
    table = Table("offset", "length", "", box=None)
    for o, n in ranges:
        table.add_row(f"{o:#x}", f"{n:#x}", human_size(n))
    if ranges:
        stdout.print(table)
    changed = sum(n for _, n in ranges)
    stdout.print(f"{len(ranges)} ranges, {human_size(changed)} changed of {human_size(end - start)} "
                 f"since {since}", markup=False, soft_wrap=True)


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"
