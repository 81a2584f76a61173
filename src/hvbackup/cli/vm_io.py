"""``hvbackup vm io VM write|read --disk N``: guest I/O for scripts and tests — write a repeated byte or
a file at an offset, read a range back as a SHA-256 or into a file. The writes go through the host's
attachment, so change tracking records them."""

from __future__ import annotations

import hashlib
from enum import Enum
from typing import Iterator, Optional

import typer

from hvbackup.cli.host import HOST, JSON, open_host
from hvbackup.cli.output import emit_json, parse_size, stdout
from hvbackup.host import GuestDisk

CHUNK = 1 << 20


class Action(str, Enum):
    write = "write"
    read = "read"


def io(
    vm: str = typer.Argument(..., help="The VM (name or ID); it must be running."),
    action: Action = typer.Argument(..., help="write or read."),
    disk: int = typer.Option(0, "--disk", min=0, help="Which of its disks (0 is the first)."),
    offset: str = typer.Option(..., "--offset", help="Where to start, in bytes (K/M/G suffixes)."),
    length: Optional[str] = typer.Option(None, "--length", help="How many bytes (of --pattern, or to read)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="write: this byte (e.g. 0xAB), --length times."),
    file: Optional[typer.FileBinaryRead] = typer.Option(None, "--file", help="write: this file's bytes."),
    out: Optional[str] = typer.Option(None, "--out", help="read: also write the bytes to this file."),
    host_dir: Optional[str] = HOST,
    json: bool = JSON,
) -> None:
    """Write --pattern BYTE --length L or --file F at --offset (flushed), or read --length bytes at
    --offset; prints the SHA-256 of the bytes."""
    start = parse_size(offset)
    if action == Action.write:
        if (pattern is None) == (file is None) or (pattern is not None) != (length is not None) or out:
            raise typer.BadParameter("write takes --pattern with --length, or --file")
        guest = open_host(host_dir).vm(vm).disk(disk)
        chunks = _pattern(_parse_byte(pattern), parse_size(length)) if pattern is not None else _file(file)
        done, digest = _write(guest, start, chunks)
    else:
        if length is None or pattern is not None or file is not None:
            raise typer.BadParameter("read takes --length (and --out)")
        guest = open_host(host_dir).vm(vm).disk(disk)
        done, digest = _read(guest, start, parse_size(length), out)
    result = {"disk": disk, "offset": start, "length": done, "sha256": digest}
    if action == Action.read:
        result["out"] = out
    if json:
        emit_json(result)
    else:
        verb = "wrote" if action == Action.write else "read"
        stdout.print(f"{verb} {done} bytes at {start} of disk {disk}: sha256 {digest}", markup=False, soft_wrap=True)


def _pattern(byte: int, length: int) -> Iterator[bytes]:
    block = bytes([byte]) * min(CHUNK, length)
    for position in range(0, length, CHUNK):
        yield block[:min(CHUNK, length - position)]


def _file(f) -> Iterator[bytes]:
    while piece := f.read(CHUNK):
        yield piece


def _write(guest: GuestDisk, start: int, chunks: Iterator[bytes]) -> tuple[int, str]:
    digest, position = hashlib.sha256(), start
    try:
        for piece in chunks:
            guest.write(position, piece)
            digest.update(piece)
            position += len(piece)
        guest.flush()
    finally:
        guest.vm.close_disks()
    return position - start, digest.hexdigest()


def _read(guest: GuestDisk, start: int, length: int, out: Optional[str]) -> tuple[int, str]:
    digest = hashlib.sha256()
    sink = open(out, "wb") if out else None
    try:
        for position in range(start, start + length, CHUNK):
            piece = guest.read(position, min(CHUNK, start + length - position))
            digest.update(piece)
            if sink:
                sink.write(piece)
    finally:
        guest.vm.close_disks()
        if sink:
            sink.close()
    return length, digest.hexdigest()


def _parse_byte(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise typer.BadParameter(f"{text!r} is not a byte value (0-255, or 0x00-0xff)", param_hint="--pattern")
    return value
