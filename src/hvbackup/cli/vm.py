"""``hvbackup vm``: create, list and run VMs, write and read their disks as a guest would, export and
import them — through Msvm_VirtualSystemManagementService (``hvbackup.host.services``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import typer

from hvbackup.cli import vm_io
from hvbackup.cli.host import finish, open_host
from hvbackup.cli.output import HOST, JSON, emit_json, group, human_size, parse_size, plural, say, table, warn
from hvbackup.units import MiB

if TYPE_CHECKING:
    from hvbackup.host import Host

app = group("Virtual machines of a host.")
app.command("io")(vm_io.io)

VM = typer.Argument(..., metavar="VM", help="The VM, by name or ID.")


def _service(host: Host):
    from hvbackup.host.services import VirtualSystemManagementService

    return VirtualSystemManagementService(host)


def _memory_mb(text: str) -> int:
    memory = parse_size(text, "--memory")
    if memory < MiB or memory % MiB:
        raise typer.BadParameter(f"{text!r}: memory is a whole number of MiB, at least 1M", param_hint="--memory")
    return memory // MiB


def _disk_size(text: str) -> int:
    size = parse_size(text, "--disk")
    if size == 0:
        raise typer.BadParameter("a disk cannot be 0 bytes", param_hint="--disk")
    return size


def warn_damaged(damaged) -> None:
    """One line on stderr for each VM whose document cannot be read; the host's other VMs work."""
    for entry in damaged:
        warn(f"damaged: VM {entry.vm_id}: {entry.problem}")


