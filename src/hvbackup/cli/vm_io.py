"""``hvbackup vm io VM write|read --disk N``: guest I/O for scripts and tests — write a repeated byte or
a file at an offset, read a range back as a SHA-256 or into a file. The writes go through the host's
attachment, so change tracking records them."""

from __future__ import annotations

import os
import stat
from enum import Enum
from typing import TYPE_CHECKING, BinaryIO, Iterator, Optional

import typer

from hvbackup import durable
from hvbackup.cli.host import open_host
from hvbackup.cli.output import HOST, JSON, emit_json, human_size, parse_size, plural, say
from hvbackup.errors import HvBackupError
from hvbackup.units import MiB

if TYPE_CHECKING:
    from hvbackup.host import GuestDisk

CHUNK = MiB


class Action(str, Enum):
    write = "write"
    read = "read"


class GuestIoError(HvBackupError):
    """A file given to ``vm io`` cannot be read or written."""


def io(
    vm: str = typer.Argument(..., metavar="VM", help="The VM (name or ID); it must be Running or Paused."),
    action: Action = typer.Argument(..., metavar="ACTION", help="write or read."),
    disk: int = typer.Option(0, "--disk", min=0, metavar="N", help="Which of its disks (0 is the first)."),
    offset: str = typer.Option(..., "--offset", metavar="SIZE", help="Where to start, in bytes (K/M/G/T suffixes)."),
    length: Optional[str] = typer.Option(None, "--length", metavar="SIZE",
                                         help="How many bytes: of --pattern to write, or to read."),
    pattern: Optional[str] = typer.Option(None, "--pattern", metavar="BYTE",
                                          help="write: this byte value (0xAB or 171), --length times."),
    file: Optional[str] = typer.Option(None, "--file", metavar="FILE", help="write: this regular file's bytes."),
    out: Optional[str] = typer.Option(None, "--out", metavar="FILE",
                                      help="read: also write the bytes to this file (replaced if it exists)."),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """Write --pattern BYTE --length L or --file F at --offset (flushed), or read --length L bytes at
    --offset (and with --out F save them); prints the SHA-256 of the bytes."""
    start = parse_size(offset, "--offset")
    if action == Action.write:
        if (pattern is None) == (file is None) or (pattern is not None) != (length is not None) or out:
            raise typer.BadParameter("write takes --pattern BYTE with --length L, or --file F (and no --out)")
        byte = _parse_byte(pattern) if pattern is not None else None
        count = parse_size(length, "--length") if length is not None else None
    else:
        if length is None or pattern is not None or file is not None:
            raise typer.BadParameter("read takes --length L (and --out F); --pattern and --file are for write")
        count = parse_size(length, "--length")
        if out:
            from hvbackup.host import ownership

            ownership.refuse_if_owned(os.path.abspath(out), "write the bytes read over")
    source = _open_source(file) if file is not None else None
    try:
        if source is not None:
            count = os.fstat(source.fileno()).st_size
        guest = open_host(host_dir).vm(vm).disk(disk)
        try:
            if start + count > guest.size:
                raise typer.BadParameter(f"{plural(count, 'byte')} at offset {start} run past the end of disk {disk} "
                                         f"({human_size(guest.size)}, {guest.size} bytes)", param_hint="--offset")
            if action == Action.write:
                chunks = _pattern(byte, count) if source is None else _file(source, file)
                done, digest = _write(guest, start, chunks)
            else:
                done, digest = _read(guest, start, count, out)
        finally:
            guest.vm.close_disks()
    finally:
        if source is not None:
            source.close()
    result = {"disk": disk, "offset": start, "length": done, "sha256": digest}
    if action == Action.read:
        result["out"] = os.path.abspath(out) if out else None
    if json:
        emit_json(result)
    else:
        verb = "wrote" if action == Action.write else "read"
        saved = f" (saved to {result['out']})" if action == Action.read and out else ""
        say(f"{verb} {plural(done, 'byte')} at {start} of disk {disk}: sha256 {digest}{saved}")


def _open_source(path: str) -> BinaryIO:
    try:
        source = open(path, "rb")
    except OSError as exc:
        raise GuestIoError(f"--file {path}: cannot read it: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
        source.close()
        raise GuestIoError(f"--file {path}: not a regular file")
    return source


def _pattern(byte: int, length: int) -> Iterator[bytes]:
    block = bytes([byte]) * min(CHUNK, length)
    for position in range(0, length, CHUNK):
        yield block[:min(CHUNK, length - position)]


def _file(source: BinaryIO, path: str) -> Iterator[bytes]:
    while True:
        try:
            piece = source.read(CHUNK)
        except OSError as exc:
            raise GuestIoError(f"--file {path}: reading it failed: {exc.strerror}") from None
        if not piece:
            return
        yield piece


def _write(guest: GuestDisk, start: int, chunks: Iterator[bytes]) -> tuple[int, str]:
    import hashlib

    digest, position = hashlib.sha256(), start
    for piece in chunks:
        guest.write(position, piece)
        digest.update(piece)
        position += len(piece)
    guest.flush()
    return position - start, digest.hexdigest()


def _read(guest: GuestDisk, start: int, length: int, out: Optional[str]) -> tuple[int, str]:
    import hashlib

    digest = hashlib.sha256()
    with _Sink(out) if out else _NoSink() as sink:
        for position in range(start, start + length, CHUNK):
            piece = guest.read(position, min(CHUNK, start + length - position))
            digest.update(piece)
            sink.write(piece)
    return length, digest.hexdigest()


class _NoSink:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def write(self, piece: bytes) -> None:
        pass


class _Sink:
    """``--out``: a regular file is staged beside itself and put in place durably once the read is
    done (``durable.Staged``), so a failed read leaves whatever was there; anything else (a device,
    a pipe) is written directly."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        parent = os.path.dirname(self.path)
        if os.path.isdir(self.path):
            raise GuestIoError(f"--out {path}: is a directory; give a file name")
        if not os.path.isdir(parent):
            why = "is not a directory" if os.path.lexists(parent) else "does not exist"
            raise GuestIoError(f"--out {path}: {parent} {why}")
        try:
            special = os.path.exists(self.path) and not stat.S_ISREG(os.stat(self.path).st_mode)
        except OSError:
            special = False
        try:
            self.staged = None if special else durable.Staged.next_to(self.path)
            self.file = open(self.path, "wb") if special else None
        except OSError as exc:
            raise GuestIoError(f"--out {path}: cannot write it: {exc.strerror}") from None

    def __enter__(self):
        return self

    def write(self, piece: bytes) -> None:
        try:
            if self.staged:
                self.staged.write([piece])
            else:
                self.file.write(piece)
        except OSError as exc:
            raise GuestIoError(f"--out {self.path}: writing failed: {exc.strerror}") from None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.staged:
                self.file.close()
            elif exc_type is None:
                self.staged.finish(self.path)  # on failure it removes the staged file itself
            else:
                self.staged.discard()
        except OSError as error:
            raise GuestIoError(f"--out {self.path}: writing failed: {error.strerror}") from None


def _parse_byte(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise typer.BadParameter(f"{text!r} is not a byte value (0-255, or 0x00-0xff)", param_hint="--pattern")
    return value
