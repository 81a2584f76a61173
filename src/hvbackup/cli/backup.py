"""The backup application's commands: ``backup``, ``points``, ``restore``, ``verify``, ``forget``.

Each opens the repository named by ``--repo`` (or HVBACKUP_REPO), with the passphrase from
HVBACKUP_PASSPHRASE or a prompt when it is encrypted. Exit codes: 0 success; 1 ``verify`` found
problems; 2 the command failed, or ``backup`` failed for at least one VM; 130/143 interrupted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from enum import Enum
from typing import TYPE_CHECKING, Iterator, Optional

import typer

from hvbackup.cli import interrupted_by, output, signals_set
from hvbackup.cli.host import open_host
from hvbackup.cli.output import (
    EXIT_FAILED,
    EXIT_FOUND,
    EXIT_OK,
    HOST,
    JSON,
    REPO,
    count_progress,
    emit_json,
    human_size,
    plural,
    progress_bar,
    say,
    table,
    warn,
)
from hvbackup.cli.repo import open_repo
from hvbackup.errors import HvBackupError, RepositoryError

if TYPE_CHECKING:
    from hvbackup.backup.manifest import Manifest


class Method(str, Enum):
    virtdisk = "virtdisk"
    export = "export"


class Format(str, Enum):
    vhdx = "vhdx"
    vhd = "vhd"
    raw = "raw"


def when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) + "Z" if epoch else "-"


@contextlib.contextmanager
def vm_progress(names: list[str], enabled: bool) -> Iterator:
    """A callback (VM name, done, total) drawing one bar per VM on stderr when it is a terminal;
    the engine calls it from one thread per VM, and rich's Progress is thread-safe."""
    if not (enabled and output.stderr_is_terminal()):
        yield None
        return
    with output.byte_progress() as bar:
        tasks = {name: bar.add_task(name, total=None) for name in names}
        yield lambda name, done, total: bar.update(tasks[name], completed=done, total=total or None)


def backup(
    vms: list[str] = typer.Argument(..., metavar="VM...", help="VMs to back up, by name or ID."),
    host_dir: Optional[str] = HOST,
    repo_path: Optional[str] = REPO,
    method: Method = typer.Option(Method.virtdisk, "--method",
                                  help="virtdisk: read the changed ranges directly; export: the host exports "
                                       "the changes (a differential) to a temporary directory, read and removed."),
    full: bool = typer.Option(False, "--full", help="Read every disk in full even when changes are known."),
    json: bool = JSON,
) -> None:
    """Back VMs up, concurrently, each as one restore point. Each VM gets its own result; exit 2 if
    any failed."""
    from hvbackup.backup.engine import backup_vms
    from hvbackup.errors import BackupError

    host = open_host(host_dir)
    repo = open_repo(repo_path)
    # A VM named twice (by name and by ID, say) is backed up once: two runs of it would race.
    outcomes: dict[str, object] = {}
    targets = {}
    for name in vms:
        try:
            vm = host.vm(name)
        except HvBackupError as exc:  # an unknown name or a damaged VM document: that VM's failure only
            outcomes[name] = BackupError(name, str(exc))
            continue
        if vm.vm_id not in targets:
            targets[vm.vm_id] = vm
            outcomes[name] = vm
    with vm_progress([vm.name for vm in targets.values()], enabled=not json) as progress, \
            repo.session() as session, signals_set(threading.Event()) as stop:
        done = backup_vms(session, list(targets.values()), method=method.value, full=full, progress=progress,
                          cancel=stop)
    finished = dict(zip(targets, done))
    report = [finished[o.vm_id] if not isinstance(o, Exception) else o for o in outcomes.values()]
    for outcome in report:
        if not isinstance(outcome, BackupError) and not json:
            say(f"{outcome.vm}: {outcome.kind} ({outcome.method}) read {human_size(outcome.bytes_read)}, stored "
                f"{human_size(outcome.bytes_stored)} in {outcome.seconds:.1f} s: point {outcome.point_id}")
            for note in outcome.notes:
                say(f"  {note}")
        elif not json:
            warn(f"error: {outcome}")
    if json:
        emit_json([{"vm": o.vm, "error": str(o)} if isinstance(o, BackupError) else o.to_dict() for o in report])
    if stop.is_set():  # every backup still running when the signal came was undone (Interrupted)
        raise interrupted_by()
    raise typer.Exit(EXIT_FAILED if any(isinstance(o, BackupError) for o in report) else EXIT_OK)


