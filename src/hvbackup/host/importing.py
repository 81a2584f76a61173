"""Msvm_VirtualSystemManagementService.ImportSystemDefinition and RealizePlannedSystem: an exported VM
(``export.py``) made a VM of the host again.

ImportSystemDefinition reads the .vmcx and checks that every disk it names opens from the export's
``Virtual Hard Disks`` directory — a full copy, or a differential whose parent (the previous export's
disk, found by its parent locator or next to the differential) is there and unchanged — and returns a
planned system (Msvm_PlannedComputerSystem). RealizePlannedSystem copies each disk, its chain
flattened, into a new VM directory as a tracked VHDX and registers the VM, Off, under the exported ID
or, when asked, a new one. The VM directory is built under a ``.partial`` name and renamed into place;
a failure or an interruption removes it.

A definition file may carry anything: its configuration's shape, its VM ID and its VM name (or the
name the VM is imported under) are checked before anything is made from them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from hvbackup import disks, stack, tracking
from hvbackup.errors import DiskError, HostError
from hvbackup.host.document import DocumentProblem, check_config
from hvbackup.host.export import CONFIG_DIRECTORY, DEFINITION_FORMAT, DEFINITION_VERSION
from hvbackup.host.host import Host
from hvbackup.host.model import DiskAttachment, VmConfig, check_vm_id, check_vm_name, disk_instance_id, new_id
from hvbackup.host.returns import INVALID_PARAMETER
from hvbackup.host.vm import DISK_DIRECTORY, Vm
from hvbackup.units import MiB

MAX_DEFINITION = 16 * MiB


@dataclass
class PlannedSystem:
    """Msvm_PlannedComputerSystem: an imported definition, checked, not yet a VM of the host.
    ``config.name`` may still be changed; realizing checks it again."""

    host: Host
    definition_file: str
    vm_id: str
    config: VmConfig       # as exported: disk chains name the exported files
    disk_paths: list[str]  # per disk, the exported file on top of its chain
    new_identifier: bool


def import_system_definition(host: Host, definition_file: str, snapshot_folder: str | None = None,
                             generate_new_identifier: bool = False, *, name: str | None = None) -> PlannedSystem:
    """Read and check an exported .vmcx. Exports made here hold no checkpoints of their own (the
    exported checkpoint is the VM), so ``snapshot_folder``, if given, must only be a directory.
    ``name`` (hvbackup's own) imports the VM under that name instead of the exported one."""
    if snapshot_folder is not None and not os.path.isdir(snapshot_folder):
        raise HostError(f"SnapshotFolder {snapshot_folder} is not a directory", INVALID_PARAMETER)
    definition = _read_definition(definition_file)
    try:
        check_config(definition.get("configuration"), "configuration")
        if "virtual_system_identifier" not in definition:
            raise DocumentProblem("it names no virtual_system_identifier")
    except DocumentProblem as exc:
        raise HostError(f"{definition_file}: not an exported VM definition: {exc}", INVALID_PARAMETER) from None
    config = VmConfig.from_dict(definition["configuration"])
    vm_id = new_id() if generate_new_identifier else _from_file(definition_file, check_vm_id,
                                                               definition["virtual_system_identifier"])
    config.name = check_vm_name(name) if name is not None else _from_file(definition_file, check_vm_name, config.name)
    export_root = os.path.dirname(os.path.dirname(os.path.abspath(definition_file)))
    disk_paths = [_exported_disk(export_root, attachment.active) for attachment in config.disks]
    planned = PlannedSystem(host, os.path.abspath(definition_file), vm_id, config, disk_paths, generate_new_identifier)
    _check_free(planned, names=False)  # the name may still change before the VM is realized
    return planned


def _from_file(definition_file: str, check, value: object) -> str:
    """An ID or name the definition carries, checked; the error says which file and what to do."""
    try:
        return check(value)
    except HostError as exc:
        raise HostError(f"{definition_file}: {exc} (import it with a new identifier or under another name)",
                        INVALID_PARAMETER) from None


def _read_definition(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            definition = json.loads(f.read(MAX_DEFINITION))
    except FileNotFoundError:
        raise HostError(f"{path}: no such definition file", INVALID_PARAMETER) from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for json
        raise HostError(f"{path}: unreadable definition file: {exc}", INVALID_PARAMETER) from None
    if (not isinstance(definition, dict) or definition.get("format") != DEFINITION_FORMAT
            or definition.get("version") != DEFINITION_VERSION):
        raise HostError(f"{path}: not a version {DEFINITION_VERSION} hvbackup VM definition", INVALID_PARAMETER)
    if os.path.basename(os.path.dirname(os.path.abspath(path))) != CONFIG_DIRECTORY:
        raise HostError(f"{path}: a definition file lies in the export's {CONFIG_DIRECTORY!r} directory",
                        INVALID_PARAMETER)
    return definition


def _exported_disk(export_root: str, name: str) -> str:
    """The disk ``name`` of the export, opened once with its parents to prove the chain is whole."""
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise HostError(f"the definition names a disk file {name!r} outside {DISK_DIRECTORY!r}", INVALID_PARAMETER)
    path = os.path.join(export_root, DISK_DIRECTORY, name)
    if not os.path.isfile(path):
        raise HostError(f"{path}: the exported disk is missing", INVALID_PARAMETER)
    try:
        stack.open(path, read_only=True).close()
    except DiskError as exc:
        raise HostError(f"{path}: the exported disk cannot be used: {exc} (a differential needs the "
                        "export it was taken against)", INVALID_PARAMETER) from None
    return path


def _check_free(planned: PlannedSystem, *, names: bool = True) -> None:
    host = planned.host
    for vm in host.vms():
        if vm.vm_id.lower() == planned.vm_id.lower():
            raise HostError(f"the host already has a VM with ID {planned.vm_id} ({vm.name}); import with a new "
                            "identifier", INVALID_PARAMETER)
        if names and vm.name == planned.config.name:
            raise HostError(f"the host already has a VM named {vm.name!r}; rename or remove it before importing",
                            INVALID_PARAMETER)


def realize_planned_system(planned: PlannedSystem) -> Vm:
    """RealizePlannedSystem: copy the disks (chains flattened) into a new VM directory as tracked
    VHDX files and register the VM, Off."""
    host, name = planned.host, planned.config.name  # add_vm checks the name before making a file
    with host.lock.held():
        _check_free(planned)
        return host.add_vm(planned.vm_id, lambda staging: _copy_disks(planned, name, staging), name=name)


def _copy_disks(planned: PlannedSystem, name: str, staging: str) -> VmConfig:
    """Copy the disks into ``staging`` and return the configuration of the VM ``name`` they belong to."""
    config = planned.config
    attachments = []
    for index, (attachment, source) in enumerate(zip(config.disks, planned.disk_paths)):
        relative = os.path.join(DISK_DIRECTORY, f"{name}_disk{index}.vhdx")
        try:
            disks.convert(source, os.path.join(staging, relative))
        except DiskError as exc:
            raise HostError(f"importing {source}: {exc}") from None
        tracking.enable(os.path.join(staging, relative))
        # A disk's instance ID embeds the VM's ID; a new VM gets new ones.
        instance_id = disk_instance_id(planned.vm_id, index) if planned.new_identifier else attachment.instance_id
        attachments.append(DiskAttachment(instance_id, [relative], attachment.controller, attachment.location))
    return VmConfig(planned.vm_id, name, config.processors, config.memory_mb, config.notes, attachments)
