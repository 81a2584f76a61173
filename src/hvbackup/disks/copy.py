"""Moving data between block devices in large buffers, guided by extents.

Two reader threads read and zero-check up to four pieces ahead of the writes, so reading, checking
and writing overlap (file I/O and numpy release the GIL); writes stay in order. Every 64 MiB
written, the destination is asked to start writing back, so storage works while the copy goes on
and the final flush waits for little.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from hvbackup.disks.device import BlockDevice, Extent, ExtentState
from hvbackup.disks.fileio import is_zero
from hvbackup.units import MiB
from hvbackup.workers import bounded_map

BUFFER = 4 * MiB
READ_AHEAD = 4           # buffers in flight: pieces read (and zero-checked) ahead of the writes
READERS = 2
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
    buffers = [memoryview(bytearray(BUFFER)) for _ in range(READ_AHEAD)]
    done = written = 0

    def load(piece: tuple[memoryview, int, int]) -> tuple[int, int, memoryview, bool]:
        buffer, offset, length = piece
        view = buffer[:length]
        src.readinto(offset, view)
        return offset, length, view, skip_zeros and is_zero(view)

    # bounded_map submits the piece that reuses a buffer only after the one before it was written.
    with_buffers = ((buffers[i % READ_AHEAD], offset, length) for i, (offset, length) in enumerate(pieces))
    for offset, length, view, zeros in bounded_map(load, with_buffers, workers=READERS, ahead=READ_AHEAD):
        if not zeros:
            dst.write(offset, view)
            written += length
            if written % WRITE_BEHIND < length:
                dst.start_flush()
        done += length
        if progress:
            progress(done, total)
