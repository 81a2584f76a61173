"""``hvbackup refpoint``: turn a recovery checkpoint into a reference point (ConvertToReferencePoint),
list reference points (Msvm_ReferencePointOfVirtualSystem) and destroy them (DestroyReferencePoint)."""

from __future__ import annotations

from typing import Optional

import typer

from hvbackup.cli.host import find_checkpoint, finish, open_host
from hvbackup.cli.output import HOST, JSON, emit_json, group, say, table
from hvbackup.errors import HostError

app = group("Reference points: what a finished backup leaves to compare the next one with.")


def describe(vm, point) -> dict:
    return {**point.to_dict(), "vm": vm.name}


@app.command()
def convert(checkpoint: str = typer.Argument(..., metavar="CHECKPOINT",
                                             help="The recovery checkpoint's ID, or its name."),
            vm: Optional[str] = typer.Option(None, "--vm", metavar="VM",
                                             help="The VM the checkpoint belongs to (default: look on every VM)."),
            host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Convert a recovery checkpoint into a reference point; the checkpoint is merged away."""
    from hvbackup.host.services import VirtualSystemSnapshotService

    host = open_host(host_dir)
    the_vm, found = find_checkpoint(host, checkpoint, vm)
    answer = VirtualSystemSnapshotService(host).convert_to_reference_point(the_vm, found.instance_id)
    point = finish(answer, "converting", show_progress=not json)
    if json:
        emit_json(describe(the_vm, point))
    else:
        say(f"reference point {point.instance_id} of {the_vm.name} "
            f"({', '.join(point.resilient_change_tracking_identifiers)})")


@app.command("list")
def list_(vm: Optional[str] = typer.Argument(None, metavar="VM", help="Only this VM's reference points."),
          host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """List reference points, oldest first, a line per disk (its change tracking ID). A VM whose document is damaged is
    listed as such (and named on stderr)."""
    from hvbackup.cli.vm import warn_damaged
    from hvbackup.host import DamagedVm

    host = open_host(host_dir)
    inventory = [host.vm(vm)] if vm else host.inventory()
    damaged = [e for e in inventory if isinstance(e, DamagedVm)]
    rows = [describe(v, p) for v in inventory if not isinstance(v, DamagedVm) for p in v.reference_points()]
    if json:
        emit_json([{**row, "damaged": None} for row in rows]
                  + [{"vm": None, "virtual_system_identifier": d.vm_id, "damaged": d.problem} for d in damaged])
    else:
        lines = []
        for row in rows:
            ids = row["resilient_change_tracking_identifiers"] or ["-"]
            for i, rct_id in enumerate(ids):  # one line per disk: an ID never shares a cell
                lines.append([row["vm"], row["instance_id"], row["created"], rct_id] if i == 0 else
                             ["", "", "", rct_id])
        lines += [[d.vm_id, "DAMAGED", "-", "-"] for d in damaged]
        table(["vm", "id", "created", "rct ids"], lines)
    warn_damaged(damaged)


@app.command()
def destroy(reference_point: str = typer.Argument(..., metavar="ID", help="The reference point's ID."),
            host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Destroy a reference point: later backups can no longer be taken against it."""
    from hvbackup.host.returns import INVALID_PARAMETER
    from hvbackup.host.services import VirtualSystemReferencePointService

    host = open_host(host_dir)
    owners = [vm for vm in host.vms()
              if any(p.instance_id.lower() == reference_point.lower() for p in vm.reference_points())]
    if not owners:
        raise HostError(f"no reference point {reference_point!r} on this host", INVALID_PARAMETER)
    finish(VirtualSystemReferencePointService(host).destroy_reference_point(owners[0], reference_point), "destroy")
    if json:
        emit_json({"instance_id": reference_point, "vm": owners[0].name, "destroyed": True})
    else:
        say(f"destroyed reference point {reference_point} of {owners[0].name}")
