"""Large arrays that start as zeros and take memory only where they are written.

A 64 TiB disk has a 256 MiB BAT at 2 MiB blocks and a change map of up to 64 MiB, both nearly all
zeros. Their arrays live in an anonymous private mapping: the kernel commits a page only when it is
first written, and reading an untouched page maps the shared zero page, which commits nothing.
Huge pages are declined, so one written entry commits 4 KiB rather than 2 MiB (numpy's own
allocator asks for huge pages on large arrays).
"""

from __future__ import annotations

import mmap

import numpy as np


def lazy_zeros(count: int, dtype) -> np.ndarray:
    """A writable array of ``count`` zeros whose memory is committed page by page as it is written."""
    dtype = np.dtype(dtype)
    mapping = mmap.mmap(-1, max(1, count * dtype.itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mapping, dtype=dtype, count=count)
