"""``hvbackup vm``: create, list and run VMs, write and read their disks as a guest would, export and
import them — through Msvm_VirtualSystemManagementService (``hvbackup.host.services``)."""

from __future__ import annotations

import os
from typing import Optional

import typer
from rich.table import Column, Table

from hvbackup.cli import vm_io
from hvbackup.cli.host import HOST, JSON, finish, open_host
from hvbackup.cli.output import emit_json, human_size, parse_size, show_help_without_command, stdout
from hvbackup.host import Vm, VmState
from hvbackup.host.model import BACKUP_INTENT_MERGE, BACKUP_INTENT_PRESERVE_CHAIN, ExportSettings
from hvbackup.host.services import VirtualSystemManagementService

app = typer.Typer(help="Virtual machines of a host.")
app.callback(invoke_without_command=True)(show_help_without_command)
app.command("io")(vm_io.io)


@app.command()
def create(
    name: str,
    disk: list[str] = typer.Option(..., "--disk", help="A disk of this virtual size, e.g. 10G; repeat for more."),
    processors: int = typer.Option(1, "--processors", min=1),
    memory: str = typer.Option("1G", "--memory", help="Memory, e.g. 2G."),
    notes: str = typer.Option("", "--notes"),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """Create a VM (Off) with one tracked dynamic VHDX per --disk."""
    host = open_host(host_dir)
    service = VirtualSystemManagementService(host)
    vm: Vm = finish(service.define_system(name, [parse_size(d) for d in disk], processors=processors,
                                          memory_mb=parse_size(memory) >> 20, notes=notes), "define")
    summary = vm.summary()
    if json:
        emit_json({"id": summary["id"], "name": summary["name"], "disks": summary["disks"]})
        return
    stdout.print(f"created VM {summary['name']} ({summary['id']}) with {len(summary['disks'])} disks",
                 markup=False, soft_wrap=True)


@app.command("list")
def list_(host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """List the host's VMs."""
    summaries = [vm.summary() for vm in open_host(host_dir).vms()]
    if json:
        emit_json(summaries)
        return
    table = Table("name", Column("id", overflow="fold"), "state", "disks", "checkpoints", "reference points", box=None)
    for s in summaries:
        table.add_row(s["name"], s["id"], s["state"], str(len(s["disks"])), str(s["checkpoints"]),
                      str(s["reference_points"]))
    stdout.print(table)


def _change_state(vm_name: str, target: VmState, host_dir: Optional[str], json: bool) -> None:
    host = open_host(host_dir)
    vm = host.vm(vm_name)
    finish(VirtualSystemManagementService(host).request_state_change(vm, int(target)), "state change")
    summary = vm.summary()
    if json:
        emit_json({k: summary[k] for k in ("id", "name", "state", "enabled_state")})
    else:
        stdout.print(f"{summary['name']} is {summary['state']}", markup=False, soft_wrap=True)


@app.command()
def start(vm: str, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Start (or resume) a VM: Running."""
    _change_state(vm, VmState.RUNNING, host_dir, json)


@app.command()
def stop(vm: str, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Turn a VM off: Off."""
    _change_state(vm, VmState.OFF, host_dir, json)


@app.command()
def save(vm: str, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Save a running or paused VM's state: Saved."""
    _change_state(vm, VmState.SAVED, host_dir, json)


@app.command()
def pause(vm: str, host_dir: Optional[str] = HOST, json: bool = JSON) -> None:
    """Pause a running VM: Paused."""
    _change_state(vm, VmState.PAUSED, host_dir, json)


@app.command()
def export(
    vm: str,
    destination: str,
    checkpoint: str = typer.Option(..., "--checkpoint", help="The (recovery) checkpoint to export."),
    base: Optional[str] = typer.Option(None, "--base", help="Reference point: export only what changed since it."),
    merge: bool = typer.Option(False, "--merge", help="Fold the changes into the previous export (BackupIntent "
                                                      "Merge) instead of adding differencing disks."),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """Export a checkpoint of a VM to DESTINATION/<VM name>: full, or differential against --base."""
    host = open_host(host_dir)
    the_vm = host.vm(vm)
    settings = ExportSettings(snapshot_virtual_system=checkpoint, differential_backup_base=base,
                              backup_intent=BACKUP_INTENT_MERGE if merge else BACKUP_INTENT_PRESERVE_CHAIN)
    answer = VirtualSystemManagementService(host).export_system_definition(the_vm, destination, settings)
    report = finish(answer, f"exporting {the_vm.name}", show_progress=not json)
    if json:
        emit_json(report)
        return
    table = Table("file", "size", box=None)
    for path in [report["definition_file"], *report["virtual_hard_disks"]]:
        table.add_row(path, human_size(os.path.getsize(path)))
    stdout.print(table)


@app.command("import")
def import_(
    definition: str = typer.Argument(..., help="The exported VM's definition file (under 'Virtual Machines')."),
    new_id: bool = typer.Option(False, "--new-id", help="Give the VM a new ID (GenerateNewSystemIdentifier)."),
    name: Optional[str] = typer.Option(None, "--name", help="Register it under this name."),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """Register an exported VM (a full export, or a full with its differentials) with the host."""
    host = open_host(host_dir)
    service = VirtualSystemManagementService(host)
    planned = finish(service.import_system_definition(os.path.abspath(definition), None, new_id),
                     "importing", show_progress=not json)
    if name:
        planned.config.name = name
    vm: Vm = finish(service.realize_planned_system(planned), "realizing", show_progress=not json)
    summary = vm.summary()
    if json:
        emit_json({"id": summary["id"], "name": summary["name"], "disks": summary["disks"]})
        return
    stdout.print(f"imported VM {summary['name']} ({summary['id']})", markup=False, soft_wrap=True)
