"""Merging a differencing disk into its parent and removing it (what deleting a checkpoint does).

For VHDX the parent's DataWriteGuid changes, so the child first records the parent's next
DataWriteGuid as ``parent_linkage2`` ([MS-VHDX] 2.6.2.6.3 note <12>): whenever the merge stops,
the child still opens against its parent, the chain still reads the same data, and running the
merge again finishes it.

A layer above the format that keeps records of the child (change tracking) passes ``hooks``: the
merge calls them at the points where those records must follow the data.
"""

from __future__ import annotations

import os
import uuid
from typing import Sequence

from hvbackup import disks
from hvbackup.disks.copy import Progress, copy_data, data_bytes, data_pieces
from hvbackup.disks.device import BlockDevice, Extent, ExtentState
from hvbackup.disks.fileio import remove_file, sync_directory
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.errors import DiskError


class MergeHooks:
    """The points of a merge where a layer above the format keeps its own records of the child in
    step with the data. Each does nothing here; a layer overrides the ones it needs."""

    def before_writes(self, child: BlockDevice, parent: BlockDevice, written: list[Extent]) -> None:
        """Before the first write into ``parent`` (open for writing, its next DataWriteGuid chosen if
        it is a VHDX); ``written`` are the child's own extents, which the merge is about to write."""

    def after_flush(self, parent: BlockDevice) -> None:
        """The child's data and metadata are durable in ``parent``; the child is still there."""

    def after_delete(self, child_path: str) -> None:
        """The child's file is deleted."""


def merge(child_path: str, *, progress: Progress | None = None, children: Sequence[str] = (),
          hooks: MergeHooks | None = None) -> str:
    """Fold ``child_path`` into its parent, delete it, and return the parent's path.

    ``children`` are VHDX disks whose parent is ``child_path`` (later checkpoints); before the child
    is deleted they are pointed at the parent, which then holds what the child showed them."""
    hooks = hooks or MergeHooks()
    with disks.open(child_path, read_only=True) as child:
        if child.parent is None:
            raise DiskError(f"{child_path}: not a differencing disk; there is nothing to merge into")
        parent_path = child.parent.path
        is_vhdx = isinstance(child, VhdxDisk)
        if is_vhdx:
            # A merge that stopped half way has already given the parent the child's linkage2.
            resumed = child.parent.data_write_guid != child.metadata.parent_locator.linkages[0]
            next_guid = child.parent.data_write_guid if resumed else uuid.uuid4()
    if is_vhdx and not resumed:
        with VhdxDisk.open(child_path) as child:
            child.add_parent_linkage2(next_guid)
    with disks.open(parent_path) as parent, disks.open(child_path, read_only=True) as child:
        own = [e for e in child.extents() if e.depth == 0]
        if is_vhdx:
            parent.set_next_data_write_guid(next_guid)
        hooks.before_writes(child, parent, own)
        for ext in own:
            if ext.state == ExtentState.ZERO:
                parent.trim(ext.offset, ext.length)
        copy_data(child, parent, data_pieces(own), skip_zeros=False, total=data_bytes(own), progress=progress)
        if is_vhdx:
            parent.adopt_virtual_disk_items(child.metadata)
        parent.flush()
        hooks.after_flush(parent)
        parent_guid = parent.data_write_guid if is_vhdx else None
    for grandchild in children:
        with VhdxDisk.open(grandchild) as disk:
            disk.set_parent(parent_path, parent_guid)
    remove_file(child_path)
    hooks.after_delete(child_path)
    sync_directory(os.path.dirname(os.path.abspath(child_path)))
    return parent_path