def _matches(point: Manifest, vm: Optional[str]) -> bool:
    return vm is None or point.vm_name == vm or (point.vm_id or "").lower() == vm.lower()


def _require_vm(points: list[Manifest], vm: Optional[str]) -> list[Manifest]:
    """The points of ``vm``; naming a VM the repository has no point of is an error, not an empty list."""
    found = [p for p in points if _matches(p, vm)]
    if vm is not None and not found:
        raise RepositoryError(f"the repository has no restore point of a VM named or with the ID {vm!r}")
    return found


VM_FILTER = typer.Option(None, "--vm", metavar="VM", help="Only this VM's points (name or ID).")


def points(repo_path: Optional[str] = REPO, vm: Optional[str] = VM_FILTER, json: bool = JSON) -> None:
    """List restore points, oldest first; damaged ones are listed as such."""
    scan = open_repo(repo_path).scan()
    found = _require_vm(scan.points, vm)
    if json:
        emit_json([{**p.to_dict(), "damaged": None} for p in found] + [d.to_dict() for d in scan.damaged])
        return
    # The ID, which restore takes, is the commit time (UTC): no separate time column.
    table(["ID (UTC time)", "VM", "kind", "method", "read", "stored"],
          [[p.point_id, p.vm_name or "-", p.kind or "-", p.method or "-",
            human_size(p.bytes_read), human_size(p.bytes_stored)] for p in found]
          + [[d.name, "?", "DAMAGED", "-", "-", "-"] for d in scan.damaged])
    for d in scan.damaged:
        warn(f"damaged: points/{d.name}: {d.problem} (hvbackup forget {d.name}, or verify --repair)")


