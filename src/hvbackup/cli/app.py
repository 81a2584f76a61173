"""The command tree: one sub-application per command group, and the top-level commands."""

from __future__ import annotations

import typer

from hvbackup import __version__
from hvbackup.cli import backup, checkpoint, disk, host, quickstart, refpoint, repo, vm
from hvbackup.cli.output import show_help_without_command


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hvbackup {__version__}")
        raise typer.Exit()


def _root(ctx: typer.Context,
          version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_version,
                                       help="Print the version and exit.")) -> None:
    show_help_without_command(ctx)


app = typer.Typer(
    name="hvbackup",
    help="Host-side VM backup in the manner of Hyper-V: virtual disks, change tracking, backups.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.callback(invoke_without_command=True)(_root)
app.add_typer(disk.app, name="disk")
app.add_typer(host.app, name="host")
app.add_typer(vm.app, name="vm")
app.add_typer(checkpoint.app, name="checkpoint")
app.add_typer(refpoint.app, name="refpoint")
app.add_typer(repo.app, name="repo")
app.command("quickstart")(quickstart.quickstart)
for command in (backup.backup, backup.points, backup.restore, backup.verify, backup.forget):
    app.command()(command)
