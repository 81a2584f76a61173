"""[MS-VHDX] 2.4 Blocks and 2.5 BAT: block geometry, entry states, and the table itself.

The BAT interleaves payload and sector bitmap entries: after every ``chunk_ratio`` payload entries
comes the entry of that chunk's sector bitmap block. The table lives in memory as a numpy array of
whole 4 KiB pages, with the set of pages changed since the last commit; memory and work follow the
pages that hold entries, not the virtual size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hvbackup.disks.lazymem import lazy_zeros
from hvbackup.errors import DiskFormatError
from hvbackup.units import MiB, TiB

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
MAX_VIRTUAL_SIZE = 64 * TiB
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
            raise DiskFormatError(f"block size {bs} is not a power of two between 1 MiB and 256 MiB",
                                  reason="vhdx.metadata.block-size")
        if lss not in (512, 4096):
            raise DiskFormatError(f"logical sector size {lss} is neither 512 nor 4096",
                                  reason="vhdx.metadata.logical-sector-size")
        if not 0 < self.virtual_size <= MAX_VIRTUAL_SIZE or self.virtual_size % lss:
            raise DiskFormatError(
                f"virtual disk size {self.virtual_size} is not a positive multiple of {lss} up to 64 TiB",
                reason="vhdx.metadata.virtual-size",
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
    """The BAT of an open file.

    The table is held whole (as many 4 KiB pages as the entries need, so bytes past the last entry
    are kept) in lazily committed memory, and ``pages_in_use`` marks the pages that may hold a
    non-zero entry: those read from the file with one, and those changed since. A page outside it is
    all zeros (every entry NOT_PRESENT), so whole-table checks and searches look at the pages in use
    alone and cost what is allocated, not what the virtual size would need.
    """

    def __init__(self, geometry: Geometry, file_offset: int):
        self.geometry = geometry
        self.file_offset = file_offset
        pages = self.page_bytes_needed(geometry) // PAGE
        self.table = lazy_zeros(pages * ENTRIES_PER_PAGE, "<u8")
        self.pages_in_use = np.zeros(pages, dtype=bool)
        self.dirty_pages: set[int] = set()

    @staticmethod
    def page_bytes_needed(geometry: Geometry) -> int:
        return -(-geometry.entry_count * ENTRY_SIZE // PAGE) * PAGE

    def load(self, at: int, data: bytes) -> None:
        """Take whole pages of the table as stored ``at`` bytes into it; all-zero pages stay unused."""
        rows = np.frombuffer(data, dtype="<u8").reshape(-1, ENTRIES_PER_PAGE)
        used = np.flatnonzero(rows.any(axis=1))
        pages = at // PAGE + used
        self._pages()[pages] = rows[used]
        self.pages_in_use[pages] = True

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
        page = index // ENTRIES_PER_PAGE
        self.dirty_pages.add(page)
        self.pages_in_use[page] = True

    # -- whole-table views ---------------------------------------------------------------------

    def _pages(self) -> np.ndarray:
        return self.table.reshape(-1, ENTRIES_PER_PAGE)

    def _entries_in_use(self, first: int = 0, end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices and values of the non-zero entries among [first, end) (every entry by default)."""
        end = self.geometry.entry_count if end is None else end
        if first >= end:
            return np.empty(0, np.int64), np.empty(0, np.uint64)
        low = first // ENTRIES_PER_PAGE
        pages = np.flatnonzero(self.pages_in_use[low:(end - 1) // ENTRIES_PER_PAGE + 1]) + low
        values = self._pages()[pages].ravel()
        index = (pages[:, None] * ENTRIES_PER_PAGE + np.arange(ENTRIES_PER_PAGE)).ravel()
        keep = (values != 0) & (index >= first) & (index < end)
        return index[keep], values[keep]

    def _is_bitmap(self, index: np.ndarray) -> np.ndarray:
        ratio = self.geometry.chunk_ratio
        return index % (ratio + 1) == ratio

    def payload_runs(self, first_block: int, end_block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Runs of blocks with one payload state covering [first_block, end_block), in order:
        (first blocks, end blocks, states). Blocks without an entry in use are NOT_PRESENT."""
        geo = self.geometry
        index, values = self._entries_in_use(geo.payload_index(first_block), geo.payload_index(end_block - 1) + 1)
        states = values & np.uint64(STATE_MASK)
        keep = (states != NOT_PRESENT) & ~self._is_bitmap(index)
        blocks, states = index[keep] - index[keep] // (geo.chunk_ratio + 1), states[keep].astype(np.int64)
        # A run of present entries ends where the next block is not the next one or its state differs.
        change = (np.diff(blocks) != 1) | (np.diff(states) != 0)
        heads = np.concatenate(([True], change))[:blocks.size]
        tails = np.concatenate((change, [True]))[:blocks.size]
        run_starts, run_ends, run_states = blocks[heads], blocks[tails] + 1, states[heads]
        # Interleave the NOT_PRESENT gaps: gap, run, gap, run, ..., gap; then drop empty ones.
        starts = np.empty(2 * run_starts.size + 1, np.int64)
        starts[0], starts[1::2], starts[2::2] = first_block, run_starts, run_ends
        ends = np.append(starts[1:], end_block)
        kinds = np.zeros(starts.size, np.int64)
        kinds[1::2] = run_states
        nonempty = ends > starts
        return starts[nonempty], ends[nonempty], kinds[nonempty]

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
        index, values = self._entries_in_use()
        is_bitmap = self._is_bitmap(index)
        offsets = (values >> np.uint64(OFFSET_SHIFT)).astype(np.int64) * MiB
        states = values & np.uint64(STATE_MASK)
        present = np.where(is_bitmap, states == SB_PRESENT, (states == FULLY_PRESENT) | (states == PARTIALLY_PRESENT))
        anchored = ~is_bitmap & np.isin(states, (UNDEFINED, UNMAPPED, UNMAPPED_V095)) & (offsets != 0)
        used = present | anchored
        lengths = np.where(is_bitmap[used], MiB, self.geometry.block_size)
        return offsets[used], lengths

    def validate(self) -> None:
        """Refuse states the file type does not allow and reserved bits (2.5.1). Only entries in use
        are looked at: a zero entry is NOT_PRESENT with no reserved bit, allowed everywhere."""
        geo = self.geometry
        index, values = self._entries_in_use()
        is_bitmap = self._is_bitmap(index)
        states = values & np.uint64(STATE_MASK)
        bad_reserved = np.flatnonzero(values & np.uint64(RESERVED_MASK))
        if bad_reserved.size:
            raise DiskFormatError(f"BAT entry {index[bad_reserved[0]]} has reserved bits set",
                                  reason="vhdx.bat.reserved-bits")
        allowed_payload = [NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, UNMAPPED_V095, FULLY_PRESENT]
        if geo.has_parent:
            allowed_payload.append(PARTIALLY_PRESENT)
        allowed_bitmap = [SB_NOT_PRESENT, SB_PRESENT] if geo.has_parent else [SB_NOT_PRESENT]
        bad = np.flatnonzero(np.where(is_bitmap, ~np.isin(states, allowed_bitmap), ~np.isin(states, allowed_payload)))
        if bad.size:
            i = int(bad[0])
            kind = "sector bitmap" if is_bitmap[i] else "payload"
            raise DiskFormatError(
                f"BAT entry {index[i]} ({kind}) has state {int(states[i])}, not allowed in a "
                f"{'differencing' if geo.has_parent else 'fixed or dynamic'} VHDX",
                reason="vhdx.bat.state",
            )
        if geo.has_parent:
            partial = index[~is_bitmap & (states == PARTIALLY_PRESENT)]
            chunks = partial // (geo.chunk_ratio + 1)
            bitmap_states = self.table[chunks * (geo.chunk_ratio + 1) + geo.chunk_ratio] & np.uint64(STATE_MASK)
            missing = chunks[bitmap_states != SB_PRESENT]
            if missing.size:
                raise DiskFormatError(f"chunk {missing[0]} has partially present blocks but no sector bitmap block",
                                      reason="vhdx.bat.missing-sector-bitmap")