@app.command()
def create(
    name: str = typer.Argument(..., metavar="NAME",
                               help="The new VM's name: unique on the host, 1 to 100 characters, no '/', '\\' or "
                                    "control characters, not starting with '.', not a GUID."),
    disk: list[str] = typer.Option(..., "--disk", metavar="SIZE",
                                   help="A disk of this virtual size, e.g. 10G; repeat for more."),
    processors: int = typer.Option(1, "--processors", min=1, metavar="N", help="Virtual processors."),
    memory: str = typer.Option("1G", "--memory", metavar="SIZE", help="Memory, in whole MiB, e.g. 2G."),
    notes: str = typer.Option("", "--notes", metavar="TEXT", help="Free text kept with the VM."),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """Create a VM (Off) with one tracked dynamic VHDX per --disk."""
    sizes = [_disk_size(d) for d in disk]
    memory_mb = _memory_mb(memory)
    host = open_host(host_dir)
    vm = finish(_service(host).define_system(name, sizes, processors=processors, memory_mb=memory_mb, notes=notes),
                "define")
    summary = vm.summary()
    if json:
        emit_json({"id": summary["id"], "name": summary["name"], "disks": summary["disks"]})
    else:
        say(f"created VM {summary['name']} ({summary['id']}) with {plural(len(summary['disks']), 'disk')}")
        for path in summary["disks"]:
            say(f"  {path}")


@app.command("list")
def list_(host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """List the host's VMs; one whose document is damaged is listed as such (and named on stderr)."""
    from hvbackup.host import DamagedVm

    inventory = open_host(host_dir).inventory()
    damaged = [e for e in inventory if isinstance(e, DamagedVm)]
    summaries = {e.vm_id: e.summary() for e in inventory if not isinstance(e, DamagedVm)}
    if json:
        emit_json([{**summaries[e.vm_id], "damaged": None} if e.vm_id in summaries else
                   {"id": e.vm_id, "name": None, "state": "Damaged", "directory": e.directory, "damaged": e.problem}
                   for e in inventory])
    else:
        rows = []
        for e in inventory:
            s = summaries.get(e.vm_id)
            rows.append([s["name"], s["id"], s["state"], str(len(s["disks"])), str(s["checkpoints"]),
                         str(s["reference_points"])] if s else ["?", e.vm_id, "DAMAGED", "-", "-", "-"])
        table(["name", "id", "state", "disks", "checkpoints", "reference points"], rows)
    warn_damaged(damaged)


def _change_state(vm_name: str, target: str, host_dir: Optional[str], json: bool) -> None:
    from hvbackup.host import VmState

    host = open_host(host_dir)
    vm = host.vm(vm_name)
    finish(_service(host).request_state_change(vm, int(VmState[target])), "state change")
    summary = vm.summary()
    if json:
        emit_json({k: summary[k] for k in ("id", "name", "state", "enabled_state")})
    else:
        say(f"{summary['name']} is {summary['state']}")


@app.command()
def start(vm: str = VM, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Start an Off or Saved VM, or resume a Paused one: Running."""
    _change_state(vm, "RUNNING", host_dir, json)


@app.command()
def stop(vm: str = VM, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Turn a running, paused or saved VM off: Off (a saved state is discarded)."""
    _change_state(vm, "OFF", host_dir, json)


@app.command()
def save(vm: str = VM, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Save a running or paused VM's state: Saved."""
    _change_state(vm, "SAVED", host_dir, json)


@app.command()
def pause(vm: str = VM, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Pause a running VM: Paused."""
    _change_state(vm, "PAUSED", host_dir, json)


@app.command()
def export(
    vm: str = VM,
    destination: str = typer.Argument(..., metavar="DEST", help="The directory to export into (made if missing); "
                                                                "the files go to DEST/<VM name>/."),
    checkpoint: str = typer.Option(..., "--checkpoint", metavar="CHECKPOINT",
                                   help="The checkpoint to export (ID or name)."),
    base: Optional[str] = typer.Option(None, "--base", metavar="ID",
                                       help="A reference point (or checkpoint): export only what changed since it."),
    merge: bool = typer.Option(False, "--merge", help="With --base: fold the changes into the previous export "
                                                      "(BackupIntent Merge) instead of adding differencing disks."),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """Export a checkpoint of a VM to DEST/<VM name>/: full VHDX copies, or with --base differencing
    disks holding what changed since it."""
    from hvbackup.host.model import BACKUP_INTENT_MERGE, BACKUP_INTENT_PRESERVE_CHAIN, ExportSettings

    if merge and base is None:
        raise typer.BadParameter("--merge folds a differential export into the previous one: give --base too",
                                 param_hint="--merge")
    host = open_host(host_dir)
    the_vm = host.vm(vm)
    settings = ExportSettings(snapshot_virtual_system=checkpoint, differential_backup_base=base,
                              backup_intent=BACKUP_INTENT_MERGE if merge else BACKUP_INTENT_PRESERVE_CHAIN)
    answer = _service(host).export_system_definition(the_vm, os.path.abspath(destination), settings)
    report = finish(answer, f"exporting {the_vm.name}", show_progress=not json)
    report = {**report, "directory": os.path.abspath(report["directory"]),
              "definition_file": os.path.abspath(report["definition_file"]),
              "virtual_hard_disks": [os.path.abspath(p) for p in report["virtual_hard_disks"]]}
    if json:
        emit_json(report)
        return
    files = [report["definition_file"], *report["virtual_hard_disks"]]
    table(["file", "size"], [[path, human_size(os.path.getsize(path))] for path in files])


@app.command("import")
def import_(
    definition: str = typer.Argument(..., metavar="FILE",
                                     help="The exported VM's definition file (the .vmcx under 'Virtual Machines')."),
    new_id: bool = typer.Option(False, "--new-id", help="Give the VM a new ID (GenerateNewSystemIdentifier)."),
    name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="Register it under this name."),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """Register an exported VM (a full export, or a differential with its parents next to it) with
    the host, Off."""
    host = open_host(host_dir)
    service = _service(host)
    planned = finish(service.import_system_definition(os.path.abspath(definition), None, new_id, name=name),
                     "importing", show_progress=not json)
    vm = finish(service.realize_planned_system(planned), "realizing", show_progress=not json)
    summary = vm.summary()
    if json:
        emit_json({"id": summary["id"], "name": summary["name"], "disks": summary["disks"]})
    else:
        say(f"imported VM {summary['name']} ({summary['id']}) with {plural(len(summary['disks']), 'disk')}")
        for path in summary["disks"]:
            say(f"  {path}")
