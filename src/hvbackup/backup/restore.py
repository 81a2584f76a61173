"""Bringing a restore point back: one disk into a file, or the whole VM into a host.

Every chunk is checked against its name before a byte of it is written, and the result is built
under a hidden name (or in the host's staging directory) and moved into place only when complete:
a restore that fails, or is killed, leaves nothing that looks restored.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from hvbackup import disks, stack, tracking
from hvbackup.backup.repository import Repository
from hvbackup.disks.fileio import sync_directory
from hvbackup.errors import RepositoryError
from hvbackup.host import Host
from hvbackup.host.model import DiskAttachment, VmConfig, check_vm_name, disk_instance_id, new_id
from hvbackup.host.vm import DISK_DIRECTORY, Vm

READ_AHEAD = 6
WRITEBACK = 64 << 20
Progress = Callable[[int, int], None]


def restore_disk(repo: Repository, point_id: str, index: int, target: str, *, format: str | None = None,
                 progress: Progress | None = None) -> dict:
    """Write disk ``index`` of the point to ``target`` (a new file), as a dynamic VHDX or VHD, or raw:
    ``format``, or the one the target's suffix names (``disks.format_for_path``)."""
    format = disks.format_for_path(target, format)
    if os.path.lexists(target):
        raise RepositoryError(f"{target} already exists: restore to a new file")
    point = repo.point(point_id)
    if not 0 <= index < len(point["disks"]):
        raise RepositoryError(f"point {point_id} has no disk {index} (it has {len(point['disks'])})")
    directory, name = os.path.split(os.path.abspath(target))
    temp = os.path.join(directory, f".{name}.restoring")
    _remove_leftovers(directory, name)
    try:
        written = _write_disk(repo, point, index, temp, format, progress)
        os.rename(temp, target)
        sync_directory(directory)
    except BaseException:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    return {"point_id": point_id, "disk": index, "path": os.path.abspath(target), "format": format,
            "virtual_size": point["disks"][index]["geometry"]["virtual_size"], "bytes_written": written}


def _remove_leftovers(directory: str, name: str) -> None:
    """What an interrupted restore to ``name`` left: its hidden file, and the disk layer's own
    temporary file for it (all hidden names that start with ``name.restoring``)."""
    for entry in os.listdir(directory):
        if entry.startswith(".") and entry.lstrip(".").startswith(f"{name}.restoring"):
            os.unlink(os.path.join(directory, entry))


def _stored_bytes(disk: dict, chunk: int) -> int:
    index, size = disk["chunks"], disk["geometry"]["virtual_size"]
    # Every stored slot is a whole chunk except, perhaps, the tail.
    tail = index.data_slots and index.slots[-1] == index.count - 1
    return index.data_slots * chunk - (chunk * index.count - size if tail else 0)


def _write_disk(repo: Repository, point: dict, index: int, path: str, format: str,
                progress: Progress | None) -> int:
    """Only stored chunks are written: a new disk reads as zeros. Each worker thread fetches,
    checks and writes its own chunks, so the copying into the file runs on every core; a VHDX's or
    VHD's writes take turns (they may allocate blocks), a raw file's need not."""
    disk = point["disks"][index]
    geometry, size = disk["geometry"], disk["geometry"]["virtual_size"]
    chunk = repo.chunk_size
    stored = ((slot * chunk, name) for slot, name in disk["chunks"].items())
    total = _stored_bytes(disk, chunk)
    options = {"block_size": geometry["block_size"], "logical_sector_size": geometry["logical_sector_size"],
               "physical_sector_size": geometry["physical_sector_size"]} if format == "vhdx" else {}
    with stack.create(path, size, format=format, **options) as target:
        meter = _WriteMeter(target, total, progress)
        turns = threading.Lock() if format != "raw" else contextlib.nullcontext()

        def restore_chunk(offset: int, name: str) -> None:
            data = repo.read_chunk(name)
            if len(data) != min(chunk, size - offset):
                raise RepositoryError(f"point {point['point_id']} disk {index}: the chunk at {offset} holds "
                                      f"{len(data)} bytes where {min(chunk, size - offset)} belong")
            with turns:
                target.write(offset, data)
            meter.add(len(data))

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
            pending = []
            for offset, name in stored:
                pending.append(pool.submit(restore_chunk, offset, name))
                if len(pending) >= READ_AHEAD:
                    pending.pop(0).result()
            for future in pending:
                future.result()
    return total


class _WriteMeter:
    """Progress, and write-back started every WRITEBACK bytes so the final flush has little left."""

    def __init__(self, target, total: int, progress: Progress | None):
        self.target, self.total, self.progress = target, total, progress
        self.done = self.since_flush = 0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
            self.since_flush += count
            flush, self.since_flush = self.since_flush >= WRITEBACK, self.since_flush % WRITEBACK
            if self.progress:
                self.progress(self.done, self.total)
        if flush:
            self.target.start_flush()


def restore_vm(repo: Repository, point_id: str, host: Host, *, name: str | None = None,
               progress: Progress | None = None) -> Vm:
    """Register the point's VM with ``host``, Off, its disks restored as tracked VHDX files. It keeps
    its ID unless the host already has a VM with that ID; ``name`` renames it."""
    point = repo.point(point_id)
    saved = VmConfig.from_dict(point["vm_config"])
    name = check_vm_name(saved.name if name is None else name)
    taken = {vm_id.lower() for vm_id in host.vm_ids()}  # damaged VMs' IDs too
    vm_id = new_id() if saved.vm_id.lower() in taken else saved.vm_id
    if any(vm.name == name for vm in host.vms()):
        raise RepositoryError(f"the host already has a VM named {name!r}: restore with --as NEW_NAME")
    total = sum(_stored_bytes(disk, repo.chunk_size) for disk in point["disks"])
    done_before = [0]

    def disk_progress(done: int, _total: int) -> None:
        if progress:
            progress(done_before[0] + done, total)

    def build(staging: str) -> VmConfig:
        attachments = []
        for index, attachment in enumerate(saved.disks):
            relative = os.path.join(DISK_DIRECTORY, f"{name}_disk{index}.vhdx")
            written = _write_disk(repo, point, index, os.path.join(staging, relative), "vhdx", disk_progress)
            done_before[0] += written
            tracking.enable(os.path.join(staging, relative))
            instance_id = attachment.instance_id if vm_id == saved.vm_id else disk_instance_id(vm_id, index)
            attachments.append(DiskAttachment(instance_id, [relative], attachment.controller, attachment.location))
        return VmConfig(vm_id, name, saved.processors, saved.memory_mb, saved.notes, attachments)

    return host.add_vm(vm_id, build, name=name)
