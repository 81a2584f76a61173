"""The change map: for every granule of the virtual disk, the epoch of its last write.

Epoch ``k + 1`` holds the writes made after point ``k`` was sealed, so "what changed since point
``k``" is exactly the granules whose epoch is greater than ``k``: one comparison over a numpy array,
whatever number of points came before. Unwritten granules hold epoch 0.
"""

from __future__ import annotations

import numpy as np

from hvbackup.errors import TrackingError
from hvbackup.winerror import ERROR_INVALID_PARAMETER

MIN_GRANULARITY = 4096
MAX_GRANULARITY = 256 << 20
DEFAULT_GRANULARITY = 64 << 10
# Beyond this many granules the default granularity grows, so one map stays within 64 MiB of memory.
DEFAULT_MAX_GRANULES = 1 << 24
MAX_GRANULES = 1 << 26


def choose_granularity(size: int, requested: int | None) -> int:
    """The requested granularity, checked; or the default, grown for very large disks."""
    if requested is None:
        granularity = DEFAULT_GRANULARITY
        while -(-size // granularity) > DEFAULT_MAX_GRANULES:
            granularity *= 2
        return granularity
    if requested & (requested - 1) or not MIN_GRANULARITY <= requested <= MAX_GRANULARITY:
        raise TrackingError(ERROR_INVALID_PARAMETER,
                            f"tracking granularity {requested} is not a power of two from 4 KiB to 256 MiB")
    if -(-size // requested) > MAX_GRANULES:
        raise TrackingError(ERROR_INVALID_PARAMETER,
                            f"tracking granularity {requested} is too fine for a {size}-byte disk "
                            f"(at most {MAX_GRANULES} granules)")
    return requested


class ChangeMap:
    def __init__(self, size: int, granularity: int, epochs: np.ndarray | None = None):
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        count = -(-size // granularity)
        self.epochs = np.zeros(count, dtype=np.uint32) if epochs is None else epochs
        if self.epochs.shape != (count,):
            raise ValueError("the epoch array does not match the disk size")

    def stamp(self, offset: int, length: int, epoch: int) -> None:
        """Record a write (or trim) of [offset, offset+length) in ``epoch``."""
        first, last = offset >> self.shift, (offset + length - 1) >> self.shift
        if first == last:
            self.epochs[first] = epoch
        else:
            self.epochs[first:last + 1] = epoch

    def stamp_granules(self, first: int, end: int, epoch: int) -> None:
        """Record granules [first, end) as written in ``epoch`` unless a later write is recorded."""
        view = self.epochs[first:end]
        np.maximum(view, epoch, out=view)

    def newest(self) -> int:
        return int(self.epochs.max()) if len(self.epochs) else 0

    def changed_since(self, sequence: int, start: int, end: int, max_ranges: int) -> tuple[list[tuple[int, int]], int]:
        """Runs of granules written after point ``sequence`` that meet [start, end), clipped to it,
        at most ``max_ranges``; and the offset up to which the answer is complete."""
        shift = self.shift
        first, stop = start >> shift, -(-end // self.granularity)
        changed = np.flatnonzero(self.epochs[first:stop] > sequence)
        if not len(changed):
            return [], end
        # A run ends wherever the next changed granule is not the next granule.
        breaks = np.flatnonzero(np.diff(changed) != 1)
        run_starts = np.concatenate((changed[:1], changed[breaks + 1])) + first
        run_ends = np.concatenate((changed[breaks], changed[-1:])) + first + 1
        complete = end
        if len(run_starts) > max_ranges:
            run_starts, run_ends = run_starts[:max_ranges], run_ends[:max_ranges]
            complete = min(end, int(run_ends[-1]) << shift)
        lows = np.maximum(run_starts << shift, start)
        highs = np.minimum(run_ends << shift, end)
        return list(zip(lows.tolist(), (highs - lows).tolist())), complete
