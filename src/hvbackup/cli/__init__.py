"""The ``hvbackup`` command.

``main`` answers ``--version`` before loading anything else, turns SIGTERM into the same orderly stop
as Ctrl-C, and turns every failure into one line on stderr and a documented exit code: a command
never ends in a traceback. The commands themselves are in ``cli/app.py`` and one module per group;
each loads the layers it uses only when it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

from hvbackup import __version__

EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 128 + signal.SIGINT, 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C, so every command cleans up as it does after a failure."""


_terminated = False


def _terminate(signum, frame) -> None:
    global _terminated
    _terminated = True
    raise Terminated()


def interrupted_by() -> KeyboardInterrupt:
    """What to raise once a command has cleaned up after the interruption it caught: exit 143 after
    SIGTERM, 130 after Ctrl-C."""
    return Terminated() if _terminated else KeyboardInterrupt()


@contextlib.contextmanager
def signals_set(event: threading.Event) -> Iterator[threading.Event]:
    """While the block runs, SIGINT and SIGTERM set ``event`` (the work stops itself, cleaning up)
    instead of raising wherever the main thread happens to be; the first one says so on stderr."""
    def stop(signum, frame) -> None:
        global _terminated
        _terminated = _terminated or signum == signal.SIGTERM
        if not event.is_set():
            sys.stderr.write("hvbackup: stopping: cleaning up what was started\n")
        event.set()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _fail(message: str) -> int:
    sys.stderr.write(f"hvbackup: error: {message}\n")
    return EXIT_FAILED


def main() -> None:
    if sys.argv[1:] in (["--version"], ["-V"]):
        sys.stdout.write(f"hvbackup {__version__}\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(run(sys.argv[1:]))
    except BrokenPipeError:  # `hvbackup … | head`: the reader is gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILED)


def run(args: list[str]) -> int:
    """Run one command line; returns the exit code."""
    import click
    import typer

    from hvbackup.cli.app import app
    from hvbackup.cli.output import error_line
    from hvbackup.errors import HvBackupError

    try:
        # Not click's own main loop: it turns Ctrl-C into a bare "Aborted!", before a command could
        # say what it undid.
        command = typer.main.get_command(app)
        with command.make_context("hvbackup", args) as ctx:
            command.invoke(ctx)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # usage errors: unknown option, bad value
        return _fail(exc.format_message())
    except HvBackupError as exc:
        return _fail(error_line(exc))
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}")
    except Terminated:
        sys.stderr.write("hvbackup: terminated (SIGTERM); what was in progress was stopped and undone\n")
        return EXIT_TERMINATED
    except (KeyboardInterrupt, click.Abort):
        sys.stderr.write("hvbackup: interrupted; what was in progress was stopped and undone\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line, and the traceback only when asked for
        if os.environ.get("HVBACKUP_DEBUG"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} (HVBACKUP_DEBUG=1 shows where; please report it)")
