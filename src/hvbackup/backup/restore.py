"""Bringing a restore point back: one disk into a file, or the whole VM into a host.

Every chunk is checked against its name before a byte of it is written, and the result is built
under a hidden name (or in the host's staging directory) and moved into place only when complete:
a restore that fails, or is killed, leaves nothing that looks restored.
"""

from __future__ import annotations

import contextlib
import os
import threading

from hvbackup import disks, durable, stack, tracking
from hvbackup.backup.manifest import Disk, Manifest
from hvbackup.backup.repository import Repository
from hvbackup.errors import RepositoryError
from hvbackup.host import Host
from hvbackup.host.model import DiskAttachment, VmConfig, check_vm_name, disk_instance_id, new_id
from hvbackup.host.vm import DISK_DIRECTORY, Vm
from hvbackup.meter import ByteMeter, Report
from hvbackup.units import MiB
from hvbackup.workers import run_bounded

READ_AHEAD = 6
WORKERS = min(4, os.cpu_count() or 2)
WRITEBACK = 64 * MiB  # write-back is started every this many bytes, so the final flush has little left


def restore_disk(repo: Repository, point_id: str, index: int, target: str, *, format: str | None = None,
                 progress: Report | None = None) -> dict:
    """Write disk ``index`` of the point to ``target`` (a new file), as a dynamic VHDX or VHD, or raw:
    ``format``, or the one the target's suffix names (``disks.format_for_path``)."""
    format = disks.format_for_path(target, format)
    if os.path.lexists(target):
        raise RepositoryError(f"{target} already exists: restore to a new file")
    point = repo.point(point_id)
    if not 0 <= index < len(point.disks):
        raise RepositoryError(f"point {point_id} has no disk {index} (it has {len(point.disks)})")
    _remove_leftovers(os.path.abspath(target))
    with durable.built_in_place(target, "restoring", replace=False) as temp:
        written = _write_disk(repo, point, index, temp, format, progress)
    return {"point_id": point_id, "disk": index, "path": os.path.abspath(target), "format": format,
            "virtual_size": point.disks[index].geometry.virtual_size, "bytes_written": written}


def _remove_leftovers(target: str) -> None:
    """What an interrupted restore to ``target`` left: its staged file, and the disk layer's staged
    file of that one."""
    directory, name = os.path.split(target)
    durable.sweep(directory, name)
    durable.sweep(directory, os.path.basename(durable.hidden(target, "restoring")))


def _stored_bytes(disk: Disk, chunk: int) -> int:
    index, size = disk.chunks, disk.geometry.virtual_size
    # Every stored slot is a whole chunk except, perhaps, the tail.
    tail = index.data_slots and index.slots[-1] == index.count - 1
    return index.data_slots * chunk - (chunk * index.count - size if tail else 0)


def _write_disk(repo: Repository, point: Manifest, index: int, path: str, format: str,
                progress: Report | None) -> int:
    """Only stored chunks are written: a new disk reads as zeros. Each worker thread fetches,
    checks and writes its own chunks, so the copying into the file runs on every core; a VHDX's or
    VHD's writes take turns (they may allocate blocks), a raw file's need not."""
    disk = point.disks[index]
    geometry, size = disk.geometry, disk.geometry.virtual_size
    chunk = repo.chunk_size
    stored = ((slot * chunk, name) for slot, name in disk.chunks.items())
    total = _stored_bytes(disk, chunk)
    options = {"block_size": geometry.block_size, "logical_sector_size": geometry.logical_sector_size,
               "physical_sector_size": geometry.physical_sector_size} if format == "vhdx" else {}
    with stack.create(path, size, format=format, **options) as target:
        meter = ByteMeter(_with_writeback(target, progress), total=total)
        turns = threading.Lock() if format != "raw" else contextlib.nullcontext()

        def restore_chunk(stored_chunk: tuple[int, str]) -> None:
            offset, name = stored_chunk
            data = repo.read_chunk(name)
            if len(data) != min(chunk, size - offset):
                raise RepositoryError(f"point {point.point_id} disk {index}: the chunk at {offset} holds "
                                      f"{len(data)} bytes where {min(chunk, size - offset)} belong")
            with turns:
                target.write(offset, data)
            meter.add(len(data))

        run_bounded(restore_chunk, stored, workers=WORKERS, ahead=READ_AHEAD)
    return total


def _with_writeback(target, progress: Report | None) -> Report:
    """A meter's report that also starts write-back each time another WRITEBACK bytes are done."""
    started = [0]

    def report(done: int, total: int) -> None:
        if done - started[0] >= WRITEBACK:
            started[0] = done - done % WRITEBACK
            target.start_flush()
        if progress:
            progress(done, total)

    return report


def restore_vm(repo: Repository, point_id: str, host: Host, *, name: str | None = None,
               progress: Report | None = None) -> Vm:
    """Register the point's VM with ``host``, Off, its disks restored as tracked VHDX files. It keeps
    its ID unless the host already has a VM with that ID; ``name`` renames it."""
    point = repo.point(point_id)
    saved = VmConfig.from_dict(point.vm_config)
    name = check_vm_name(saved.name if name is None else name)
    taken = {vm_id.lower() for vm_id in host.vm_ids()}  # damaged VMs' IDs too
    vm_id = new_id() if saved.vm_id.lower() in taken else saved.vm_id
    if any(vm.name == name for vm in host.vms()):
        raise RepositoryError(f"the host already has a VM named {name!r}: restore with --as NEW_NAME")
    total = sum(_stored_bytes(disk, repo.chunk_size) for disk in point.disks)
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
