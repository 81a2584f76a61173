"""Manifests (restore points): ``points/<point ID>``, a framed, zstd-compressed (and optionally
encrypted) JSON document that gives every disk's chunk index. Each one is a full backup by
reference: reading a point never needs another point.

Decoded, a manifest is a ``Manifest`` of ``Disk``s; fields it does not know are kept in ``extra``, so
a point written by another version reads and encodes as stored."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

import zstandard

from hvbackup.backup import envelope
from hvbackup.backup.chunks import decompress
from hvbackup.backup.crypto import OVERHEAD, Keys
from hvbackup.backup.geometry import Geometry
from hvbackup.backup.index import ChunkIndex
from hvbackup.errors import RepositoryCorruptError, RepositoryError

MAGIC = b"HVBKMANI"
MAX_STORED = 256 << 20  # about 7 TiB of data per point at 1 MiB chunks (zero runs take a few bytes)
MAX_JSON = 1 << 30
MAX_VIRTUAL_SIZE = 1 << 56  # far beyond any disk format, and slot numbers stay within int64
POINT_ID = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{8}")  # UTC time to the microsecond, random; fullmatch
# What the caller describes; the writer adds point_id, repository_id, chunk_size, disks and sizes.
CALLER_FIELDS = {
    "vm_name": None, "vm_id": None, "vm_config": {}, "reference_point": None, "rct_ids": [],
    "consistency": None, "method": None, "kind": None, "notes": [], "started": None, "ended": None,
}
GEOMETRY = ("virtual_size", "block_size", "logical_sector_size", "physical_sector_size")


NUMBER = (int, float)
READ_FIELDS = {"vm_name": (str, type(None)), "vm_id": (str, type(None)), "vm_config": dict, "rct_ids": list,
               "kind": (str, type(None)), "method": (str, type(None)), "notes": list,
               "started": (*NUMBER, type(None)), "ended": (*NUMBER, type(None)),
               "bytes_read": int, "bytes_stored": int}


def kinds_text(kinds) -> str:
    names = {str: "text", int: "a number", float: "a number", dict: "an object", list: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(names[k] for k in (kinds if isinstance(kinds, tuple) else (kinds,))))


def chunk_count(virtual_size: int, chunk_size: int) -> int:
    return -(-virtual_size // chunk_size)


@dataclass
class Disk:
    index: int
    geometry: Geometry
    chunks: ChunkIndex | None  # None in a summary (``Manifest.summary``)
    extra: dict = field(default_factory=dict)  # fields another version stored, kept to be encoded again

    def to_dict(self) -> dict:
        """As stored; a summary's disk without its chunk list."""
        chunks = {} if self.chunks is None else {"chunks": self.chunks.to_json()}
        return {"index": self.index, "geometry": self.geometry.to_dict(), **chunks, **self.extra}

    @classmethod
    def from_dict(cls, stored: dict, chunks: ChunkIndex) -> Disk:
        """From a stored disk already validated, whose chunk list is ``chunks``."""
        extra = dict(stored)
        index, geometry = extra.pop("index"), Geometry.from_dict(extra.pop("geometry"))
        extra.pop("chunks", None)
        return cls(index, geometry, chunks, extra)


@dataclass
class Manifest:
    """A restore point, as docs/repository.md describes it. Decoding checks the types of the fields
    in READ_FIELDS; the others are as stored."""
    point_id: str
    repository_id: str
    chunk_size: int
    vm_name: str | None = None
    vm_id: str | None = None
    vm_config: dict = field(default_factory=dict)
    reference_point: str | None = None
    rct_ids: list[str] = field(default_factory=list)
    consistency: int | None = None
    method: str | None = None
    kind: str | None = None
    notes: list[str] = field(default_factory=list)
    started: float | None = None
    ended: float | None = None
    bytes_read: int = 0
    bytes_stored: int = 0
    disks: list[Disk] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # fields another version stored, kept to be encoded again

    def to_dict(self) -> dict:
        """The stored JSON object, fields in the writer's order."""
        known = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("disks", "extra")}
        return {**known, "disks": [d.to_dict() for d in self.disks], **self.extra}

    def summary(self) -> Manifest:
        """This manifest without its chunk indexes, which are most of its memory."""
        return replace(self, disks=[replace(d, chunks=None) for d in self.disks])

    @classmethod
    def from_dict(cls, stored: dict, chunk_lists: list[ChunkIndex]) -> Manifest:
        """From a stored object already validated; ``chunk_lists`` are its disks' indexes."""
        known = {k: v for k, v in stored.items() if k in cls.__dataclass_fields__ and k != "extra"}
        extra = {k: v for k, v in stored.items() if k not in known}
        known["disks"] = [Disk.from_dict(d, chunks) for d, chunks in zip(known["disks"], chunk_lists)]
        return cls(**known, extra=extra)


