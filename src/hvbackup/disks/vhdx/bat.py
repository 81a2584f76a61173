"""[MS-VHDX] 2.4 Blocks and 2.5 BAT: block geometry, entry states, and the table itself.

The BAT interleaves payload and sector bitmap entries: after every ``chunk_ratio`` payload entries
comes the entry of that chunk's sector bitmap block. The table lives in memory as a numpy array of
whole 4 KiB pages (so bytes past the last entry are kept), with the set of pages changed since the
last commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hvbackup.disks.fileio import MiB
from hvbackup.errors import DiskFormatError

# 2.5.1.1 payload block states
NOT_PRESENT = 0
UNDEFINED = 1
ZERO = 2
UNMAPPED = 3
UNMAPPED_V095 = 5      # what drafts before v1.00 called UNMAPPED; still found in old files
FULLY_PRESENT = 6
PARTIALLY_PRESENT = 7
# 2.5.1.2 sector bitmap block states
SB_NOT_PRESENT = 0
SB_PRESENT = 6

STATE_MASK = 0x7
RESERVED_MASK = 0xFFFF8          # bits 3-19
OFFSET_SHIFT = 20                # FileOffsetMB, bits 20-63
ENTRY_SIZE = 8
PAGE = 4096
ENTRIES_PER_PAGE = PAGE // ENTRY_SIZE
SECTORS_PER_BITMAP_BLOCK = 1 << 23
MAX_VIRTUAL_SIZE = 64 << 40
MIN_BLOCK_SIZE = MiB
MAX_BLOCK_SIZE = 256 * MiB

def entry(state: int, file_offset: int = 0) -> int:
    return (file_offset // MiB) << OFFSET_SHIFT | state


@dataclass(frozen=True)
class Geometry:
    """Block and chunk arithmetic of 2.4 and the entry counts of 2.5."""

    virtual_size: int
    block_size: int
    logical_sector_size: int
    has_parent: bool

    def __post_init__(self) -> None:
        bs, lss = self.block_size, self.logical_sector_size
        if not (MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE) or bs & (bs - 1):
            raise DiskFormatError(f"block size {bs} is not a power of two between 1 MiB and 256 MiB")
        if lss not in (512, 4096):
            raise DiskFormatError(f"logical sector size {lss} is neither 512 nor 4096")
        if not 0 < self.virtual_size <= MAX_VIRTUAL_SIZE or self.virtual_size % lss:
            raise DiskFormatError(
                f"virtual disk size {self.virtual_size} is not a positive multiple of {lss} up to 64 TiB"
            )

    @cached_property
    def chunk_ratio(self) -> int:
        return SECTORS_PER_BITMAP_BLOCK * self.logical_sector_size // self.block_size

    @cached_property
    def data_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @cached_property
    def bitmap_blocks(self) -> int:
        return -(-self.data_blocks // self.chunk_ratio)

    @cached_property
    def entry_count(self) -> int:
        if self.has_parent:
            return self.bitmap_blocks * (self.chunk_ratio + 1)
        return self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio

    @cached_property
    def region_length(self) -> int:
        return -(-self.entry_count * ENTRY_SIZE // MiB) * MiB

    @cached_property
    def sectors_per_block(self) -> int:
        return self.block_size // self.logical_sector_size

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk: int) -> int:
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    def block_length(self, block: int) -> int:
        """Bytes of the virtual disk in ``block`` (the last block may be short)."""
        return min(self.block_size, self.virtual_size - block * self.block_size)


class Bat:
    """The BAT of an open file."""

    def __init__(self, geometry: Geometry, file_offset: int, table: np.ndarray):
        self.geometry = geometry
        self.file_offset = file_offset
        self.table = table
        self.dirty_pages: set[int] = set()

    @classmethod
    def from_bytes(cls, geometry: Geometry, file_offset: int, data: bytes) -> Bat:
        table = np.frombuffer(data, dtype="<u8").copy()
        return cls(geometry, file_offset, table)

    @staticmethod
    def page_bytes_needed(geometry: Geometry) -> int:
        return -(-geometry.entry_count * ENTRY_SIZE // PAGE) * PAGE

    # -- single entries ------------------------------------------------------------------------

    def payload(self, block: int) -> int:
        return int(self.table[self.geometry.payload_index(block)])

    def bitmap(self, chunk: int) -> int:
        return int(self.table[self.geometry.bitmap_index(chunk)])

    def set_payload(self, block: int, state: int, file_offset: int = 0) -> None:
        self._set(self.geometry.payload_index(block), entry(state, file_offset))

    def set_bitmap(self, chunk: int, state: int, file_offset: int = 0) -> None:
        self._set(self.geometry.bitmap_index(chunk), entry(state, file_offset))

    def _set(self, index: int, value: int) -> None:
        self.table[index] = value
        self.dirty_pages.add(index // ENTRIES_PER_PAGE)

    # -- whole-table views ---------------------------------------------------------------------

    def payload_entries(self, first_block: int, count: int) -> np.ndarray:
        """Payload entries of blocks [first_block, first_block+count), skipping bitmap entries."""
        blocks = np.arange(first_block, first_block + count, dtype=np.int64)
        return self.table[blocks + blocks // self.geometry.chunk_ratio]

    def pages_to_commit(self) -> list[tuple[int, bytes]]:
        raw = self.table.view(np.uint8)
        return [
            (self.file_offset + page * PAGE, raw[page * PAGE:(page + 1) * PAGE].tobytes())
            for page in sorted(self.dirty_pages)
        ]

    def occupied(self) -> tuple[np.ndarray, np.ndarray]:
        """File offsets and lengths of every block an entry places in the file: present blocks
        (whatever their offset, so a zero one is caught) and the soft anchors UNDEFINED and
        UNMAPPED blocks may keep, since 2.5.1 keeps every non-zero offset unique."""
        geo = self.geometry
        table = self.table[:geo.entry_count]
        is_bitmap = self._bitmap_mask()
        offsets = (table >> np.uint64(OFFSET_SHIFT)).astype(np.int64) * MiB
        states = table & np.uint64(STATE_MASK)
        present = np.where(is_bitmap, states == SB_PRESENT, np.isin(states, (FULLY_PRESENT, PARTIALLY_PRESENT)))
        anchored = ~is_bitmap & np.isin(states, (UNDEFINED, UNMAPPED, UNMAPPED_V095)) & (offsets != 0)
        used = present | anchored
        lengths = np.where(is_bitmap, MiB, geo.block_size)
        return offsets[used], lengths[used]

    def _bitmap_mask(self) -> np.ndarray:
        geo = self.geometry
        index = np.arange(geo.entry_count, dtype=np.int64)
        return (index % (geo.chunk_ratio + 1)) == geo.chunk_ratio

    def validate(self) -> None:
        """Refuse states the file type does not allow and reserved bits (2.5.1)."""
        geo = self.geometry
        table = self.table[:geo.entry_count]
        is_bitmap = self._bitmap_mask()
        states = table & np.uint64(STATE_MASK)
        bad_reserved = np.flatnonzero(table & np.uint64(RESERVED_MASK))
        if bad_reserved.size:
            raise DiskFormatError(f"BAT entry {bad_reserved[0]} has reserved bits set")
        allowed_payload = [NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, UNMAPPED_V095, FULLY_PRESENT]
        if geo.has_parent:
            allowed_payload.append(PARTIALLY_PRESENT)
        allowed_bitmap = [SB_NOT_PRESENT, SB_PRESENT] if geo.has_parent else [SB_NOT_PRESENT]
        bad = np.flatnonzero(np.where(is_bitmap, ~np.isin(states, allowed_bitmap), ~np.isin(states, allowed_payload)))
        if bad.size:
            i = int(bad[0])
            kind = "sector bitmap" if is_bitmap[i] else "payload"
            raise DiskFormatError(
                f"BAT entry {i} ({kind}) has state {int(states[i])}, not allowed in a "
                f"{'differencing' if geo.has_parent else 'fixed or dynamic'} VHDX"
            )
        if geo.has_parent:
            per_chunk = states.reshape(geo.bitmap_blocks, geo.chunk_ratio + 1)
            needs_bitmap = (per_chunk[:, :-1] == PARTIALLY_PRESENT).any(axis=1)
            missing = np.flatnonzero(needs_bitmap & (per_chunk[:, -1] != SB_PRESENT))
            if missing.size:
                raise DiskFormatError(f"chunk {missing[0]} has partially present blocks but no sector bitmap block")
