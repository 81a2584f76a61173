"""The frame every repository file is stored in, and the atomic-write helpers.

A frame is a 24-byte header (magic, format version, flags, reserved, payload length), the payload, and
a BLAKE3 checksum of everything before it. Readers check all of it before looking at the payload.
"""

from __future__ import annotations

import os
import struct

from blake3 import blake3

from hvbackup import durable
from hvbackup.errors import RepositoryCorruptError

HEADER = struct.Struct("<8sHHIQ")  # magic, version, flags, reserved (0), payload length
CHECKSUM_SIZE = 32
VERSION = 1
FLAG_ENCRYPTED = 0x1
FLAG_COMPRESSED = 0x2
KNOWN_FLAGS = FLAG_ENCRYPTED | FLAG_COMPRESSED


def frame(magic: bytes, flags: int, payload: bytes) -> bytes:
    return b"".join(frame_parts(magic, flags, [payload]))


def frame_parts(magic: bytes, flags: int, payload: list) -> list:
    """The frame of the payload given as consecutive buffers, as a list of buffers (header, the
    payload's, checksum) to write in order: the payload is neither joined nor copied."""
    header = HEADER.pack(magic, VERSION, flags, 0, sum(len(part) for part in payload))
    checksum = blake3(header)
    for part in payload:
        checksum.update(part)
    return [header, *payload, checksum.digest()]


def header_of(magic: bytes, flags: int, payload_length: int) -> bytes:
    """The header a frame with this payload length has; encrypted payloads bind it as associated data."""
    return HEADER.pack(magic, VERSION, flags, 0, payload_length)


def unframe(data: bytes, magic: bytes, max_payload: int, what: str) -> tuple[int, bytes, memoryview]:
    """Check a frame and return (flags, header, payload); any defect raises RepositoryCorruptError."""
    if len(data) < HEADER.size + CHECKSUM_SIZE:
        raise RepositoryCorruptError(f"{what}: truncated ({len(data)} bytes)")
    found, version, flags, reserved, length = HEADER.unpack_from(data)
    if found != magic:
        raise RepositoryCorruptError(f"{what}: bad magic {found!r} (expected {magic!r})")
    if version != VERSION:
        raise RepositoryCorruptError(f"{what}: format version {version} is not supported (this is {VERSION})")
    if flags & ~KNOWN_FLAGS or reserved:
        raise RepositoryCorruptError(f"{what}: unknown flags {flags:#x} or reserved field {reserved:#x}")
    if length > max_payload or HEADER.size + length + CHECKSUM_SIZE != len(data):
        raise RepositoryCorruptError(f"{what}: payload length {length} does not fit the file ({len(data)} bytes)")
    body = memoryview(data)[: HEADER.size + length]
    if blake3(body).digest() != data[HEADER.size + length:]:
        raise RepositoryCorruptError(f"{what}: checksum mismatch")
    return flags, bytes(data[: HEADER.size]), body[HEADER.size:]


def read_bounded(path: str, max_size: int, what: str) -> bytes:
    """The whole file, refusing one larger than ``max_size`` before reading it."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_size:
            raise RepositoryCorruptError(f"{what}: {size} bytes is more than the {max_size} allowed")
        return f.read(max_size + 1)


def looks_complete(path: str, magic: bytes) -> bool:
    """The file is there and its frame header (of this kind) declares exactly its length: what a
    finished write leaves. A torn file (storage that lost a write) or a foreign file does not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        header, size = os.pread(fd, HEADER.size, 0), os.fstat(fd).st_size
    finally:
        os.close(fd)
    if len(header) < HEADER.size:
        return False
    found, version, _, _, length = HEADER.unpack(header)
    return found == magic and version == VERSION and HEADER.size + length + CHECKSUM_SIZE == size


def write_durable(tmp_dir: str, final_path: str, data: bytes) -> None:
    """Write ``data`` to a new file in ``tmp_dir``, fsync it and rename it to ``final_path``: the
    destination is either absent or complete. The caller fsyncs the destination directory."""
    durable.write_file(final_path, [data], staging=tmp_dir, mode=0o600)
