"""``hvbackup checkpoint``: create, list, apply and delete checkpoints, and find and remove what
interrupted backups left behind — through Msvm_VirtualSystemSnapshotService (``hvbackup.host.services``)."""

from __future__ import annotations

import datetime
import re
from enum import Enum
from typing import TYPE_CHECKING, Optional

import typer

from hvbackup.cli.host import find_checkpoint, finish, open_host
from hvbackup.cli.output import HOST, JSON, emit_json, group, plural, say, table

if TYPE_CHECKING:
    from hvbackup.host import Host

app = group("Checkpoints of VMs: standard and recovery (backup) checkpoints.")


class Kind(str, Enum):
    standard = "standard"
    recovery = "recovery"


class Consistency(str, Enum):
    crash = "crash"
    application = "application"


_AGE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> datetime.timedelta:
    """'90s', '30m', '12h', '1d', '2w'."""
    match = _AGE.match(text.lower())
    if not match:
        raise typer.BadParameter(f"{text!r} is not an age (a whole number and s, m, h, d or w, e.g. 12h)",
                                 param_hint="--older-than")
    try:
        return datetime.timedelta(**{_AGE_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        raise typer.BadParameter(f"{text!r} is too long an age", param_hint="--older-than") from None


_OLDER_THAN_HELP = "a recovery checkpoint no backup process owns counts as orphaned once this old (s, m, h, d or w)"
OLDER_THAN = typer.Option("1d", "--older-than", metavar="AGE",
                          help=_OLDER_THAN_HELP[0].upper() + _OLDER_THAN_HELP[1:] + ".")
VM_OPTION = typer.Option(None, "--vm", metavar="VM",
                         help="The VM the checkpoint belongs to (default: look on every VM).")
CHECKPOINT = typer.Argument(..., metavar="CHECKPOINT", help="The checkpoint's ID, or its name.")


def _service(host: Host):
    from hvbackup.host.services import VirtualSystemSnapshotService

    return VirtualSystemSnapshotService(host)


def _snapshot_type(kind: Kind) -> int:
    from hvbackup.host import SNAPSHOT_TYPE_FULL, SNAPSHOT_TYPE_RECOVERY

    return SNAPSHOT_TYPE_RECOVERY if kind == Kind.recovery else SNAPSHOT_TYPE_FULL


def _level(consistency: Consistency) -> int:
    from hvbackup.host.model import CONSISTENCY_APPLICATION, CONSISTENCY_CRASH

    return CONSISTENCY_APPLICATION if consistency == Consistency.application else CONSISTENCY_CRASH


def describe(vm, checkpoint) -> dict:
    from hvbackup.host import SNAPSHOT_TYPE_RECOVERY

    kind = Kind.recovery if checkpoint.snapshot_type == SNAPSHOT_TYPE_RECOVERY else Kind.standard
    return {"id": checkpoint.instance_id, "type": kind.value, "vm": vm.name,
            "vm_id": vm.vm_id, **checkpoint.to_dict()}


@app.command()
def create(
    vm: str = typer.Argument(..., metavar="VM", help="The VM, by name or ID."),
    kind: Kind = typer.Option(Kind.standard, "--type", help="standard, or recovery (a backup checkpoint)."),
    name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="The checkpoint's name (default: the "
                                                                             "VM's name and the time)."),
    consistency: Consistency = typer.Option(Consistency.crash, "--consistency",
                                            help="The consistency level recorded with it."),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """Take a checkpoint of a VM (running or not): its disks are frozen, new writes go to AVHDX files."""
    host = open_host(host_dir)
    the_vm = host.vm(vm)
    settings = {"consistency_level": _level(consistency)}
    if name is not None:
        settings["element_name"] = name
    checkpoint = finish(_service(host).create_snapshot(the_vm, settings, _snapshot_type(kind)), "checkpoint")
    if json:
        emit_json(describe(the_vm, checkpoint))
    else:
        say(f"{kind.value} checkpoint {checkpoint.name!r} of {the_vm.name}: {checkpoint.instance_id}")


@app.command("list")
def list_(
    ctx: typer.Context,
    vm: Optional[str] = typer.Argument(None, metavar="VM", help="Only this VM's checkpoints."),
    orphaned: bool = typer.Option(False, "--orphaned", help="List what 'checkpoint clean' would remove: stray "
                                                            "recovery checkpoints and unrecorded disk files."),
    older_than: str = typer.Option("1d", "--older-than", metavar="AGE", help=f"With --orphaned: {_OLDER_THAN_HELP}."),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """List checkpoints, oldest first, or (--orphaned) what interrupted backups left behind. A VM
    whose document is damaged is listed as such (and named on stderr)."""
    from hvbackup.cli.vm import warn_damaged
    from hvbackup.host import DamagedVm

    age = parse_age(older_than)
    if orphaned:
        if vm is not None:
            raise typer.BadParameter("--orphaned looks at every VM; give no VM", param_hint="--orphaned")
        _show_orphans(finish(_service(open_host(host_dir)).find_orphans(max_age=age), "looking"), json, "found")
        return
    source = ctx.get_parameter_source("older_than")
    if source is not None and source.name == "COMMANDLINE":
        raise typer.BadParameter("goes with --orphaned", param_hint="--older-than")
    host = open_host(host_dir)
    inventory = [host.vm(vm)] if vm else host.inventory()
    damaged = [e for e in inventory if isinstance(e, DamagedVm)]
    rows = [describe(v, c) for v in inventory if not isinstance(v, DamagedVm) for c in v.checkpoints()]
    if json:
        emit_json([{**row, "damaged": None} for row in rows]
                  + [{"vm": None, "vm_id": d.vm_id, "damaged": d.problem} for d in damaged])
    else:
        table(["vm", "name", "id", "type", "created", "parent"],
              [[row["vm"], row["name"], row["id"], row["type"], row["created"], row["parent"] or "-"] for row in rows]
              + [[d.vm_id, "-", "-", "DAMAGED", "-", "-"] for d in damaged])
    warn_damaged(damaged)


@app.command()
def apply(checkpoint: str = CHECKPOINT, vm: Optional[str] = VM_OPTION, host_dir: Optional[str] = HOST,
          json: bool = JSON) -> None:
    """Return a VM to a checkpoint; what was written since is discarded (a running VM comes back Saved)."""
    host = open_host(host_dir)
    the_vm, found = find_checkpoint(host, checkpoint, vm)
    finish(_service(host).apply_snapshot(the_vm, found.instance_id), "applying", show_progress=not json)
    summary = the_vm.summary()
    if json:
        emit_json({"id": found.instance_id, "vm": the_vm.name, "state": summary["state"]})
    else:
        say(f"{the_vm.name} is back at {found.name!r} ({summary['state']})")


@app.command()
def delete(checkpoint: str = CHECKPOINT, vm: Optional[str] = VM_OPTION, host_dir: Optional[str] = HOST,
           json: bool = JSON) -> None:
    """Delete a checkpoint; its AVHDX files are merged back (the VM may be running)."""
    host = open_host(host_dir)
    the_vm, found = find_checkpoint(host, checkpoint, vm)
    finish(_service(host).destroy_snapshot(the_vm, found.instance_id), "merging", show_progress=not json)
    if json:
        emit_json({"id": found.instance_id, "vm": the_vm.name, "deleted": True})
    else:
        say(f"deleted checkpoint {found.name!r} ({found.instance_id}) of {the_vm.name}")


@app.command()
def clean(older_than: str = OLDER_THAN, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Remove what 'checkpoint list --orphaned' lists: stray recovery checkpoints (merged away) and
    disk files no VM record names. A VM whose document is damaged is left alone (named on stderr)."""
    age = parse_age(older_than)
    answer = _service(open_host(host_dir)).clean_orphans(max_age=age)
    _show_orphans(finish(answer, "removing orphans", show_progress=not json), json, "removed")


def _show_orphans(orphans, json: bool, verb: str) -> None:
    from hvbackup.cli.vm import warn_damaged

    found = orphans.to_dict()
    if json:
        emit_json(found)
    else:
        for c in found["checkpoints"]:
            say(f"{verb} checkpoint {c['id']} of {c['vm']} ({c['name']}): {c['why']}")
        for f in found["files"]:
            say(f"{verb} file {f['path']} of {f['vm']}: no record names it")
        if not found["checkpoints"] and not found["files"]:
            say("nothing orphaned" if not orphans.damaged else
                f"nothing orphaned on the VMs that could be read ({plural(len(orphans.damaged), 'VM')} skipped: "
                "damaged document)")
    warn_damaged(orphans.damaged)
