"""``hvbackup repo init PATH``: create a backup repository (format: docs/repository.md)."""

from __future__ import annotations

import os

import typer

from hvbackup.backup.repository import DEFAULT_CHUNK_SIZE, Repository
from hvbackup.cli.output import emit_json, human_size, parse_size, show_help_without_command, stdout

app = typer.Typer(help="Backup repositories: where restore points are stored, deduplicated.")
app.callback(invoke_without_command=True)(show_help_without_command)

JSON = typer.Option(False, "--json", help="Print one JSON value instead of text.")
PASSPHRASE_ENV = "HVBACKUP_PASSPHRASE"


def passphrase(confirm: bool) -> str:
    """The passphrase from HVBACKUP_PASSPHRASE, or asked for on the terminal."""
    given = os.environ.get(PASSPHRASE_ENV)
    if given is not None:
        return given
    return typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)


@app.command()
def init(path: str,
         encrypt: bool = typer.Option(False, "--encrypt", help=f"Encrypt with AES-256-GCM; the passphrase comes "
                                      f"from {PASSPHRASE_ENV} or a prompt."),
         chunk_size: str = typer.Option(str(DEFAULT_CHUNK_SIZE >> 20) + "M", "--chunk-size",
                                        help="Chunk size, a multiple of 64K."),
         json: bool = JSON) -> None:
    """Create an empty repository in PATH (a new or empty directory)."""
    repo = Repository.init(path, passphrase=passphrase(confirm=True) if encrypt else None,
                           chunk_size=parse_size(chunk_size))
    if json:
        emit_json({"path": os.path.abspath(path), "id": repo.id, "chunk_size": repo.chunk_size,
                   "encrypted": repo.encrypted})
    else:
        how = "encrypted" if repo.encrypted else "not encrypted"
        stdout.print(f"created repository {repo.id} at {path} (chunks of {human_size(repo.chunk_size)}, {how})",
                     markup=False, soft_wrap=True)
