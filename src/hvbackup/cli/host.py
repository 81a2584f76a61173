"""``hvbackup host init DIR``, and what the VM, checkpoint and reference point commands share: the
``--host`` option, finding a checkpoint by ID, and following a service call to its end.

A service method answers like WMI (``hvbackup.host.services``): 0 and a result, 4096 and a job, or a
failure value. ``finish`` polls a job as WMI clients do, drawing its ``percent_complete`` on a
progress bar (Ctrl-C asks a cancellable job to terminate), then turns the answer into the result or
raises the failure (``services.outcome``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

import typer

from hvbackup.cli.output import HOST, JSON, emit_json, group, job_progress, say
from hvbackup.errors import HostError

if TYPE_CHECKING:
    from hvbackup.host import Checkpoint, Host, Vm

app = group("The virtualization host: a directory of VMs.")

__all__ = ["HOST", "JSON", "app", "find_checkpoint", "finish", "open_host"]


def open_host(directory: Optional[str]) -> Host:
    from hvbackup.host import Host

    if not directory:
        raise typer.BadParameter("give the host directory with --host or HVBACKUP_HOST", param_hint="--host")
    directory = os.path.abspath(directory)
    try:
        os.stat(os.path.join(directory, "host.json"))
    except (FileNotFoundError, NotADirectoryError):
        raise HostError(f"{directory} is not a host (make one with 'hvbackup host init {directory}')") from None
    except OSError as exc:
        raise HostError(f"cannot open the host {directory}: {exc.strerror}") from None
    return Host.open(directory)


def find_checkpoint(host: Host, checkpoint_id: str, vm_name: Optional[str] = None) -> tuple[Vm, Checkpoint]:
    """The checkpoint with this instance ID (or name) on the VM given, or on whichever VM has it."""
    from hvbackup.host.returns import INVALID_PARAMETER

    candidates = [host.vm(vm_name)] if vm_name else host.vms()
    found = [(vm, c) for vm in candidates for c in vm.checkpoints()
             if c.instance_id.lower() == checkpoint_id.lower() or c.name == checkpoint_id]
    if not found:
        raise HostError(f"no checkpoint {checkpoint_id!r} on {vm_name or 'this host'}", INVALID_PARAMETER)
    if len(found) > 1:
        raise HostError(f"{len(found)} checkpoints are called {checkpoint_id!r}; give its ID or --vm",
                        INVALID_PARAMETER)
    return found[0]


def finish(answer: tuple[int, Any], description: str, *, show_progress: bool = True) -> Any:
    """The result of a service call; a failure raises what caused it (one line on stderr)."""
    from hvbackup.host.jobs import REQUEST_TRANSITION_STARTED
    from hvbackup.host.returns import JOB_STARTED
    from hvbackup.host.services import outcome

    return_value, job = answer
    if return_value == JOB_STARTED:
        try:
            with job_progress(description, enabled=show_progress) as update:
                while not job.wait(0.1):
                    if update:
                        update(job.percent_complete)
        except KeyboardInterrupt:  # Ctrl-C: ask a cancellable job to stop cleanly before leaving
            if job.cancel() == REQUEST_TRANSITION_STARTED:
                job.wait()
            raise
    return outcome(answer)


@app.command("init")
def init(directory: str = typer.Argument(..., metavar="DIR", help="The directory to make a host of."),
         json: bool = JSON) -> None:
    """Make DIR an empty host."""
    from hvbackup.host import Host

    host = Host.init(directory)
    document = {"directory": host.directory, "vms": []}
    if json:
        emit_json(document)
    else:
        say(f"host ready at {host.directory}")
