"""Comparing the virtual contents of two disks of any format, reading only where either holds data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from hvbackup import disks
from hvbackup.disks.copy import BUFFER, Progress
from hvbackup.disks.device import Extent, ExtentState


@dataclass(frozen=True)
class Comparison:
    identical: bool
    first_difference: int | None = None
    reason: str = ""


def compare(path_a: str, path_b: str, *, progress: Progress | None = None) -> Comparison:
    with disks.open(path_a, read_only=True) as a, disks.open(path_b, read_only=True) as b:
        if a.size != b.size:
            return Comparison(False, min(a.size, b.size), f"sizes differ: {a.size} and {b.size} bytes")
        ranges = list(_union(_data_ranges(a.extents()), _data_ranges(b.extents())))
        total = sum(end - start for start, end in ranges)
        done = 0
        left, right = np.empty(BUFFER, np.uint8), np.empty(BUFFER, np.uint8)
        for start, end in ranges:
            for pos in range(start, end, BUFFER):
                n = min(BUFFER, end - pos)
                a.readinto(pos, left[:n])
                b.readinto(pos, right[:n])
                if not np.array_equal(left[:n], right[:n]):
                    at = pos + int(np.argmax(left[:n] != right[:n]))
                    return Comparison(False, at, f"contents differ at offset {at}")
                done += n
                if progress:
                    progress(done, total)
    return Comparison(True)


def _data_ranges(extents: Iterable[Extent]) -> Iterator[tuple[int, int]]:
    for ext in extents:
        if ext.state == ExtentState.DATA:
            yield ext.offset, ext.end


def _union(first: Iterable[tuple[int, int]], second: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Sorted, merged union of two sorted lists of [start, end) ranges."""
    current = None
    for start, end in sorted([*first, *second]):
        if current and start <= current[1]:
            current = (current[0], max(current[1], end))
            continue
        if current:
            yield current
        current = (start, end)
    if current:
        yield current