def _given(ctx: typer.Context, name: str) -> bool:
    """The option was typed on the command line (not taken from the environment or its default).
    By the source's name: typer carries its own copy of click, whose enum ``click`` does not share."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def restore(
    ctx: typer.Context,
    point: str = typer.Argument(..., metavar="POINT_ID", help="The restore point's ID."),
    repo_path: Optional[str] = REPO,
    host_dir: Optional[str] = HOST,
    new_name: Optional[str] = typer.Option(None, "--as", metavar="NAME", help="Name the restored VM this."),
    disk: Optional[int] = typer.Option(None, "--disk", min=0, metavar="N", help="Restore only this disk (with --to)."),
    to: Optional[str] = typer.Option(None, "--to", metavar="FILE", help="The new file the disk is restored to."),
    format: Optional[Format] = typer.Option(None, "-O", "--format",
                                            help="The disk file's format (default: from FILE's suffix: .vhdx, "
                                                 ".avhdx, .vhd, .raw, .img)."),
    json: bool = JSON,
) -> None:
    """Bring a whole VM back into a host (--host), or one disk into a new file (--disk N --to FILE)."""
    from hvbackup.backup.restore import restore_disk, restore_vm

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
            say(f"restored disk {disk} of {point} to {result['path']} ({result['format']}, "
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
        say(f"restored {point} as VM {summary['name']} ({summary['id']}), {summary['state']}, "
            f"{plural(len(summary['disks']), 'disk')}")


def verify(
    repo_path: Optional[str] = REPO,
    read_data: bool = typer.Option(False, "--read-data", help="Also read every chunk and check it against its "
                                                              "name; damaged chunks are set aside, so the next "
                                                              "backup that has their data stores them again."),
    repair: bool = typer.Option(False, "--repair", help="Make the repository sound: set damaged chunks, damaged "
                                                        "points and points that lack chunks aside in damaged/ "
                                                        "(reads every chunk)."),
    json: bool = JSON,
) -> None:
    """Check the repository. Exit 0: sound; 1: problems found (listed one per line)."""
    from hvbackup.backup import checking

    repo = open_repo(repo_path)
    with count_progress("reading chunks", enabled=(read_data or repair) and not json) as progress:
        if repair:
            _show_repair(checking.repair(repo, progress=progress), json)
            return
        report = checking.verify(repo, read_data=read_data, progress=progress)
    if json:
        emit_json({"points": report.points, "read_data": read_data, **report.to_dict()})
    elif report.problems:
        for problem in report.problems:
            say(problem)
        _advise(report)
    else:
        checked = "manifests and every chunk's data" if read_data else "manifests and that every chunk exists"
        say(f"repository is sound ({plural(report.points, 'point')}; checked {checked})")
    raise typer.Exit(EXIT_FOUND if report.problems else EXIT_OK)


def _advise(report) -> None:
    """What to do about what verify found (on stderr: stdout lists the problems only)."""
    if report.set_aside:
        warn(f"set {plural(len(report.set_aside), 'damaged chunk')} aside in damaged/chunks")
    if report.not_set_aside:
        warn(f"damaged chunks were not set aside: {report.not_set_aside}")
    if report.unrestorable:
        warn(f"{plural(len(report.unrestorable), 'point')} cannot be restored as they are: back up their VMs to "
             "store the lost chunks again (a backup stores every chunk the repository lacks that its VM still "
             "has), then run 'hvbackup verify --repair' to set aside what stays lost")


def _show_repair(result, json: bool) -> None:
    if json:
        emit_json(result.to_dict())
    else:
        for name in result.verified.set_aside:
            say(f"set aside damaged chunk {name}")
        for point_id, why in result.moved_points.items():
            say(f"set aside point {point_id} (unrestorable: {why})")
        for problem in result.remaining:
            say(f"remaining: {problem}")
        if not result.remaining:
            say(f"repository is sound ({plural(len(result.moved_points), 'point')} set aside in damaged/points, "
                f"{plural(len(result.verified.set_aside), 'chunk')} in damaged/chunks)")
    raise typer.Exit(EXIT_FOUND if result.remaining else EXIT_OK)


def _keep_option(rule: str, what: str):
    return typer.Option(0, f"--keep-{rule}", min=0, metavar="N", help=f"Keep {what}.")


def forget(
    point_ids: Optional[list[str]] = typer.Argument(None, metavar="[POINT_ID]...",
                                                    help="Forget these points (damaged ones too), instead of a "
                                                         "policy."),
    repo_path: Optional[str] = REPO,
    vm: Optional[str] = typer.Option(None, "--vm", metavar="VM",
                                     help="Apply the policy to this VM's points only (name or ID)."),
    keep_last: int = _keep_option("last", "the N newest points"),
    keep_daily: int = _keep_option("daily", "the newest point of each of the N latest days with points"),
    keep_weekly: int = _keep_option("weekly", "the newest point of each of the N latest ISO weeks with points"),
    keep_monthly: int = _keep_option("monthly", "the newest point of each of the N latest months with points"),
    prune: bool = typer.Option(False, "--prune", help="Then delete the chunks no point references."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be forgotten."),
    json: bool = JSON,
) -> None:
    """Forget the named restore points, or those a retention policy does not keep (per VM, times in UTC)."""
    from hvbackup.backup import manifest, retention

    policy = any((keep_last, keep_daily, keep_weekly, keep_monthly))
    if point_ids and (policy or vm):
        raise typer.BadParameter("give point IDs, or a policy (--keep-*, --vm): not both")
    repo = open_repo(repo_path)
    # Under the lock, so a backup never builds on a point while it is being forgotten.
    with repo.session():
        scan = repo.scan()
        if point_ids:
            keep, drop = [], [{"point_id": p, "vm_name": "-", "time": None} for p in dict.fromkeys(point_ids)]
            for entry in drop:
                found = next((p for p in scan.points if p.point_id == entry["point_id"]), None)
                if found:
                    entry.update(vm_name=found.vm_name, time=retention.point_time(found))
                elif not any(d.name == entry["point_id"] for d in scan.damaged):
                    what = ("restore point" if manifest.POINT_ID.fullmatch(entry["point_id"])
                            else "point ID or entry of points/")
                    raise RepositoryError(f"no {what} {entry['point_id']!r} (nothing was forgotten)")
        else:
            keep, drop = retention.plan(_require_vm(scan.points, vm), keep_last=keep_last, keep_daily=keep_daily,
                                        keep_weekly=keep_weekly, keep_monthly=keep_monthly)
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
        say(f"keep    {entry['point_id']}  {entry['vm_name']}  {when(entry['time'])}  ({', '.join(entry['reasons'])})")
    for entry in drop:
        say(f"forget  {entry['point_id']}  {entry['vm_name'] or '-'}  {when(entry['time'])}")
    say(f"{len(keep)} kept, {len(drop)} {'to forget' if dry_run else 'forgotten'}")
    if not point_ids:
        for d in scan.damaged:
            warn(f"damaged point {d.name} kept: forget it by its ID, or run verify --repair")
    if pruned is not None:
        say(f"pruned {pruned['chunks_deleted']} chunks ({human_size(pruned['bytes_freed'])} freed), "
            f"{pruned['chunks_kept']} kept")
