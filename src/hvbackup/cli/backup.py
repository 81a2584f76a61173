"""The backup application's commands: ``backup``, ``points``, ``restore``, ``verify``, ``forget``.

Each opens the repository named by ``--repo`` (or HVBACKUP_REPO), with the passphrase from
HVBACKUP_PASSPHRASE or a prompt when it is encrypted. Exit codes: 0 success; 1 ``verify`` found
problems; 2 the command failed, or ``backup`` failed for at least one VM.
"""

from __future__ import annotations

import contextlib
import os
import time
from enum import Enum
from typing import Iterator, Optional

import typer
from rich.table import Column, Table

from hvbackup.backup import retention
from hvbackup.backup.engine import backup_vms
from hvbackup.backup.repository import Repository
from hvbackup.backup.restore import restore_disk, restore_vm
from hvbackup.cli.host import HOST, JSON, open_host
from hvbackup.cli.output import (
    EXIT_FAILED,
    EXIT_FOUND,
    EXIT_OK,
    byte_progress,
    count_progress,
    emit_json,
    human_size,
    progress_bar,
    stderr,
    stdout,
)
from hvbackup.cli.repo import PASSPHRASE_ENV, passphrase
from hvbackup.errors import PassphraseNeededError

REPO = typer.Option(None, "--repo", envvar="HVBACKUP_REPO", show_envvar=True,
                    help="The repository (hvbackup repo init).")


class Method(str, Enum):
    virtdisk = "virtdisk"
    export = "export"


class Format(str, Enum):
    vhdx = "vhdx"
    raw = "raw"


def open_repo(path: Optional[str]) -> Repository:
    if not path:
        raise typer.BadParameter("give the repository with --repo or HVBACKUP_REPO", param_hint="--repo")
    if os.environ.get(PASSPHRASE_ENV) is not None:
        return Repository.open(path, passphrase=os.environ[PASSPHRASE_ENV])
    try:
        return Repository.open(path)
    except PassphraseNeededError:
        # Only an encrypted repository needs the passphrase; ask for it only then.
        return Repository.open(path, passphrase=passphrase(confirm=False))


def when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) + "Z" if epoch else "-"


def print_line(text: str) -> None:
    stdout.print(text, markup=False, soft_wrap=True)


@contextlib.contextmanager
def vm_progress(names: list[str], enabled: bool) -> Iterator:
    """A callback (VM name, done, total) drawing one bar per VM on stderr when it is a terminal;
    the engine calls it from one thread per VM, and rich's Progress is thread-safe."""
    if not (enabled and stderr.is_terminal):
        yield None
        return
    with byte_progress() as bar:
        tasks = {name: bar.add_task(name, total=None) for name in names}
        yield lambda name, done, total: bar.update(tasks[name], completed=done, total=total or None)


def backup(
    vms: list[str] = typer.Argument(..., metavar="VM...", help="VMs to back up, by name or ID."),
    host_dir: Optional[str] = HOST,
    repo_path: Optional[str] = REPO,
    method: Method = typer.Option(Method.virtdisk, "--method",
                                  help="virtdisk: read the changed ranges directly; export: through an export "
                                       "to a staging directory."),
    full: bool = typer.Option(False, "--full", help="Read every disk in full even when changes are known."),
    staging: Optional[str] = typer.Option(None, "--staging", help="Where --method export puts its exports "
                                                                  "(default: inside the repository)."),
    json: bool = JSON,
) -> None:
    """Back VMs up, concurrently, each as one restore point. Exit 2 if any VM failed."""
    host = open_host(host_dir)
    # A VM named twice (by name and by ID, say) is backed up once: two runs of it would race.
    targets = list({vm.vm_id: vm for vm in map(host.vm, vms)}.values())
    repo = open_repo(repo_path)
    with vm_progress([vm.name for vm in targets], enabled=not json) as progress, repo.session() as session:
        outcomes = backup_vms(session, targets, method=method.value, full=full, staging=staging, progress=progress)
    failed = False
    report = []
    for vm, outcome in zip(targets, outcomes):
        if isinstance(outcome, Exception):
            failed = True
            report.append({"vm": vm.name, "error": str(outcome)})
            if not json:
                stderr.print(f"hvbackup: error: {outcome}", markup=False)
            continue
        report.append(outcome.to_dict())
        if not json:
            print_line(f"{outcome.vm}: {outcome.kind} ({outcome.method}) read {human_size(outcome.bytes_read)}, stored "
                       f"{human_size(outcome.bytes_stored)} in {outcome.seconds:.1f} s: point {outcome.point_id}")
            for note in outcome.notes:
                print_line(f"  {note}")
    if json:
        emit_json(report)
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


def _matches(point: dict, vm: Optional[str]) -> bool:
    return vm is None or point.get("vm_name") == vm or (point.get("vm_id") or "").lower() == vm.lower()


def points(
    repo_path: Optional[str] = REPO,
    vm: Optional[str] = typer.Option(None, "--vm", help="Only this VM's points (name or ID)."),
    json: bool = JSON,
) -> None:
    """List restore points, oldest first."""
    found = [p for p in open_repo(repo_path).points() if _matches(p, vm)]
    if json:
        emit_json(found)
        return
    # The ID, which restore takes, never wraps, and it is the commit time (UTC): no separate time column.
    # In a narrow terminal the VM's name gives way.
    table = Table(Column("ID (UTC time)", no_wrap=True), "VM", Column("kind", no_wrap=True),
                  Column("method", no_wrap=True), Column("read", justify="right", no_wrap=True),
                  Column("stored", justify="right", no_wrap=True), box=None, collapse_padding=True, pad_edge=False)
    for p in found:
        table.add_row(p["point_id"], p.get("vm_name") or "-", p.get("kind") or "-", p.get("method") or "-",
                      human_size(p["bytes_read"]), human_size(p["bytes_stored"]))
    stdout.print(table)


