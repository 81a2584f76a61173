"""The change map: for every granule of the virtual disk, the epoch of its last write.

Epoch ``k + 1`` holds the writes made after point ``k`` was sealed, so "what changed since point
``k``" is exactly the granules whose epoch is greater than ``k``: one comparison over a numpy array,
whatever number of points came before. Unwritten granules hold epoch 0.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from hvbackup.disks.lazymem import lazy_zeros
from hvbackup.errors import TrackingError
from hvbackup.units import KiB, MiB
from hvbackup.winerror import ERROR_INVALID_PARAMETER

MIN_GRANULARITY = 4 * KiB
MAX_GRANULARITY = 256 * MiB
DEFAULT_GRANULARITY = 64 * KiB
# Beyond this many granules the default granularity grows, so one map stays within 64 MiB of memory.
DEFAULT_MAX_GRANULES = 1 << 24
MAX_GRANULES = 1 << 26
WINDOW = 1 << 20  # granules examined at once by whole-map passes: 4 MiB of map, 1 MiB of flags


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
    """The epoch array, in lazily committed memory: a mostly unwritten map takes memory only where
    it was written, and every pass over it goes window by window, so no temporary array is larger
    than a window whatever the number of granules (at most 2^24 by default, 2^26 if chosen)."""

    def __init__(self, size: int, granularity: int, epochs: np.ndarray | None = None):
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        count = -(-size // granularity)
        self.epochs = lazy_zeros(count, np.uint32) if epochs is None else epochs
        if self.epochs.shape != (count,):
            raise ValueError("the epoch array does not match the disk size")

    def windows(self, first: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
        """[low, high) granule windows covering [first, stop) (the whole map by default)."""
        stop = len(self.epochs) if stop is None else stop
        for low in range(first, stop, WINDOW):
            yield low, min(stop, low + WINDOW)

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

    def changed_since(self, sequence: int, start: int, end: int, max_ranges: int) -> tuple[list[tuple[int, int]], int]:
        """Runs of granules written after point ``sequence`` that meet [start, end), clipped to it,
        at most ``max_ranges``; and the offset up to which the answer is complete."""
        shift = self.shift
        first, stop = start >> shift, -(-end // self.granularity)
        # Granules where "changed" flips, window by window: run starts and ends, alternately. Only
        # these are kept, and the walk stops once a run beyond max_ranges has begun.
        flips, count, inside = [], 0, False
        for low, high in self.windows(first, stop):
            changed = self.epochs[low:high] > sequence
            found = np.flatnonzero(changed[1:] != changed[:-1]) + (low + 1)
            if changed[0] != inside:
                found = np.concatenate(([low], found))
            flips.append(found)
            count += len(found)
            inside = bool(changed[-1])
            if count > 2 * max_ranges:
                break
        edges = np.concatenate([np.empty(0, np.int64), *flips])
        if inside:
            edges = np.append(edges, stop)
        run_starts, run_ends = edges[0::2], edges[1::2]
        if not len(run_starts):
            return [], end
        complete = end
        if len(run_starts) > max_ranges:
            run_starts, run_ends = run_starts[:max_ranges], run_ends[:max_ranges]
            complete = min(end, int(run_ends[-1]) << shift)
        lows = np.maximum(run_starts << shift, start)
        highs = np.minimum(run_ends << shift, end)
        return list(zip(lows.tolist(), (highs - lows).tolist())), complete

    def runs(self, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The runs of equal epochs — where each starts, and its epoch — or None if there are more
        than ``limit`` (counted first, so a fragmented map never builds a long list)."""
        epochs = self.epochs

        def edges(low: int, high: int) -> np.ndarray:
            return epochs[low:high] != epochs[low - 1:high - 1]

        if 1 + sum(int(np.count_nonzero(edges(low, high))) for low, high in self.windows(1)) > limit:
            return None
        starts = np.concatenate([np.zeros(1, np.int64)] + [
            np.flatnonzero(edges(low, high)) + low for low, high in self.windows(1)
        ])
        return starts, epochs[starts]

    def fill_runs(self, starts: np.ndarray, values: np.ndarray) -> None:
        """Set the map, all zeros so far, from its runs (ascending ``starts``, the first 0): only the
        granules of runs with a non-zero epoch are written, window by window."""
        nonzero = np.flatnonzero(values)
        ends = np.append(starts[1:], len(self.epochs))[nonzero].astype(np.int64)
        starts, values = starts[nonzero].astype(np.int64), values[nonzero]
        for low, high in self.windows():
            inside = slice(np.searchsorted(ends, low, "right"), np.searchsorted(starts, high, "left"))
            lows, highs = np.maximum(starts[inside], low), np.minimum(ends[inside], high)
            lengths = highs - lows
            if not lengths.size:
                continue
            # Granule numbers of every run in the window: each run's first, counted on by one.
            before = np.cumsum(lengths) - lengths
            granules = np.repeat(lows - before, lengths) + np.arange(int(lengths.sum()))
            self.epochs[granules] = np.repeat(values[inside], lengths)
