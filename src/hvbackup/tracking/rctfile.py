"""``NAME.vhdx.rct``: the change map and the sealed points, saved whole at every seal.

Layout (little-endian; docs/tracking.md is the full description)::

    0   8  magic "HVBKRCT\\0"             72  8  payload length (one zstd frame)
    8   4  format version (1)            80  4  earlier lineage count (<= 64)
    12  4  granularity (bytes)           84  4  reserved, zero
    16 16  lineage GUID                  88     earlier lineages, 24 bytes each: GUID, reason, up to
    32  8  virtual size                  ...    payload
    40  4  last sealed sequence          end-4  CRC-32C of every byte before it
    44  4  payload encoding: 0 dense, 1 runs
    48 16  VHDX DataWriteGuid the map is current for
    64  8  run count (0 for dense)

The payload holds the epoch array, one uint32 per granule (dense), or, when that is smaller, its runs
of equal epochs: every run's first granule, then every run's epoch, uint32 each. Runs make loading
a sparsely written map fast: no decompressing of megabytes of zeros.

The file is replaced atomically (temporary file, fsync, rename), so it is always one whole save.
Its size is bounded by the disk: at most 4 bytes a granule plus a few hundred bytes.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass

import numpy as np
import zstandard
from crc32c import crc32c

from hvbackup.disks.fileio import replace_file
from hvbackup.errors import TrackingFormatError
from hvbackup.tracking.changemap import MAX_GRANULARITY, MAX_GRANULES, MIN_GRANULARITY, ChangeMap

MAGIC = b"HVBKRCT\0"
VERSION = 1
MAX_RETIRED = 64
_HEADER = struct.Struct("<8sII16sQII16sQQII")
_RETIRED = struct.Struct("<16sII")
_FRAME_OVERHEAD = 1 << 16  # zstd frame bound for incompressible input, with room to spare


class Retirement(enum.IntEnum):
    """Why an earlier lineage ended; decides how a query against one of its IDs is answered."""

    CHANGED_OFFLINE = 1  # a writer that does not track modified the disk: its IDs fail
    LOST = 2             # the side files were missing or damaged: its IDs fail
    CONTINUED = 3        # this history forked from it (a differencing child): its IDs up to ``up_to`` hold


@dataclass(frozen=True)
class EarlierLineage:
    lineage: uuid.UUID
    reason: Retirement
    up_to: int = 0  # CONTINUED: the last of its points this history shares


DENSE, RUNS = 0, 1


@dataclass
class RctState:
    lineage: uuid.UUID
    last_sealed: int
    data_write_guid: uuid.UUID
    changes: ChangeMap
    retired: list[EarlierLineage]
    # Read from a save that holds writes after its last sealed point (a writer's recovered marks,
    # saved without sealing): known while decoding, so no pass over the map is needed to find it.
    unsealed_changes: bool = False

    def pack(self) -> bytes:
        epochs = self.changes.epochs
        runs = self.changes.runs(limit=(len(epochs) - 1) // 2)  # runs only while smaller than dense
        compressor = zstandard.ZstdCompressor(level=1)
        if runs is not None:
            starts, values = runs
            payload = compressor.compress(starts.astype("<u4").tobytes() + values.astype("<u4").tobytes())
            encoding, count = RUNS, len(starts)
        else:
            payload, encoding, count = compressor.compress(epochs.astype("<u4", copy=False)), DENSE, 0
        retired = self.retired[-MAX_RETIRED:]
        header = _HEADER.pack(
            MAGIC, VERSION, self.changes.granularity, self.lineage.bytes_le, self.changes.size, self.last_sealed,
            encoding, self.data_write_guid.bytes_le, count, len(payload), len(retired), 0,
        )
        head = header + b"".join(_RETIRED.pack(e.lineage.bytes_le, e.reason, e.up_to) for e in retired)
        return b"".join((head, payload, struct.pack("<I", crc32c(payload, crc32c(head)))))

    def save(self, path: str) -> None:
        replace_file(path, self.pack())

    @classmethod
    def unpack(cls, data: bytes, virtual_size: int) -> RctState:
        if len(data) < _HEADER.size + 4:
            raise TrackingFormatError("the file is too short", reason="rct.file.truncated")
        (magic, version, granularity, lineage, size, last_sealed, encoding, dwg, runs, payload_length, retired_count,
         _reserved) = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise TrackingFormatError("it is not an hvbackup change tracking file", reason="rct.header.magic")
        if version != VERSION:
            raise TrackingFormatError(f"format version {version} is not supported (this hvbackup reads {VERSION})",
                                      reason="rct.header.version")
        if struct.unpack_from("<I", data, len(data) - 4)[0] != crc32c(memoryview(data)[:-4]):
            raise TrackingFormatError("its checksum does not match", reason="rct.file.checksum")
        if size != virtual_size:
            raise TrackingFormatError(f"it describes a {size}-byte disk; the disk has {virtual_size} bytes",
                                      reason="rct.header.virtual-size")
        if granularity & (granularity - 1) or not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY:
            raise TrackingFormatError(f"granularity {granularity} is invalid", reason="rct.header.granularity")
        granules = -(-size // granularity)
        if (granules > MAX_GRANULES or retired_count > MAX_RETIRED or last_sealed < 1 or encoding not in (DENSE, RUNS)
                or (encoding == DENSE) != (runs == 0) or runs * 2 > granules):
            raise TrackingFormatError("its counts are out of range", reason="rct.header.counts")
        at = _HEADER.size + retired_count * _RETIRED.size
        if at + payload_length + 4 != len(data) or payload_length > granules * 4 + _FRAME_OVERHEAD:
            raise TrackingFormatError("its length does not match its contents", reason="rct.file.length")
        retired = []
        for i in range(retired_count):
            raw, reason, up_to = _RETIRED.unpack_from(data, _HEADER.size + i * _RETIRED.size)
            if reason not in Retirement._value2member_map_ or up_to > last_sealed:
                raise TrackingFormatError(f"earlier lineage entry {i} is invalid", reason="rct.earlier-lineage.invalid")
            retired.append(EarlierLineage(uuid.UUID(bytes_le=raw), Retirement(reason), up_to))
        changes = ChangeMap(size, granularity)
        payload = memoryview(data)[at:at + payload_length]
        try:
            if encoding == DENSE:
                newest = _read_dense(payload, changes, last_sealed)
            else:
                newest = _read_runs(payload, runs, changes, last_sealed)
        except zstandard.ZstdError as exc:
            raise TrackingFormatError(f"its change map does not decompress: {exc}",
                                      reason="rct.payload.compression") from None
        return cls(uuid.UUID(bytes_le=lineage), last_sealed, uuid.UUID(bytes_le=dwg), changes, retired,
                   unsealed_changes=newest > last_sealed)


def _newest(values: np.ndarray, last_sealed: int) -> int:
    """The highest epoch in ``values``, which may not exceed last sealed + 1."""
    newest = int(values.max()) if len(values) else 0
    if newest > last_sealed + 1:
        raise TrackingFormatError("its change map names points that were never sealed",
                                  reason="rct.payload.unsealed-epoch")
    return newest


def _read_dense(payload: memoryview, changes: ChangeMap, last_sealed: int) -> int:
    """Decompress window by window, writing only windows that hold a change (so an unwritten part
    of the map takes no memory); returns the highest epoch."""
    reader = zstandard.ZstdDecompressor().stream_reader(payload)
    newest = 0
    for low, high in changes.windows():
        values = np.frombuffer(_read_exactly(reader, (high - low) * 4), dtype="<u4")
        if values.any():
            newest = max(newest, _newest(values, last_sealed))
            changes.epochs[low:high] = values
    if reader.read(1):
        raise TrackingFormatError("its change map has the wrong length", reason="rct.payload.length")
    return newest


def _read_exactly(reader, length: int) -> bytes:
    pieces, got = [], 0
    while got < length:
        piece = reader.read(length - got)
        if not piece:
            raise TrackingFormatError("its change map has the wrong length", reason="rct.payload.length")
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


def _read_runs(payload: memoryview, runs: int, changes: ChangeMap, last_sealed: int) -> int:
    """Decode K run starts and K epochs into the map; returns the highest epoch."""
    expected = runs * 8
    raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
    if len(raw) != expected:
        raise TrackingFormatError("its change map has the wrong length", reason="rct.payload.length")
    starts = np.frombuffer(raw, dtype="<u4", count=runs)
    values = np.frombuffer(raw, dtype="<u4", offset=runs * 4)
    newest = _newest(values, last_sealed)
    if starts[0] != 0 or np.any(starts[1:] <= starts[:-1]) or starts[-1] >= len(changes.epochs):
        raise TrackingFormatError("its change map runs are out of order", reason="rct.payload.run-order")
    changes.fill_runs(starts, values)
    return newest


# The largest file a valid save can be: the header, every earlier lineage, the densest map, the CRC.
MAX_FILE_SIZE = _HEADER.size + MAX_RETIRED * _RETIRED.size + MAX_GRANULES * 4 + _FRAME_OVERHEAD + 4


def read(path: str, virtual_size: int) -> RctState:
    """Raises FileNotFoundError, OSError or TrackingFormatError; never reads more than a valid file holds."""
    with open(path, "rb") as f:
        return RctState.unpack(f.read(MAX_FILE_SIZE + 1), virtual_size)
