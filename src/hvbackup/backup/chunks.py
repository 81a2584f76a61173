"""Chunk files: ``chunks/<first two hex digits>/<64 hex digits>``, one framed, compressed and
(optionally) encrypted piece of disk data, named by the hash of its plaintext."""

from __future__ import annotations

import os
import re

import zstandard

from hvbackup.backup import envelope
from hvbackup.backup.crypto import OVERHEAD, Keys, chunk_name
from hvbackup.errors import RepositoryCorruptError

MAGIC = b"HVBKCHNK"
ZSTD_LEVEL = 3
NAME = re.compile(r"[0-9a-f]{64}")  # fullmatch


def max_payload(chunk_size: int) -> int:
    # Stored raw when zstd does not shrink it, so a payload is never longer than the chunk plus AEAD overhead.
    return chunk_size + OVERHEAD


class ChunkCodec:
    """Turns plaintext chunks into chunk files and back, checking everything on the way back."""

    def __init__(self, chunk_size: int, keys: Keys | None):
        self.chunk_size = chunk_size
        self.keys = keys

    def name(self, data) -> bytes:
        return chunk_name(data, self.keys)

    def encode(self, name: bytes, data) -> bytes:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
        flags = envelope.FLAG_COMPRESSED
        if len(packed) >= len(data):
            packed, flags = bytes(data), 0
        if self.keys:
            flags |= envelope.FLAG_ENCRYPTED
            length = len(packed) + OVERHEAD
            packed = self.keys.seal(packed, envelope.header_of(MAGIC, flags, length) + name)
        return envelope.frame(MAGIC, flags, packed)

    def decode(self, name: bytes, stored: bytes) -> bytes:
        what = f"chunk {name.hex()}"
        flags, header, payload = envelope.unframe(stored, MAGIC, max_payload(self.chunk_size), what)
        if bool(flags & envelope.FLAG_ENCRYPTED) != bool(self.keys):
            raise RepositoryCorruptError(f"{what}: encryption flag does not match the repository")
        if self.keys:
            payload = self.keys.open(payload, header + name, what)
        if flags & envelope.FLAG_COMPRESSED:
            payload = decompress(payload, self.chunk_size, what)
        if len(payload) > self.chunk_size:
            raise RepositoryCorruptError(f"{what}: {len(payload)} bytes is more than a chunk")
        if self.name(payload) != name:
            raise RepositoryCorruptError(f"{what}: content does not hash to its name")
        return bytes(payload)


def decompress(data, limit: int, what: str) -> bytes:
    """zstd-decompress at most ``limit`` bytes; a frame that claims more is refused before allocating."""
    try:
        size = zstandard.frame_content_size(data)
        if size > limit:
            raise RepositoryCorruptError(f"{what}: decompresses to {size} bytes, more than {limit}")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise RepositoryCorruptError(f"{what}: does not decompress ({exc})") from None


def chunk_path(root: str, name_hex: str) -> str:
    return os.path.join(root, "chunks", name_hex[:2], name_hex)


def chunk_dirs(root: str) -> list[str]:
    return [os.path.join(root, "chunks", f"{i:02x}") for i in range(256)]
