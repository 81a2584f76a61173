"""``hvbackup repo init PATH``: create a backup repository (format: docs/repository.md); and how every
command opens one (``--repo``, the passphrase)."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from hvbackup.cli.output import JSON, PASSPHRASE_ENV, emit_json, group, human_size, parse_size, say
from hvbackup.errors import RepositoryError

app = group("Backup repositories: where restore points are stored, deduplicated.")


def passphrase(confirm: bool) -> str:
    """The passphrase from HVBACKUP_PASSPHRASE, or asked for on the terminal; never empty."""
    given = os.environ.get(PASSPHRASE_ENV)
    if given is None:
        if not sys.stdin.isatty():
            raise RepositoryError(f"the repository is encrypted and there is no terminal to ask for its passphrase: "
                                  f"set {PASSPHRASE_ENV}")
        given = typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)
    if not given:
        raise RepositoryError(f"the passphrase is empty ({PASSPHRASE_ENV} or the prompt): an encrypted repository "
                              "needs a real one")
    return given


def open_repo(path: Optional[str]):
    """The repository at ``path`` (from --repo or HVBACKUP_REPO), unlocked when it is encrypted."""
    from hvbackup.backup.repository import Repository
    from hvbackup.errors import PassphraseNeededError

    if not path:
        raise typer.BadParameter("give the repository with --repo or HVBACKUP_REPO", param_hint="--repo")
    if os.environ.get(PASSPHRASE_ENV) is not None:
        return Repository.open(path, passphrase=passphrase(confirm=False))
    try:
        return Repository.open(path)
    except PassphraseNeededError:
        # Only an encrypted repository needs the passphrase; ask for it only then.
        return Repository.open(path, passphrase=passphrase(confirm=False))


@app.command()
def init(path: str = typer.Argument(..., metavar="PATH", help="A new or empty directory."),
         encrypt: bool = typer.Option(False, "--encrypt", help=f"Encrypt with AES-256-GCM; the passphrase comes "
                                      f"from {PASSPHRASE_ENV} or a prompt."),
         chunk_size: Optional[str] = typer.Option(None, "--chunk-size", metavar="SIZE",
                                                  help="Chunk size, a multiple of 64K up to 64M (default 1M)."),
         json: bool = JSON) -> None:
    """Create an empty repository in PATH."""
    from hvbackup.backup.repository import Repository

    sized = {"chunk_size": parse_size(chunk_size, "--chunk-size")} if chunk_size else {}
    repo = Repository.init(path, passphrase=passphrase(confirm=True) if encrypt else None, **sized)
    if json:
        emit_json({"path": os.path.abspath(path), "id": repo.id, "chunk_size": repo.chunk_size,
                   "encrypted": repo.encrypted})
    else:
        how = "encrypted" if repo.encrypted else "not encrypted"
        say(f"created repository {repo.id} at {os.path.abspath(path)} (chunks of {human_size(repo.chunk_size)}, "
            f"{how})")
