"""Ranges of bits in packed sector bitmaps, in either bit order: [MS-VHDX] 2.4 puts sector 0 in the
least significant bit of byte 0 ("little"), the VHD specification in the most significant ("big").
numpy does the unpacking, so no Python loop runs per sector."""

from __future__ import annotations

import numpy as np


def _span(bits: np.ndarray, first: int, count: int, order: str) -> tuple[int, int, np.ndarray, int]:
    lo, hi = first // 8, -(-(first + count) // 8)
    return lo, hi, np.unpackbits(bits[lo:hi], bitorder=order), first - lo * 8


def runs(bits: np.ndarray, first: int, count: int, order: str) -> list[tuple[bool, int, int]]:
    """(set?, first bit, bit count) runs covering bits [first, first+count), in order."""
    _, _, unpacked, skip = _span(bits, first, count, order)
    values = unpacked[skip:skip + count]
    edges = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [count]))
    return [(bool(values[s]), first + int(s), int(e - s)) for s, e in zip(starts, ends)]


def set_range(bits: np.ndarray, first: int, count: int, order: str) -> bool:
    """Set bits [first, first+count); True if any of them was clear."""
    lo, hi, unpacked, skip = _span(bits, first, count, order)
    values = unpacked[skip:skip + count]
    if values.all():
        return False
    values[:] = 1
    bits[lo:hi] = np.packbits(unpacked, bitorder=order)
    return True
