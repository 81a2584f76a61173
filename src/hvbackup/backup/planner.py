"""The planner: a reader's byte ranges turned into the repository's chunk slots, the base point reused.

As in Proxmox's fixed index, an incremental copies the base point's chunk index and overwrites the
slots the changes touch; a full read stores the slots holding data and leaves the rest zeros. A
reader that holds the whole disk (``Reader.whole``) gives each slot whole; a differential gives only
its changed sectors, which are laid over the base point's chunk read back from the repository, so
both make the same chunks of the same content.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from hvbackup.backup.geometry import Geometry
from hvbackup.backup.index import ChunkIndex
from hvbackup.backup.manifest import Manifest
from hvbackup.backup.readers import NEW_DISK, RESIZED, Range, Reader
from hvbackup.backup.repository import Repository
from hvbackup.backup.writer import Session
from hvbackup.errors import NeedsFull, RepositoryError


@dataclass
class DiskPlan:
    base: ChunkIndex | None   # what the writer starts the disk from (None: zeros)
    slots: list[int]          # the chunk slots to store, in order
    # Per slot, the reader's ranges to lay over the base point's chunk; None: slots are read whole.
    patches: dict[int, list[Range]] | None = None


def full(reader: Reader, chunk: int) -> DiskPlan:
    return DiskPlan(None, _slots(reader.allocated(), chunk))


def incremental(reader: Reader, changes: list[Range], base: ChunkIndex, chunk: int) -> DiskPlan:
    if reader.whole:
        return DiskPlan(base, _slots(changes, chunk))
    patches = _by_slot(changes, chunk)
    return DiskPlan(base, sorted(patches), patches)


def base_index(point: Manifest, disk_id: str, geometry: Geometry) -> ChunkIndex:
    """The base point's chunk index of this disk; NeedsFull if the point lacks it or its size differs."""
    ids = [d.get("instance_id") for d in point.vm_config.get("disks", [])]
    for disk, instance_id in zip(point.disks, ids):
        if instance_id != disk_id:
            continue
        if disk.geometry.virtual_size != geometry.virtual_size:
            raise NeedsFull(f"its size changed from {disk.geometry.virtual_size} to {geometry.virtual_size} "
                            "bytes since the base point", reason=RESIZED)
        return disk.chunks
    raise NeedsFull("the base restore point has no such disk", reason=NEW_DISK)


def base_is_intact(session: Session, point: Manifest) -> bool:
    """Every chunk the base point names is in the repository: a differential can be laid over it."""
    names = [disk.chunks.distinct_names() for disk in point.disks]
    return not any(len(session.missing(n)) for n in names if len(n))


def add_lost(plan: DiskPlan, lost: list[int]) -> None:
    """Slots whose base chunk the repository lost are stored again, read whole from the disk."""
    if not lost:
        return
    if plan.patches is not None:
        raise RepositoryError(f"{len(lost)} chunks of the base point went missing from the repository while a "
                              "differential was laid over them; the next backup reads them again")
    plan.slots = sorted(set(plan.slots).union(lost))


def slot_bytes(plan: DiskPlan, chunk: int, size: int) -> int:
    """The bytes the plan stores: whole chunks, the disk's tail shorter."""
    slots = np.asarray(plan.slots, np.int64)
    return int(np.minimum(chunk, size - slots * chunk).sum())


def chunk_at(reader: Reader, plan: DiskPlan, slot: int, chunk: int, repo: Repository) -> bytearray:
    """The content of ``slot`` as the disk was at the checkpoint."""
    offset = slot * chunk
    length = min(chunk, reader.geometry.virtual_size - offset)
    if plan.patches is None:
        data = bytearray(length)
        reader.readinto(offset, data)
        return data
    name = plan.base.name_at(slot)
    data = bytearray(repo.read_chunk(name)) if name else bytearray(length)
    if len(data) != length:
        raise RepositoryError(f"the base point's chunk {name} holds {len(data)} bytes where {length} belong")
    view = memoryview(data)
    for start, count in plan.patches[slot]:
        reader.readinto(start, view[start - offset:start - offset + count])
    return data


def _slots(ranges: list[Range], chunk: int) -> list[int]:
    """The slots the (sorted) ranges touch, in order."""
    slots: list[int] = []
    for offset, length in ranges:
        first, last = offset // chunk, (offset + length - 1) // chunk
        slots.extend(range(max(first, slots[-1] + 1 if slots else 0), last + 1))
    return slots


def _by_slot(ranges: list[Range], chunk: int) -> dict[int, list[Range]]:
    """The ranges cut at chunk boundaries, per slot."""
    pieces: dict[int, list[Range]] = defaultdict(list)
    for offset, length in ranges:
        end = offset + length
        while offset < end:
            slot = offset // chunk
            stop = min(end, (slot + 1) * chunk)
            pieces[slot].append((offset, stop - offset))
            offset = stop
    return dict(pieces)