def _given(ctx: typer.Context, name: str) -> bool:
    """The option was typed on the command line (not taken from the environment or its default).
    By the source's name: typer carries its own copy of click, whose enum ``click`` does not share."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def restore(
    ctx: typer.Context,
    point: str = typer.Argument(..., help="The restore point's ID."),
    repo_path: Optional[str] = REPO,
    host_dir: Optional[str] = HOST,
    new_name: Optional[str] = typer.Option(None, "--as", help="Name the restored VM this."),
    disk: Optional[int] = typer.Option(None, "--disk", min=0, help="Restore only this disk (with --to)."),
    to: Optional[str] = typer.Option(None, "--to", help="The new file the disk is restored to."),
    format: Optional[Format] = typer.Option(None, "-O", "--format",
                                            help="The disk file's format (default: raw for .raw/.img, else vhdx)."),
    json: bool = JSON,
) -> None:
    """Bring a whole VM back into a host (--host), or one disk into a new file (--disk N --to FILE)."""
    one_disk = disk is not None or to is not None
    if one_disk:
        if disk is None or to is None:
            raise typer.BadParameter("restoring one disk takes both --disk N and --to FILE")
        if _given(ctx, "host_dir") or new_name:
            raise typer.BadParameter("--host and --as restore a whole VM; --disk and --to one disk: not both")
    elif format is not None:
        raise typer.BadParameter("-O chooses the format of one restored disk: give --disk and --to too")
    repo = open_repo(repo_path)
    if one_disk:
        with progress_bar(f"disk {disk}", enabled=not json) as progress:
            result = restore_disk(repo, point, disk, to, format=format.value if format else None, progress=progress)
        if json:
            emit_json(result)
        else:
            print_line(f"restored disk {disk} of {point} to {result['path']} ({result['format']}, "
                       f"{human_size(result['virtual_size'])}, {human_size(result['bytes_written'])} written)")
        return
    host = open_host(host_dir)
    with progress_bar("restoring", enabled=not json) as progress:
        vm = restore_vm(repo, point, host, name=new_name, progress=progress)
    summary = vm.summary()
    if json:
        emit_json({"point_id": point, "id": summary["id"], "name": summary["name"], "state": summary["state"],
                   "disks": summary["disks"]})
    else:
        print_line(f"restored {point} as VM {summary['name']} ({summary['id']}), {summary['state']}, "
                   f"{len(summary['disks'])} disks")


def verify(
    repo_path: Optional[str] = REPO,
    read_data: bool = typer.Option(False, "--read-data", help="Also read every chunk and check it against "
                                                              "its name."),
    json: bool = JSON,
) -> None:
    """Check the repository. Exit 0: sound; 1: problems found (listed one per line)."""
    repo = open_repo(repo_path)
    with count_progress("reading chunks", enabled=read_data and not json) as progress:
        problems = repo.verify(read_data=read_data, progress=progress)
    if json:
        emit_json({"points": len(repo.point_ids()), "read_data": read_data, "problems": problems})
    elif problems:
        for problem in problems:
            print_line(problem)
    else:
        checked = "manifests and every chunk's data" if read_data else "manifests and that every chunk exists"
        print_line(f"repository is sound ({len(repo.point_ids())} points; checked {checked})")
    raise typer.Exit(EXIT_FOUND if problems else EXIT_OK)


def _keep_option(rule: str, what: str):
    return typer.Option(0, f"--keep-{rule}", min=0, help=f"Keep {what}.")


def forget(
    repo_path: Optional[str] = REPO,
    vm: Optional[str] = typer.Option(None, "--vm", help="Apply the policy to this VM's points only (name or ID)."),
    keep_last: int = _keep_option("last", "the N newest points"),
    keep_daily: int = _keep_option("daily", "the newest point of each of the N latest days with points"),
    keep_weekly: int = _keep_option("weekly", "the newest point of each of the N latest ISO weeks with points"),
    keep_monthly: int = _keep_option("monthly", "the newest point of each of the N latest months with points"),
    prune: bool = typer.Option(False, "--prune", help="Then delete the chunks no point references."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be forgotten."),
    json: bool = JSON,
) -> None:
    """Forget the restore points a retention policy does not keep (per VM, times in UTC)."""
    repo = open_repo(repo_path)
    # Under the lock, so a backup never builds on a point while it is being forgotten.
    with repo.session():
        keep, drop = retention.plan([p for p in repo.points() if _matches(p, vm)], keep_last=keep_last,
                                    keep_daily=keep_daily, keep_weekly=keep_weekly, keep_monthly=keep_monthly)
        if not dry_run:
            for entry in drop:
                repo.forget(entry["point_id"])
    # prune takes the lock itself.
    pruned = None
    if prune and not dry_run:
        with count_progress("pruning chunk directories", enabled=not json) as progress:
            pruned = repo.prune(progress=progress)
    if json:
        emit_json({"keep": keep, "forget": drop, "dry_run": dry_run, "prune": pruned})
        return
    for entry in keep:
        print_line(f"keep    {entry['point_id']}  {entry['vm_name']}  {when(entry['time'])}  "
                   f"({', '.join(entry['reasons'])})")
    for entry in drop:
        print_line(f"forget  {entry['point_id']}  {entry['vm_name']}  {when(entry['time'])}")
    print_line(f"{len(keep)} kept, {len(drop)} {'to forget' if dry_run else 'forgotten'}")
    if pruned is not None:
        print_line(f"pruned {pruned['chunks_deleted']} chunks ({human_size(pruned['bytes_freed'])} freed), "
                   f"{pruned['chunks_kept']} kept")
