"""The ``hvbackup`` command: one sub-application per command group."""

from __future__ import annotations

import sys

import typer

from hvbackup.cli import backup, checkpoint, disk, host, quickstart, refpoint, repo, vm
from hvbackup.cli.output import EXIT_FAILED, error_line, show_help_without_command, stderr
from hvbackup.errors import HvBackupError

app = typer.Typer(
    name="hvbackup",
    help="Host-side VM backup in the manner of Hyper-V: virtual disks, change tracking, backups.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.callback(invoke_without_command=True)(show_help_without_command)
app.add_typer(disk.app, name="disk")
app.add_typer(host.app, name="host")
app.add_typer(vm.app, name="vm")
app.add_typer(checkpoint.app, name="checkpoint")
app.add_typer(refpoint.app, name="refpoint")
app.add_typer(repo.app, name="repo")
app.command("quickstart")(quickstart.quickstart)
for command in (backup.backup, backup.points, backup.restore, backup.verify, backup.forget):
    app.command()(command)


def main() -> None:
    """Run a command; every expected failure becomes one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: unknown option, bad value
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        stderr.print(f"hvbackup: error: {message}", markup=False)
        code = EXIT_FAILED
    except HvBackupError as exc:
        stderr.print(f"hvbackup: error: {error_line(exc)}", markup=False)
        code = EXIT_FAILED
    except (KeyboardInterrupt, typer.Abort):
        stderr.print("hvbackup: interrupted", markup=False)
        code = 130
    sys.exit(code or 0)
