"""Moving data between block devices in large buffers, guided by extents.

Reads run one buffer ahead of writes on a helper thread, so file reads overlap the zero check and
the writes (all release the GIL). Every 64 MiB written, the destination is asked to start writing
back, so storage works while the copy goes on and the final flush waits for little.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from hvbackup.disks.device import BlockDevice, Extent, ExtentState
from hvbackup.disks.fileio import MiB, is_zero

BUFFER = 4 * MiB
WRITE_BEHIND = 64 * MiB  # start writing back to storage after every this many bytes
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


def data_pieces(extents: Iterable[Extent], step: int = BUFFER) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most ``step`` bytes covering the DATA extents, aligned to
    ``step`` so that pieces line up with destination blocks."""
    for ext in extents:
        if ext.state != ExtentState.DATA:
            continue
        pos = ext.offset
        while pos < ext.end:
            stop = min(ext.end, (pos // step + 1) * step)
            yield pos, stop - pos
            pos = stop


def data_bytes(extents: Iterable[Extent]) -> int:
    return sum(e.length for e in extents if e.state == ExtentState.DATA)


def copy_data(
    src: BlockDevice,
    dst: BlockDevice,
    pieces: Iterable[tuple[int, int]],
    *,
    skip_zeros: bool,
    total: int = 0,
    progress: Progress | None = None,
) -> None:
    """Copy each (offset, length) piece from ``src`` to the same offset of ``dst``. With
    ``skip_zeros`` a piece of zeros is not written (the destination already reads zeros there)."""
    buffers = [bytearray(BUFFER), bytearray(BUFFER)]
    done = written = 0

    def store(pending) -> None:
        nonlocal done, written
        offset, length, future = pending
        view = future.result()
        if not (skip_zeros and is_zero(view)):
            dst.write(offset, view)
            written += length
            if written % WRITE_BEHIND < length:
                dst.start_flush()
        done += length
        if progress:
            progress(done, total)

    def load(index: int, offset: int, length: int) -> memoryview:
        view = memoryview(buffers[index])[:length]
        src.readinto(offset, view)
        return view

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = None
        turn = 0
        for offset, length in pieces:
            upcoming = (offset, length, reader.submit(load, turn, offset, length))
            turn ^= 1
            if pending:
                store(pending)
            pending = upcoming
        if pending:
            store(pending)
