"""The reader protocol: how a backup reads one disk of a recovery checkpoint, whatever the method.

A reader knows nothing of chunks: it gives the disk's ``geometry``, the byte ranges that changed
since a base reference point (``changes``) or the ones that hold data (``allocated``), and reads
bytes (``readinto``). The planner turns ranges into the repository's chunk slots. Each method is
one module of this package with an ``open_readers(vm, checkpoint, base, cancel)`` that returns one
reader per disk of the checkpoint: a new method (RSVD) is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Iterable, Protocol

from hvbackup.backup.geometry import Geometry
from hvbackup.disks.device import Extent, ExtentState
from hvbackup.host.model import Checkpoint, ReferencePoint
from hvbackup.host.vm import Vm

Range = tuple[int, int]  # (offset, length) in bytes

# Every module of this package is a method; virtdisk, the default, first.
METHODS = tuple(sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda name: name != "virtdisk"))

# Why a disk is read in full (``NeedsFull.reason``): stable codes, the message says it for people.
NO_BASE = "no-base"                          # no earlier point of the VM in this repository
FULL_ASKED = "full-asked"                    # the caller asked for a full backup
REFERENCE_POINT_GONE = "reference-point-gone"  # earlier points exist, but no reference point matches one
NEW_DISK = "new-disk"                        # the base point or reference point has no such disk
RESIZED = "resized"                          # the disk's size differs from the base point's
TRACKING_LOST = "tracking-lost"              # change tracking off, reset or unable to answer
CHANGED_OFFLINE = "changed-offline"          # the disk was written without tracking (ERROR_CTLOG_VHD_CHANGED_OFFLINE)
BASE_CHUNKS_LOST = "base-chunks-lost"        # a differential export cannot patch chunks the repository lost


class Reader(Protocol):
    """One disk of the checkpoint, open for reading."""

    geometry: Geometry
    # True: ``readinto`` anywhere gives the disk as it was at the checkpoint. False (a differential):
    # only inside the ranges ``changes`` returned; the rest is the base point's.
    whole: bool

    def changes(self, base: ReferencePoint | None) -> list[Range]:
        """The ranges written since ``base``, sorted and merged; NeedsFull when they cannot be had."""

    def allocated(self) -> list[Range]:
        """The ranges holding data, sorted and merged: what a full read reads (the rest is zeros)."""

    def readinto(self, offset: int, buffer) -> None:
        """Fill ``buffer`` with the disk's bytes at ``offset``."""

    def finish(self) -> None:
        """The backup is stored: let go of the disk."""

    def abandon(self) -> None:
        """The backup failed: let go of the disk and of anything made for reading it."""


class Opener(Protocol):
    def __call__(self, vm: Vm, checkpoint: Checkpoint, base: ReferencePoint | None,
                 cancel: threading.Event) -> list[Reader]: ...


def opener(method: str) -> Opener:
    """The ``open_readers`` of ``method`` (one of METHODS)."""
    return importlib.import_module(f"{__name__}.{method}").open_readers


def merged(ranges: Iterable[Range]) -> list[Range]:
    """``ranges`` sorted, touching and overlapping ones joined, empty ones dropped."""
    out: list[Range] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        if out and offset <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][1], offset + length - start))
        else:
            out.append((offset, length))
    return out


def data_ranges(extents: Iterable[Extent]) -> list[Range]:
    """The DATA extents as merged ranges."""
    return merged((e.offset, e.length) for e in extents if e.state == ExtentState.DATA)


def close_all(readers: Iterable[Reader], *, failed: bool) -> None:
    """``abandon`` (failed) or ``finish`` every reader, each even if another raised."""
    first: BaseException | None = None
    for reader in readers:
        try:
            if failed:
                reader.abandon()
            else:
                reader.finish()
        except BaseException as exc:  # noqa: PERF203 - each reader is let go of whatever the others do
            first = first or exc
    if first is not None:
        raise first
