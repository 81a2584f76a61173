"""``hvbackup refpoint``: turn a recovery checkpoint into a reference point (ConvertToReferencePoint),
list reference points (Msvm_ReferencePointOfVirtualSystem) and destroy them (DestroyReferencePoint)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Column, Table

from hvbackup.cli.host import HOST, JSON, find_checkpoint, finish, open_host
from hvbackup.cli.output import emit_json, show_help_without_command, stdout
from hvbackup.errors import HostError
from hvbackup.host.services import VirtualSystemReferencePointService, VirtualSystemSnapshotService

app = typer.Typer(help="Reference points: what a finished backup leaves to compare the next one with.")
app.callback(invoke_without_command=True)(show_help_without_command)


def describe(vm, point) -> dict:
    return {**point.to_dict(), "vm": vm.name}


@app.command()
def convert(checkpoint: str, vm: Optional[str] = typer.Option(None, "--vm"), host_dir: Optional[str] = HOST,
            json: bool = JSON) -> None:
    """Convert a recovery checkpoint into a reference point; the checkpoint is merged away."""
    host = open_host(host_dir)
    the_vm, found = find_checkpoint(host, checkpoint, vm)
    answer = VirtualSystemSnapshotService(host).convert_to_reference_point(the_vm, found.instance_id)
    point = finish(answer, "converting", show_progress=not json)
    if json:
        emit_json(describe(the_vm, point))
    else:
        stdout.print(f"reference point {point.instance_id} of {the_vm.name} "
                     f"({', '.join(point.resilient_change_tracking_identifiers)})", markup=False, soft_wrap=True)


@app.command("list")
def list_(vm: Optional[str] = typer.Argument(None, help="Only this VM's reference points."),
          host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """List reference points, oldest first."""
    host = open_host(host_dir)
    vms = [host.vm(vm)] if vm else host.vms()
    rows = [describe(v, p) for v in vms for p in v.reference_points()]
    if json:
        emit_json(rows)
        return
    table = Table("vm", Column("id", overflow="fold"), "created", Column("rct ids", overflow="fold"), box=None)
    for row in rows:
        table.add_row(row["vm"], row["instance_id"], row["created"],
                      "\n".join(row["resilient_change_tracking_identifiers"]))
    stdout.print(table)


@app.command()
def destroy(reference_point: str, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Destroy a reference point: later backups can no longer be taken against it."""
    host = open_host(host_dir)
    owners = [vm for vm in host.vms()
              if any(p.instance_id.lower() == reference_point.lower() for p in vm.reference_points())]
    if not owners:
        raise HostError(f"no reference point {reference_point!r} on this host", 32773)
    finish(VirtualSystemReferencePointService(host).destroy_reference_point(owners[0], reference_point), "destroy")
    if json:
        emit_json({"instance_id": reference_point, "vm": owners[0].name, "destroyed": True})
    else:
        stdout.print(f"destroyed reference point {reference_point} of {owners[0].name}", markup=False,
                     soft_wrap=True)
