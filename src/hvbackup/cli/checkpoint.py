"""``hvbackup checkpoint``: create, list, apply and delete checkpoints (Msvm_VirtualSystemSnapshotService),
and find and remove what interrupted backups left behind (``hvbackup.host.recovery``)."""

from __future__ import annotations

import datetime
import re
from enum import Enum
from typing import Optional

import typer
from rich.table import Column, Table

from hvbackup.cli.host import HOST, JSON, find_checkpoint, finish, open_host
from hvbackup.cli.output import emit_json, show_help_without_command, stdout
from hvbackup.host import SNAPSHOT_TYPE_FULL, SNAPSHOT_TYPE_RECOVERY, recovery
from hvbackup.host.model import CONSISTENCY_APPLICATION, CONSISTENCY_CRASH
from hvbackup.host.services import VirtualSystemSnapshotService

app = typer.Typer(help="Checkpoints of VMs: standard and recovery (backup) checkpoints.")
app.callback(invoke_without_command=True)(show_help_without_command)


class Kind(str, Enum):
    standard = "standard"
    recovery = "recovery"


class Consistency(str, Enum):
    crash = "crash"
    application = "application"


SNAPSHOT_TYPES = {Kind.standard: SNAPSHOT_TYPE_FULL, Kind.recovery: SNAPSHOT_TYPE_RECOVERY}
LEVELS = {Consistency.crash: CONSISTENCY_CRASH, Consistency.application: CONSISTENCY_APPLICATION}
TYPE_NAMES = {v: k.value for k, v in SNAPSHOT_TYPES.items()}

_AGE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> datetime.timedelta:
    """'90s', '30m', '12h', '1d', '2w'."""
    match = _AGE.match(text.lower())
    if not match:
        raise typer.BadParameter(f"{text!r} is not an age (a number and s, m, h, d or w)", param_hint="--older-than")
    return datetime.timedelta(**{_AGE_UNITS[match.group(2)]: int(match.group(1))})


OLDER_THAN = typer.Option("1d", "--older-than", help="A recovery checkpoint no running backup owns counts as "
                                                     "orphaned once this old (e.g. 12h, 1d).")


def describe(vm, checkpoint) -> dict:
    return {"id": checkpoint.instance_id, "type": TYPE_NAMES[checkpoint.snapshot_type], "vm": vm.name,
            "vm_id": vm.vm_id, **checkpoint.to_dict()}


@app.command()
def create(
    vm: str,
    kind: Kind = typer.Option(Kind.standard, "--type", help="standard, or recovery (a backup checkpoint)."),
    name: Optional[str] = typer.Option(None, "--name"),
    consistency: Consistency = typer.Option(Consistency.crash, "--consistency"),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """Take a checkpoint of a VM (running or not): its disks are frozen, new writes go to AVHDX files."""
    host = open_host(host_dir)
    the_vm = host.vm(vm)
    settings = {"consistency_level": LEVELS[consistency]}
    if name:
        settings["element_name"] = name
    checkpoint = finish(VirtualSystemSnapshotService(host).create_snapshot(the_vm, settings, SNAPSHOT_TYPES[kind]),
                        "checkpoint")
    if json:
        emit_json(describe(the_vm, checkpoint))
    else:
        stdout.print(f"{kind.value} checkpoint {checkpoint.name!r} of {the_vm.name}: {checkpoint.instance_id}",
                     markup=False, soft_wrap=True)


@app.command("list")
def list_(
    vm: Optional[str] = typer.Argument(None, help="Only this VM's checkpoints."),
    orphaned: bool = typer.Option(False, "--orphaned", help="List what 'checkpoint clean' would remove: stray "
                                                            "recovery checkpoints and unrecorded disk files."),
    older_than: str = OLDER_THAN,
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """List checkpoints, or (--orphaned) what interrupted backups left behind."""
    host = open_host(host_dir)
    if orphaned:
        _show_orphans(recovery.find_orphans(host, max_age=parse_age(older_than)).to_dict(), json, "found")
        return
    vms = [host.vm(vm)] if vm else host.vms()
    rows = [describe(v, c) for v in vms for c in v.checkpoints()]
    if json:
        emit_json(rows)
        return
    table = Table("vm", "name", Column("id", overflow="fold"), "type", "created", Column("parent", overflow="fold"),
                  box=None)
    for row in rows:
        table.add_row(row["vm"], row["name"], row["id"], row["type"], row["created"], row["parent"] or "-")
    stdout.print(table)


@app.command()
def apply(checkpoint: str, vm: Optional[str] = typer.Option(None, "--vm"), host_dir: Optional[str] = HOST,
          json: bool = JSON) -> None:
    """Return a VM to a checkpoint; what was written since is discarded."""
    host = open_host(host_dir)
    the_vm, found = find_checkpoint(host, checkpoint, vm)
    finish(VirtualSystemSnapshotService(host).apply_snapshot(the_vm, found.instance_id), "applying",
           show_progress=not json)
    summary = the_vm.summary()
    if json:
        emit_json({"id": found.instance_id, "vm": the_vm.name, "state": summary["state"]})
    else:
        stdout.print(f"{the_vm.name} is back at {found.name!r} ({summary['state']})", markup=False, soft_wrap=True)


@app.command()
def delete(checkpoint: str, vm: Optional[str] = typer.Option(None, "--vm"), host_dir: Optional[str] = HOST,
           json: bool = JSON) -> None:
    """Delete a checkpoint; its AVHDX files are merged back (the VM may be running)."""
    host = open_host(host_dir)
    the_vm, found = find_checkpoint(host, checkpoint, vm)
    finish(VirtualSystemSnapshotService(host).destroy_snapshot(the_vm, found.instance_id), "merging",
           show_progress=not json)
    if json:
        emit_json({"id": found.instance_id, "vm": the_vm.name, "deleted": True})
    else:
        stdout.print(f"deleted checkpoint {found.name!r} of {the_vm.name}", markup=False, soft_wrap=True)


@app.command()
def clean(older_than: str = OLDER_THAN, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Remove what 'checkpoint list --orphaned' lists: stray recovery checkpoints (merged away) and
    disk files no VM record names."""
    removed = recovery.clean(open_host(host_dir), max_age=parse_age(older_than)).to_dict()
    _show_orphans(removed, json, "removed")


def _show_orphans(orphans: dict, json: bool, verb: str) -> None:
    if json:
        emit_json(orphans)
        return
    for c in orphans["checkpoints"]:
        stdout.print(f"{verb} checkpoint {c['id']} of {c['vm']} ({c['name']}): {c['why']}", markup=False,
                     soft_wrap=True)
    for f in orphans["files"]:
        stdout.print(f"{verb} file {f['path']} of {f['vm']}: no record names it", markup=False, soft_wrap=True)
    if not orphans["checkpoints"] and not orphans["files"]:
        stdout.print("nothing orphaned")
