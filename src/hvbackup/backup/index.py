"""A disk's chunk index: which chunk holds each chunk-sized slot of the disk.

Only slots with data are held: their numbers (sorted) and their 32-byte chunk names, as numpy arrays.
Every other slot reads as zeros. A 64 TiB disk holding one chunk of data is one entry, not 64 million,
so what a backup or restore costs follows the data, not the virtual size.

In a manifest (docs/repository.md, "Manifests") the index is a list that runs over the slots in
order: a chunk name (64 hex digits) covers one slot, a positive integer *n* covers *n* zero slots.
``null`` is read as one zero slot too.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from hvbackup.backup.chunks import NAME
from hvbackup.errors import RepositoryCorruptError

NAME_DTYPE = np.dtype("V32")  # raw bytes: unlike 'S32', trailing zero bytes survive


def names_from_hex(hex_names: list[str]) -> np.ndarray:
    return np.frombuffer(bytes.fromhex("".join(hex_names)), NAME_DTYPE)


def hex_of(name) -> str:
    return bytes(name).hex()


class ChunkIndex:
    def __init__(self, count: int, slots: np.ndarray, names: np.ndarray):
        self.count = count               # slots on the disk: ceil(virtual size / chunk size)
        self.slots = slots               # int64, sorted, unique
        self.names = names               # NAME_DTYPE, parallel to slots

    @classmethod
    def empty(cls, count: int) -> ChunkIndex:
        return cls(count, np.empty(0, np.int64), np.empty(0, NAME_DTYPE))

    @property
    def data_slots(self) -> int:
        return len(self.slots)

    def name_at(self, slot: int) -> str | None:
        at = int(np.searchsorted(self.slots, slot))
        return hex_of(self.names[at]) if at < len(self.slots) and self.slots[at] == slot else None

    def items(self) -> Iterator[tuple[int, str]]:
        """(slot, chunk name in hex) of every slot with data, in order."""
        for slot, name in zip(self.slots.tolist(), self.names):
            yield slot, hex_of(name)

    def distinct_names(self) -> np.ndarray:
        return np.unique(self.names)

    def slots_of(self, names: np.ndarray) -> np.ndarray:
        """The slots that hold any of ``names``."""
        return self.slots[np.isin(self.names, names)]

    def overwritten(self, changes: dict[int, bytes | None]) -> ChunkIndex:
        """This index with the slots in ``changes`` replaced (a name, or None for zeros): a base
        point's index copied and its changed slots overwritten, as a fixed index is."""
        if not changes:
            return self
        changed = np.fromiter(changes, np.int64, len(changes))
        keep = ~np.isin(self.slots, changed)
        stored = [(slot, name) for slot, name in changes.items() if name is not None]
        new_slots = np.fromiter((s for s, _ in stored), np.int64, len(stored))
        new_names = np.frombuffer(b"".join(n for _, n in stored), NAME_DTYPE)
        slots = np.concatenate((self.slots[keep], new_slots))
        names = np.concatenate((self.names[keep], new_names))
        order = np.argsort(slots, kind="stable")
        return ChunkIndex(self.count, slots[order], names[order])

    # -- the manifest's form

    def to_json(self) -> list:
        items: list = []
        previous = -1
        for slot, name in self.items():
            if slot > previous + 1:
                items.append(slot - previous - 1)
            items.append(name)
            previous = slot
        if self.count > previous + 1:
            items.append(self.count - previous - 1)
        return items

    @classmethod
    def from_json(cls, items, count: int, what: str) -> ChunkIndex:
        """Parse and check a manifest's list; anything malformed is corruption."""
        if not isinstance(items, list):
            raise RepositoryCorruptError(f"{what}: the chunk list is not a list")
        slots, names, slot = [], [], 0
        for item in items:
            if isinstance(item, str):
                if not NAME.fullmatch(item):
                    raise RepositoryCorruptError(f"{what}: malformed chunk name {item[:80]!r}")
                slots.append(slot)
                names.append(item)
                slot += 1
            elif item is None:
                slot += 1
            elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
                slot += item
            else:
                raise RepositoryCorruptError(f"{what}: the chunk list holds {str(item)[:80]!r}, neither a chunk "
                                             f"name nor a count of zero chunks")
            if slot > count:
                break
        if slot != count:
            raise RepositoryCorruptError(f"{what}: the chunk list covers {slot} chunks where the disk has {count}")
        return cls(count, np.array(slots, np.int64), names_from_hex(names))
