"""Chunk files: ``chunks/<first two hex digits>/<64 hex digits>``, one framed, compressed and
(optionally) encrypted piece of disk data, named by the hash of its plaintext."""

from __future__ import annotations

import os
import re
import threading

import zstandard

from hvbackup.backup import envelope
from hvbackup.backup.crypto import OVERHEAD, Keys, chunk_name
from hvbackup.errors import RepositoryCorruptError

MAGIC = b"HVBKCHNK"
ZSTD_LEVEL = 3
NAME = re.compile(r"[0-9a-f]{64}")  # fullmatch
# Before compressing a piece whole, compress SAMPLES spread samples of SAMPLE bytes: when they do not
# shrink below SKIP_RATIO of their size, the piece is stored as it is. Measured (docs/benchmarks.md,
# "Backup pipe speed"): on the ext4 image of bench_backup.py the check picked exactly the pieces zstd
# could not shrink by 3 %, and costs about 6 % of zstd's time on pieces that do compress.
SAMPLES, SAMPLE, SKIP_RATIO = 4, 16 << 10, 0.97

_local = threading.local()  # one compressor and decompressor per thread: building one costs a table setup


def _compressor() -> zstandard.ZstdCompressor:
    found = getattr(_local, "compressor", None)
    if found is None:
        found = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return found


def _decompressor() -> zstandard.ZstdDecompressor:
    found = getattr(_local, "decompressor", None)
    if found is None:
        found = _local.decompressor = zstandard.ZstdDecompressor()
    return found


def max_payload(chunk_size: int) -> int:
    # Stored raw when zstd does not shrink it, so a payload is never longer than the chunk plus AEAD overhead.
    return chunk_size + OVERHEAD


def worth_compressing(data) -> bool:
    """Whether zstd may shrink the piece: spread samples of it compressed first. A piece of at most
    SAMPLES × SAMPLE × 2 bytes is always tried whole."""
    view = memoryview(data).cast("B")
    if len(view) <= SAMPLES * SAMPLE * 2:
        return True
    step = len(view) // SAMPLES
    compressor = _compressor()
    packed = sum(len(compressor.compress(view[i * step: i * step + SAMPLE])) for i in range(SAMPLES))
    return packed < SKIP_RATIO * SAMPLES * SAMPLE


def compress(data) -> bytes | None:
    """The zstd frame (level 3) of ``data``, or None when it is to be stored as it is: the samples
    say zstd cannot win, or the frame is not smaller."""
    if not worth_compressing(data):
        return None
    packed = _compressor().compress(data)
    return packed if len(packed) < len(data) else None


class ChunkCodec:
    """Turns plaintext chunks into chunk files and back, checking everything on the way back."""

    def __init__(self, chunk_size: int, keys: Keys | None):
        self.chunk_size = chunk_size
        self.keys = keys

    def name(self, data) -> bytes:
        return chunk_name(data, self.keys)

    def encode_parts(self, name: bytes, data) -> list:
        """The chunk file as buffers to write one after the other (``os.writev``): no copy of the
        piece is made to frame it."""
        packed = compress(data)
        flags = envelope.FLAG_COMPRESSED
        if packed is None:
            packed, flags = memoryview(data).cast("B"), 0
        payload = [packed]
        if self.keys:
            flags |= envelope.FLAG_ENCRYPTED
            length = len(packed) + OVERHEAD
            payload = list(self.keys.seal_parts(packed, envelope.header_of(MAGIC, flags, length) + name))
        return envelope.frame_parts(MAGIC, flags, payload)

    def encode(self, name: bytes, data) -> bytes:
        return b"".join(self.encode_parts(name, data))

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
        return payload if isinstance(payload, bytes) else bytes(payload)


def decompress(data, limit: int, what: str) -> bytes:
    """zstd-decompress at most ``limit`` bytes; a frame that claims more is refused before allocating."""
    try:
        size = zstandard.frame_content_size(data)
        if size > limit:
            raise RepositoryCorruptError(f"{what}: decompresses to {size} bytes, more than {limit}")
        return _decompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise RepositoryCorruptError(f"{what}: does not decompress ({exc})") from None


def chunk_path(root: str, name_hex: str) -> str:
    return os.path.join(root, "chunks", name_hex[:2], name_hex)


def chunk_dirs(root: str) -> list[str]:
    return [os.path.join(root, "chunks", f"{i:02x}") for i in range(256)]
