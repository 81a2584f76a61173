"""``hvbackup disk tracking`` and ``hvbackup disk changes``: resilient change tracking of a VHDX.

``tracking`` switches tracking on or off and shows its status (GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE
plus why tracking cannot answer). ``changes`` asks what changed since an ID the way a backup
application does: QueryChangesVirtualDisk, continued on ProcessedLength until the area is covered.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Optional

import typer

from hvbackup.cli.output import JSON, emit_json, human_size, parse_size, plural, say, table


class Action(str, Enum):
    on = "on"
    off = "off"
    status = "status"


def tracking_command(
    path: str = typer.Argument(..., metavar="FILE", help="A VHDX file."),
    action: Action = typer.Argument(..., metavar="ACTION", help="on, off or status."),
    granularity: Optional[str] = typer.Option(
        None, "--granularity", metavar="SIZE",
        help="With 'on': the unit changed ranges are reported in, a power of two from 4K to 256M (default 64K, "
             "larger for very large disks)."),
    json: bool = JSON,
) -> None:
    """Switch change tracking of a VHDX on or off, or show whether it can answer queries."""
    from hvbackup import tracking
    from hvbackup.cli.disk import show_fields, unowned

    path = os.path.abspath(path)
    if granularity is not None and action != Action.on:
        raise typer.BadParameter("only 'on' takes a granularity", param_hint="--granularity")
    if action == Action.on:
        wanted = _granularity(granularity) if granularity is not None else None
        with unowned(path, "switch change tracking on for"):
            before = tracking.status(path)
            if wanted is not None and before.state == tracking.Condition.ACTIVE and before.granularity != wanted:
                raise typer.BadParameter(f"tracking is already on with granularity {human_size(before.granularity)}; "
                                         "switch it off first to change it", param_hint="--granularity")
            status = tracking.enable(path, granularity=wanted)
    elif action == Action.off:
        with unowned(path, "switch change tracking off for"):
            tracking.disable(path)
            status = tracking.status(path)
    else:
        status = tracking.status(path)
    if json:
        emit_json(status.to_dict())
        return
    fields = {"enabled": _yes_no(status.enabled), "newer_changes": _yes_no(status.newer_changes),
              "most_recent_id": status.most_recent_id or "-", "state": status.state}
    if status.granularity:
        fields["granularity"] = human_size(status.granularity)
    if status.problem:
        fields["problem"] = status.problem
    show_fields(fields)
    if status.state in (tracking.Condition.LOST, tracking.Condition.CHANGED_OFFLINE):
        say("earlier IDs can no longer be answered: the next backup of this disk must be a full one "
            "(the next writer, or 'tracking on', starts a new history)")


def _granularity(text: str) -> int:
    from hvbackup.tracking.changemap import MAX_GRANULARITY, MIN_GRANULARITY

    value = parse_size(text, "--granularity")
    if value & (value - 1) or not MIN_GRANULARITY <= value <= MAX_GRANULARITY:
        raise typer.BadParameter(f"{text!r} is not a power of two from 4K to 256M", param_hint="--granularity")
    return value


def _change_id(text: str) -> str:
    """The ID, checked for its form before the disk is asked: a malformed one is a bad value, not a
    reason for a full backup."""
    from hvbackup.errors import TrackingError
    from hvbackup.tracking.ids import RctId

    try:
        RctId.parse(text)
    except TrackingError:
        raise typer.BadParameter(f"{text!r} is malformed: a change tracking ID is rctX:<GUID with ':' for '-'>:"
                                 "<8 hex digits>, as 'disk tracking FILE status' prints it",
                                 param_hint="--since") from None
    return text


def changes(
    path: str = typer.Argument(..., metavar="FILE", help="A tracked VHDX file."),
    since: str = typer.Option(..., "--since", metavar="ID",
                              help="The change tracking ID to compare with (rctX:...), e.g. a reference point's."),
    offset: Optional[str] = typer.Option(None, "--offset", metavar="SIZE",
                                         help="Start of the area to look at, in bytes (K/M/G/T suffixes; default 0)."),
    length: Optional[str] = typer.Option(None, "--length", metavar="SIZE",
                                         help="Length of the area (default: to the end of the disk)."),
    json: bool = JSON,
) -> None:
    """List the byte ranges written after a change tracking ID, aligned to the tracking granularity."""
    from hvbackup import virtdisk

    path = os.path.abspath(path)
    since = _change_id(since)
    start = parse_size(offset, "--offset") if offset is not None else 0
    wanted = parse_size(length, "--length") if length is not None else None
    with virtdisk.open_virtual_disk(path, virtdisk.VIRTUAL_DISK_ACCESS_GET_INFO) as handle:
        size = virtdisk.get_virtual_disk_information(handle, virtdisk.GET_VIRTUAL_DISK_INFO_SIZE).virtual_size
        if start > size:
            raise typer.BadParameter(f"{offset} is past the end of the disk ({human_size(size)}, {size} bytes)",
                                     param_hint="--offset")
        end = size if wanted is None else start + wanted
        if end > size:
            raise typer.BadParameter(f"--offset {offset} --length {length} runs past the end of the disk "
                                     f"({human_size(size)}, {size} bytes)", param_hint="--length")
        ranges, position = [], start
        while True:  # asked at least once, so an ID tracking cannot answer fails even for an empty area
            page, processed = virtdisk.query_changes_virtual_disk(handle, since, position, end - position)
            ranges += page
            position += processed
            if position >= end:
                break
    if json:
        emit_json([{"offset": o, "length": n} for o, n in ranges])
        return
    if ranges:
        table(["offset", "length", ""], [[f"{o:#x}", f"{n:#x}", human_size(n)] for o, n in ranges])
    changed = sum(n for _, n in ranges)
    say(f"{plural(len(ranges), 'range')}, {human_size(changed)} changed of {human_size(end - start)} since {since}")


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"