def encode(manifest: Manifest, keys: Keys | None) -> bytes:
    """The stored manifest; one that readers would refuse as too large is refused here, before it
    is committed."""
    text = json.dumps(manifest.to_dict(), separators=(",", ":")).encode()
    payload = zstandard.ZstdCompressor(level=3).compress(text)
    if len(text) > MAX_JSON or len(payload) + OVERHEAD > MAX_STORED:
        data = sum(d.chunks.data_slots for d in manifest.disks)
        raise RepositoryError(f"the restore point lists {data} chunks of data, more than a manifest may hold "
                              f"({MAX_STORED >> 20} MiB stored): back this VM up into a repository with larger chunks")
    flags = envelope.FLAG_COMPRESSED
    if keys:
        flags |= envelope.FLAG_ENCRYPTED
        aad = envelope.header_of(MAGIC, flags, len(payload) + OVERHEAD) + manifest.point_id.encode()
        payload = keys.seal(payload, aad)
    return envelope.frame(MAGIC, flags, payload)


def decode(stored: bytes, point_id: str, keys: Keys | None, repository_id: str, chunk_size: int) -> Manifest:
    what = f"point {point_id}"
    flags, header, payload = envelope.unframe(stored, MAGIC, MAX_STORED, what)
    if bool(flags & envelope.FLAG_ENCRYPTED) != bool(keys) or not flags & envelope.FLAG_COMPRESSED:
        raise RepositoryCorruptError(f"{what}: flags {flags:#x} do not match the repository")
    if keys:
        payload = keys.open(payload, header + point_id.encode(), what)
    try:
        document = json.loads(decompress(payload, MAX_JSON, what))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; nesting too deep
        raise RepositoryCorruptError(f"{what}: not valid JSON ({exc})") from None
    return Manifest.from_dict(document, validate(document, what, point_id, repository_id, chunk_size))


def validate(m, what: str, point_id: str, repository_id: str, chunk_size: int) -> list[ChunkIndex]:
    """The structure readers rely on; any deviation is corruption, not something to guess around.
    Returns each disk's chunk list as its ``ChunkIndex``."""
    def require(condition, message):
        if not condition:
            raise RepositoryCorruptError(f"{what}: {message}")
    require(isinstance(m, dict), "not a JSON object")
    require(m.get("point_id") == point_id, "its point ID does not match its file name")
    require(m.get("repository_id") == repository_id, "belongs to another repository")
    require(m.get("chunk_size") == chunk_size, "chunk size does not match the repository")
    # The fields readers use besides the disks: a wrong type is damage, not a crash further on.
    for name, kinds in READ_FIELDS.items():
        require(isinstance(m.get(name), kinds), f"{name} is not {kinds_text(kinds)}")
    require(all(isinstance(r, str) for r in m["rct_ids"]), "rct_ids holds something other than text")
    disks = m.get("disks")
    require(isinstance(disks, list), "no disk list")
    indexes = []
    for i, disk in enumerate(disks):
        require(isinstance(disk, dict) and disk.get("index") == i, f"disk {i} is malformed")
        geometry = disk.get("geometry")
        require(isinstance(geometry, dict) and all(isinstance(geometry.get(k), int) for k in GEOMETRY),
                f"disk {i} has a malformed geometry")
        size = geometry["virtual_size"]
        require(0 <= size <= MAX_VIRTUAL_SIZE, f"disk {i} has a size of {size} bytes")
        indexes.append(ChunkIndex.from_json(disk.get("chunks"), chunk_count(size, chunk_size), f"{what} disk {i}"))
    return indexes


def caller_fields(fields: dict) -> dict:
    unknown = set(fields) - set(CALLER_FIELDS)
    if unknown:
        raise RepositoryError(f"unknown manifest fields: {', '.join(sorted(unknown))}")
    merged = {**CALLER_FIELDS, **fields}
    try:
        json.dumps(merged)
    except (TypeError, ValueError) as exc:
        raise RepositoryError(f"manifest fields are not JSON: {exc}") from None
    return merged


def check_geometry(index: int, geometry: Geometry) -> None:
    if not isinstance(geometry, Geometry) or not all(isinstance(getattr(geometry, k), int) for k in GEOMETRY):
        raise RepositoryError(f"disk {index}: geometry needs integer {', '.join(GEOMETRY)}")
    if not 0 <= geometry.virtual_size <= MAX_VIRTUAL_SIZE:
        raise RepositoryError(f"disk {index}: a virtual size of {geometry.virtual_size} bytes")
