"""VHD spec "Block Allocation Table and Data Blocks".

One big-endian u32 per block: the sector number where the block (sector bitmap, then data) starts, or
0xFFFFFFFF when the block is not in this file. The table stays in memory as a numpy '>u4' array; a
caller changes entries and writes back the span it changed.
"""

from __future__ import annotations

import numpy as np

from hvbackup.disks.fileio import read_exact
from hvbackup.disks.vhd.dynamic_header import DynamicHeader
from hvbackup.errors import DiskFormatError

UNALLOCATED = 0xFFFFFFFF
SECTOR = 512
MAX_ENTRIES = 1 << 24  # 64 MiB of table in memory: 32 TiB of disk at the default 2 MiB blocks


class Bat:
    def __init__(self, entries: np.ndarray, header: DynamicHeader):
        self.entries = entries
        self.table_offset = header.table_offset
        self.block_size = header.block_size
        self.bitmap_size = header.bitmap_size

    @classmethod
    def read(cls, fd: int, header: DynamicHeader, disk_size: int) -> Bat:
        """Read the entries the disk uses (the table may declare more; those are never touched)."""
        count = -(-disk_size // header.block_size)
        if count > MAX_ENTRIES:
            raise DiskFormatError(f"a disk of {count} blocks needs a BAT larger than the {MAX_ENTRIES} entries allowed",
                                  reason="vhd.bat.too-large")
        raw = read_exact(fd, 4 * count, header.table_offset, "BAT")
        return cls(np.frombuffer(raw, dtype=">u4").copy(), header)

    @property
    def block_stride(self) -> int:
        """File bytes one block occupies: bitmap and data."""
        return self.bitmap_size + self.block_size

    def location(self, block: int) -> int | None:
        """File offset of the block's sector bitmap, or None if the block is not in this file."""
        value = int(self.entries[block])
        return None if value == UNALLOCATED else value * SECTOR

    def allocated_starts(self) -> np.ndarray:
        found = self.entries[self.entries != UNALLOCATED]
        return found.astype(np.int64) * SECTOR

    def check_layout(self, structures: list[tuple[int, int, str]], data_end: int) -> None:
        """Every block lies inside the file (before ``data_end``), and no block overlaps another block
        or one of the fixed ``structures`` (offset, length, name)."""
        starts = self.allocated_starts()
        stride = self.block_stride
        if starts.size:
            beyond = np.flatnonzero(starts + stride > data_end)
            if beyond.size:
                raise DiskFormatError(
                    f"a BAT entry points past the end of the file: block at {int(starts[beyond[0]]):#x} "
                    f"needs {stride} bytes, data ends at {data_end:#x}",
                    reason="vhd.bat.entry-beyond-file",
                )
        all_starts = np.concatenate((starts, np.array([s[0] for s in structures], dtype=np.int64)))
        all_ends = np.concatenate((starts + stride, np.array([s[0] + s[1] for s in structures], dtype=np.int64)))
        order = np.argsort(all_starts, kind="stable")
        clash = np.flatnonzero(all_ends[order][:-1] > all_starts[order][1:])
        if clash.size:
            first, second = (int(i) for i in order[clash[0]:clash[0] + 2])

            def name(i: int) -> str:
                return "a block" if i < starts.size else f"the {structures[i - starts.size][2]}"

            raise DiskFormatError(
                f"structures overlap in the file: {name(first)} at {int(all_starts[first]):#x} and "
                f"{name(second)} at {int(all_starts[second]):#x}",
                reason="vhd.bat.overlap",
            )

    def end_of_blocks(self) -> int:
        starts = self.allocated_starts()
        return int(starts.max()) + self.block_stride if starts.size else 0

    def assign(self, blocks: list[int], locations: list[int]) -> tuple[int, bytes]:
        """Point ``blocks`` (ascending) at ``locations``; returns the (file offset, bytes) span of the
        table to write."""
        for block, location in zip(blocks, locations):
            self.entries[block] = location // SECTOR
        lo, hi = blocks[0], blocks[-1] + 1
        return self.table_offset + 4 * lo, self.entries[lo:hi].tobytes()
