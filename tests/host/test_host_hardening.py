"""The host against hostile input and interruptions: VM names and IDs that would become paths,
damaged VM documents, files changed underneath the host, exceptions at any point of an operation,
file system failures, the per-VM exclusive lock and reference point names."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from hvbackup import stack
from hvbackup.errors import HostError
from hvbackup.host import SNAPSHOT_TYPE_RECOVERY, DamagedVm, Host, Vm, checkpoints, ownership, recovery, refpoints
from hvbackup.host import export as export_module
from hvbackup.host import importing as importing_module
from hvbackup.host.export import export_system_definition
from hvbackup.host.importing import import_system_definition, realize_planned_system
from hvbackup.host.jobs import JobState
from hvbackup.host.model import ExportSettings, VmConfig, check_vm_id, check_vm_name
from hvbackup.host.returns import ACCESS_DENIED, FAILED, INVALID_PARAMETER, INVALID_STATE, SYSTEM_IN_USE
from hvbackup.host.services import VirtualSystemManagementService, VirtualSystemSnapshotService
from hvbackup.units import MiB


def tree(path) -> dict[str, str | None]:
    """Every file (a hash of its bytes) and directory (None) under ``path``: a state to compare."""
    found: dict[str, str | None] = {}
    for directory, subdirectories, files in os.walk(path):
        for name in subdirectories:
            found[os.path.relpath(os.path.join(directory, name), path)] = None
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                found[os.path.relpath(os.path.join(directory, name), path)] = hashlib.sha256(f.read()).hexdigest()
    return found


def code_of(call, *args, **kwargs) -> int:
    with pytest.raises(HostError) as info:
        call(*args, **kwargs)
    return info.value.return_value


class Interrupt(KeyboardInterrupt):
    """What a test raises inside an operation, as Ctrl-C or a SIGTERM handler would."""


def interrupt_on_call(monkeypatch, owner, name: str, after: int = 0, matching: str = ""):
    """Make ``owner.name`` raise Interrupt at its call number ``after`` (0: the first) among those
    whose first argument contains ``matching``; every other call goes through."""
    real = getattr(owner, name)
    calls = []

    def fake(*args, **kwargs):
        if matching in str(args[0] if args else ""):
            calls.append(1)
            if len(calls) == after + 1:
                raise Interrupt()
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, fake)
    return calls


@pytest.fixture
def web(host):
    vm = host.create_vm("web", [16 * MiB, 8 * MiB])
    vm.request_state_change("start")
    vm.disk(0).write(0, b"A" * MiB)
    yield vm
    vm.close_disks()


# -- 1. names that become paths ------------------------------------------------------------------

BAD_NAMES = ["../../../../escaped", "a/b", "a\\b", "", ".", "..", ".hidden", "nul\0byte", "tab\there", "del\x7f",
             " leading", "trailing ", "x" * 101, "é" * 80, "12345678-9ABC-DEF0-1234-56789ABCDEF0", "\udcff", 7, None]


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_a_bad_vm_name_is_refused_before_any_file_is_made(host, tmp_path, name):
    before = tree(tmp_path)
    with pytest.raises(HostError, match="cannot be a VM name") as info:
        host.create_vm(name, [MiB])
    assert info.value.return_value == INVALID_PARAMETER and "a VM name is 1 to 100 characters" in str(info.value)
    built = []
    with pytest.raises(HostError, match="cannot be a VM name"):
        host.add_vm(checkpoints.new_id(), lambda staging: built.append(staging), name=name)
    assert built == [] and tree(tmp_path) == before
    answer, error = VirtualSystemManagementService(host).define_system(name, [MiB])
    assert answer == INVALID_PARAMETER and error.error_code == INVALID_PARAMETER


@pytest.mark.parametrize("name", ["web", "a b", "Ünïcødé 名前", "x" * 100, "é" * 75, "db:prod (2)", "-dash"])
def test_good_vm_names_pass(host, name):
    assert check_vm_name(name) == name
    vm = host.create_vm(name, [MiB])
    assert host.vm(name).vm_id == vm.vm_id and os.path.isfile(vm.path_of(vm.config.disks[0].active))


def test_vm_ids_that_would_be_paths_are_refused(host, tmp_path):
    before = tree(tmp_path)
    for bad in ["../../x", "web", "", "12345678-9ABC-DEF0-1234-56789ABCDEF0/..", 5]:
        assert code_of(host.create_vm, "web", [MiB], vm_id=bad) == INVALID_PARAMETER
        assert code_of(host.add_vm, bad, lambda staging: None, name="web") == INVALID_PARAMETER
    assert tree(tmp_path) == before
    assert check_vm_id("12345678-9abc-def0-1234-56789abcdef0") == "12345678-9ABC-DEF0-1234-56789ABCDEF0"


def test_add_vm_refuses_a_build_of_another_vm_and_a_taken_directory(host):
    vm = host.create_vm("web", [MiB])
    with pytest.raises(HostError, match="already has a VM directory"):
        host.add_vm(vm.vm_id, lambda staging: VmConfig(vm.vm_id, "other"), name="other")
    other_id = checkpoints.new_id()
    with pytest.raises(HostError, match="not 'other'"):
        host.add_vm(other_id, lambda staging: VmConfig(other_id, "sneaky"), name="other")
    with pytest.raises(HostError, match="invalid configuration") as info:
        host.add_vm(other_id, lambda staging: VmConfig(other_id, "other", processors="two"), name="other")
    assert info.value.return_value == INVALID_PARAMETER
    assert os.listdir(host.vms_directory) == [vm.vm_id]


def _definition_with(definition_file: str, **changes) -> None:
    with open(definition_file) as f:
        definition = json.load(f)
    for key, value in changes.items():
        if key == "name":
            definition["configuration"]["name"] = value
        else:
            definition[key] = value
    with open(definition_file, "w") as f:
        json.dump(definition, f)


def test_import_checks_the_name_and_id_a_definition_carries(host, web, tmp_path):
    checkpoint = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    exported = export_system_definition(web, str(tmp_path / "export"), ExportSettings(
        snapshot_virtual_system=checkpoint.instance_id))
    definition = exported["definition_file"]
    other = Host.init(str(tmp_path / "other"))
    before = tree(tmp_path / "other")

    _definition_with(definition, name="../../../../escaped")
    with pytest.raises(HostError, match="cannot be a VM name") as info:
        import_system_definition(other, definition)
    assert info.value.return_value == INVALID_PARAMETER and definition in str(info.value)
    with pytest.raises(HostError, match="cannot be a VM name"):
        import_system_definition(other, definition, name="a/b")
    planned = import_system_definition(other, definition, name="renamed")
    planned.config.name = "../../../escaped-again"  # changed on the planned VM, as a CLI may
    assert code_of(realize_planned_system, planned) == INVALID_PARAMETER
    assert tree(tmp_path / "other") == before
    planned.config.name = "renamed"
    assert realize_planned_system(planned).name == "renamed"

    _definition_with(definition, name="web", virtual_system_identifier="../../../x")
    with pytest.raises(HostError, match="not a VM ID"):
        import_system_definition(Host.init(str(tmp_path / "third")), definition)
    planned = import_system_definition(Host.init(str(tmp_path / "fourth")), definition, generate_new_identifier=True)
    assert realize_planned_system(planned).name == "web"

    _definition_with(definition, configuration={"name": "web", "disks": "many"})
    with pytest.raises(HostError, match="not an exported VM definition") as info:
        import_system_definition(Host.init(str(tmp_path / "fifth")), definition)
    assert info.value.return_value == INVALID_PARAMETER
    answer, error = VirtualSystemManagementService(other).import_system_definition(definition, name="x/y")
    assert answer == INVALID_PARAMETER and "cannot be a VM name" in error.description


def _set_name_in_document(vm: Vm, name: str) -> None:
    """A VM named before the rule existed (or by hand): its document is still sound."""
    with open(vm.document_path) as f:
        document = json.load(f)
    document["config"]["name"] = name
    with open(vm.document_path, "w") as f:
        json.dump(document, f)


def test_export_never_makes_a_directory_from_a_bad_vm_name(host, web, tmp_path):
    checkpoint = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    _set_name_in_document(web, "../../escaped")
    settings = ExportSettings(snapshot_virtual_system=checkpoint.instance_id)
    with pytest.raises(HostError, match="CreateVmExportSubdirectory") as info:
        export_system_definition(web, str(tmp_path / "export"), settings)
    assert info.value.return_value == INVALID_PARAMETER
    answer, error = VirtualSystemManagementService(host).export_system_definition(web, str(tmp_path / "export"),
                                                                                   settings)
    assert answer == INVALID_PARAMETER and "cannot be a VM name" in error.description
    assert not (tmp_path / "export").exists() and not (tmp_path / "escaped").exists()
    settings.create_vm_export_subdirectory = False
    assert os.path.isfile(export_system_definition(web, str(tmp_path / "export"), settings)["definition_file"])
    web.rename("web-again")
    assert host.vm("web-again").vm_id == web.vm_id


def test_rename_checks_the_name_and_keeps_names_unique(host, web):
    host.create_vm("db", [MiB])
    assert code_of(web.rename, "a/b") == INVALID_PARAMETER
    assert code_of(web.rename, "db") == INVALID_PARAMETER
    web.rename("www")
    assert web.name == "www" and host.vm("www") is web


# -- 2. damaged VM documents ---------------------------------------------------------------------

def _damage(vm: Vm, how: str) -> None:
    with open(vm.document_path) as f:
        text = f.read()
    document = json.loads(text)
    if how == "bad json":
        text = "{not json"
    elif how == "deep nesting":
        text = "[" * 100000
    elif how == "truncated":
        text = text[:len(text) // 2]
    elif how == "a list":
        text = "[1, 2, 3]"
    elif how == "wrong type":
        document["state"] = "Running"
    elif how == "missing key":
        del document["files"]
    elif how == "config missing key":
        del document["config"]["disks"][0]["chain"]
    elif how == "path escapes":
        document["config"]["disks"][0]["chain"] = ["../../../../etc/passwd"]
    elif how == "file loop":
        tree_ = next(iter(document["files"].values()))
        name = next(iter(tree_))
        tree_[name] = name
    elif how == "naive timestamp":
        document["reference_points"] = [{"instance_id": "R", "virtual_system_identifier": vm.vm_id,
                                         "virtual_disk_identifiers": [], "resilient_change_tracking_identifiers": [],
                                         "consistency_level": 2, "created": "2020-01-01T00:00:00"}]
    elif how == "bad intent":
        document["intent"] = {"op": "format_c"}
    elif how == "no document":
        os.unlink(vm.document_path)
        return
    elif how == "document is a directory":
        os.unlink(vm.document_path)
        os.mkdir(vm.document_path)
        return
    if how not in ("bad json", "deep nesting", "truncated", "a list"):
        text = json.dumps(document)
    with open(vm.document_path, "w") as f:
        f.write(text)


DAMAGES = ["bad json", "deep nesting", "truncated", "a list", "wrong type", "missing key", "config missing key",
           "path escapes", "file loop", "naive timestamp", "bad intent", "no document", "document is a directory"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_document_is_reported_and_the_other_vms_work(host, web, how):
    web.close_disks()
    bad = host.create_vm("bad", [MiB])
    leftover = os.path.join("Virtual Hard Disks", "bad_disk0_LEFTOVER.avhdx")
    stack.create(bad.path_of(leftover), type="differencing", parent=bad.path_of(bad.config.disks[0].active)).close()
    _damage(bad, how)
    damaged_state = tree(bad.directory)

    reopened = Host.open(host.directory)  # recovery skips it
    assert [vm.vm_id for vm in reopened.vms()] == [web.vm_id]
    entries = reopened.inventory()
    damaged = [e for e in entries if isinstance(e, DamagedVm)]
    assert len(entries) == 2 and [d.vm_id for d in damaged] == [bad.vm_id]
    assert damaged[0].directory == bad.directory and bad.document_path in damaged[0].problem
    assert reopened.vm("web").vm_id == web.vm_id
    with pytest.raises(HostError, match="document is damaged") as info:
        reopened.vm(bad.vm_id)
    assert bad.document_path in str(info.value)
    with pytest.raises(HostError, match="damaged; it may be one of them"):
        reopened.vm("bad")

    orphans = recovery.find_orphans(reopened)
    assert [d["id"] for d in orphans.to_dict()["damaged"]] == [bad.vm_id]
    recovery.clean(reopened)
    vm = reopened.vm("web")
    checkpoint = checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY, owner_pid=os.getpid())
    refpoints.convert_to_reference_point(vm, checkpoint.instance_id)
    assert tree(bad.directory) == damaged_state  # never modified: the user may repair it by hand
    with pytest.raises(HostError):
        bad.load()


def test_an_old_document_without_newer_keys_loads_and_newer_keys_are_ignored(host, web):
    checkpoint = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    point = refpoints.convert_to_reference_point(web, checkpoint.instance_id)
    document = web.load()
    del document["reference_points"][0]["element_name"]
    document["reference_points"][0]["from_the_future"] = 1
    document["config"]["from_the_future"] = {"x": 1}
    web.save(document)
    assert web.reference_point(point.instance_id).element_name == ""
    assert web.config.name == "web"


def test_writing_a_damaged_document_is_refused(web):
    document = web.load()
    document["state"] = "off"
    before = open(web.document_path, "rb").read()
    with pytest.raises(HostError, match="refusing to write"):
        web.save(document)
    assert open(web.document_path, "rb").read() == before


# -- 3. files a host owns --------------------------------------------------------------------------

def test_owner_of_finds_the_vm_or_the_host_through_symlinks_and_relative_paths(host, web, tmp_path, monkeypatch):
    active = web.path_of(web.config.disks[0].active)
    vm_owner = ownership.Owner(os.path.realpath(host.directory), web.vm_id, "web")
    host_owner = ownership.Owner(os.path.realpath(host.directory))
    assert ownership.owner_of(active) == vm_owner
    assert ownership.owner_of(active + ".rct") == vm_owner
    assert ownership.owner_of(web.path_of("Virtual Hard Disks/new.avhdx")) == host_owner  # not there yet
    assert ownership.owner_of(os.path.join(host.directory, "host.json")) == host_owner
    assert ownership.owner_of(host.directory) == host_owner
    assert ownership.owner_of(os.path.join(host.directory, "export-staging", "x.vhdx")) is None
    assert ownership.owner_of(str(tmp_path / "elsewhere.vhdx")) is None

    os.symlink(active, tmp_path / "link.vhdx")
    os.symlink(web.directory, tmp_path / "vmdir")
    assert ownership.owner_of(str(tmp_path / "link.vhdx")) == vm_owner
    assert ownership.owner_of(str(tmp_path / "vmdir" / "Virtual Hard Disks" / "x.vhdx")) == host_owner
    monkeypatch.chdir(os.path.join(web.directory, "Virtual Hard Disks"))
    assert ownership.owner_of(os.path.basename(active)) == vm_owner
    assert ownership.owner_of(os.path.join("..", "..", "..", "host.lock")) == host_owner


def test_changes_to_owned_files_are_refused_with_a_way_forward(host, web, tmp_path):
    active = web.path_of(web.config.disks[0].active)
    os.symlink(active, tmp_path / "link.vhdx")
    for path in (active, str(tmp_path / "link.vhdx")):
        with pytest.raises(HostError) as info:
            ownership.refuse_if_owned(path, "merge")
        message = str(info.value)
        assert info.value.return_value == SYSTEM_IN_USE
        assert f"belongs to VM web of host {os.path.realpath(host.directory)}" in message
        assert "change it through the host (e.g. hvbackup checkpoint delete)" in message
    stray = web.path_of("Virtual Hard Disks/stray.vhdx")
    with pytest.raises(HostError, match="checkpoint clean"):
        ownership.refuse_if_owned([str(tmp_path / "free.vhdx"), stray], "create")
    ownership.refuse_if_owned(str(tmp_path / "free.vhdx"), "create")
    with pytest.raises(HostError) as info:
        ownership.refuse_if_owned("bad\0path", "merge")
    assert info.value.return_value == INVALID_PARAMETER
    with pytest.raises(HostError, match="belongs to VM web"):
        ownership.refuse_if_owned(os.fsencode(active), "repair")


def _host_lock_taken_elsewhere(host) -> bool:
    """Whether another open file (as another process would have) cannot take the host lock now."""
    fd = os.open(os.path.join(host.directory, "host.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_changing_holds_the_hosts_lock_for_its_files_and_only_those(host, web, tmp_path):
    staged = os.path.join(host.directory, "export-staging", "web_disk0.vhdx")
    outside = str(tmp_path / "outside.vhdx")
    assert not _host_lock_taken_elsewhere(host)
    with ownership.changing([staged, outside], "merge"):
        assert _host_lock_taken_elsewhere(host)
        checkpoints.create(web)  # the same process may still work on the host (one lock per host)
    assert not _host_lock_taken_elsewhere(host)
    with ownership.changing(outside, "merge"):
        assert not _host_lock_taken_elsewhere(host)


# -- 4. interruptions clean up as failures do ------------------------------------------------------

EXPORT_POINTS = [
    (export_module.disks, "convert", 0, ""),                     # the first disk's copy
    (export_module.disks, "convert", 1, ""),                     # the second's, the first in place
    (export_module, "_record", 0, ""),                           # both disks done, not yet recorded
    (export_module, "replace_file", 0, ""),                      # recorded, writing the .vmcx
    (export_module.os, "mkdir", 0, "Virtual Hard Disks"),        # between the directories it makes
]


@pytest.mark.parametrize("owner,name,after,matching", EXPORT_POINTS, ids=[f"{p[1]}{p[2]}" for p in EXPORT_POINTS])
@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_export_removes_exactly_what_it_made(host, web, tmp_path, monkeypatch, owner, name, after,
                                                            matching, existing):
    checkpoint = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    destination = tmp_path / "exports" / "new"
    if existing:
        (destination / "web" / "Virtual Machines").mkdir(parents=True)
        (destination / "web" / "keep.txt").write_text("mine")
    before = tree(tmp_path / "exports")
    settings = ExportSettings(snapshot_virtual_system=checkpoint.instance_id)
    calls = interrupt_on_call(monkeypatch, owner, name, after, matching)
    with pytest.raises(Interrupt):
        export_system_definition(web, str(destination), settings)
    assert len(calls) > after  # the interruption happened where meant
    monkeypatch.undo()
    assert tree(tmp_path / "exports") == before
    assert web.checkpoint(checkpoint.instance_id).exported == []
    done = export_system_definition(web, str(destination), settings)  # and the export still works
    assert len(done["virtual_hard_disks"]) == 2


def test_an_export_failing_for_lack_of_space_is_a_host_error_and_cleans_up(host, web, tmp_path, monkeypatch):
    checkpoint = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    real_rename = os.rename

    def full(src, dst, *args, **kwargs):  # a built disk is renamed into place (hvbackup.durable)
        if str(dst).endswith("web_disk1.vhdx"):
            raise OSError(errno.ENOSPC, "No space left on device", dst)
        return real_rename(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "rename", full)
    with pytest.raises(HostError, match="No space left on device") as info:
        export_system_definition(web, str(tmp_path / "x"),
                                 ExportSettings(snapshot_virtual_system=checkpoint.instance_id))
    assert "web_disk1.vhdx" in str(info.value) and info.value.return_value == FAILED
    assert not (tmp_path / "x").exists()


def test_an_export_job_interrupted_in_its_thread_ends_terminated_and_clean(host, web, tmp_path, monkeypatch):
    checkpoint = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    interrupt_on_call(monkeypatch, export_module, "_record")
    answer, job = VirtualSystemManagementService(host).export_system_definition(
        web, str(tmp_path / "x"), ExportSettings(snapshot_virtual_system=checkpoint.instance_id))
    assert answer == 4096 and job.wait(60)
    assert job.job_state == JobState.TERMINATED and "interrupted" in job.error_description
    assert isinstance(job.exception, KeyboardInterrupt)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("point", [("convert", 0), ("enable", 0), ("convert", 1), ("write_document", 0)])
def test_an_interrupted_import_leaves_no_vm_directory(host, web, tmp_path, monkeypatch, point):
    checkpoint = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    definition = export_system_definition(web, str(tmp_path / "export"), ExportSettings(
        snapshot_virtual_system=checkpoint.instance_id))["definition_file"]
    other = Host.init(str(tmp_path / "other"))
    planned = import_system_definition(other, definition)
    before = tree(tmp_path / "other")
    from hvbackup.host import host as host_module
    owner = {"convert": importing_module.disks, "enable": importing_module.tracking,
             "write_document": host_module.store}[point[0]]
    interrupt_on_call(monkeypatch, owner, point[0], point[1])
    with pytest.raises(Interrupt):
        realize_planned_system(planned)
    monkeypatch.undo()
    assert tree(tmp_path / "other") == before and other.vms() == []
    assert realize_planned_system(planned).name == "web"


def test_an_interrupted_vm_creation_leaves_nothing(host, tmp_path, monkeypatch):
    from hvbackup.host import host as host_module
    before = tree(tmp_path)
    interrupt_on_call(monkeypatch, host_module.tracking, "enable", 1)
    with pytest.raises(Interrupt):
        host.create_vm("web", [MiB, MiB])
    assert tree(tmp_path) == before


def _disk_files(vm: Vm) -> list[str]:
    return sorted(os.listdir(vm.path_of("Virtual Hard Disks")))


@pytest.mark.parametrize("operation", ["create", "apply"])
@pytest.mark.parametrize("after", [0, 1])
def test_an_interrupted_checkpoint_creation_or_apply_is_undone_at_once(host, web, monkeypatch, operation, after):
    target = checkpoints.create(web) if operation == "apply" else None
    web.disk(0).write(0, b"B" * MiB)
    document, files = web.load(), _disk_files(web)
    interrupt_on_call(monkeypatch, checkpoints.stack, "create", after)
    with pytest.raises(Interrupt):
        if operation == "create":
            checkpoints.create(web)
        else:
            checkpoints.apply(web, target.instance_id)
    monkeypatch.undo()
    assert web.load() == document and _disk_files(web) == files  # as a failure leaves it: nothing new
    assert web.disk(0).read(0, 1) == b"B"


def test_an_interrupted_save_leaves_the_vm_running_without_a_saved_state(web, monkeypatch):
    interrupt_on_call(monkeypatch, web, "save")
    with pytest.raises(Interrupt):
        web.request_state_change("save")
    monkeypatch.undo()
    assert web.state.name == "RUNNING" and not os.path.exists(web.path_of("runtime-state.vmrs"))
    web.request_state_change("save")
    assert os.path.exists(web.path_of("runtime-state.vmrs"))


def test_a_checkpoint_failing_for_lack_of_space_is_a_host_error_naming_the_file(host, web, monkeypatch):
    files = _disk_files(web)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", args[0])
    monkeypatch.setattr(checkpoints.stack, "create", full)
    with pytest.raises(HostError, match="No space left on device") as info:
        checkpoints.create(web)
    assert web.vm_id in str(info.value) and ".avhdx" in str(info.value)
    monkeypatch.undo()
    assert _disk_files(web) == files and web.load()["intent"] is None


@pytest.mark.parametrize("operation", ["destroy", "convert"])
def test_an_interrupted_merge_leaves_an_intent_the_next_open_or_operation_finishes(host, web, monkeypatch,
                                                                                   operation):
    checkpoint = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY, owner_pid=os.getpid())
    web.disk(0).write(MiB, b"C" * MiB)
    interrupt_on_call(monkeypatch, checkpoints.stack, "merge", 1)  # the second disk's merge
    with pytest.raises(Interrupt):
        if operation == "destroy":
            checkpoints.destroy(web, checkpoint.instance_id)
        else:
            refpoints.convert_to_reference_point(web, checkpoint.instance_id, element_name="repo-A")
    monkeypatch.undo()
    assert web.load()["intent"] == {"op": "collapse"} and web.checkpoints() == []
    assert [p.element_name for p in web.reference_points()] == (["repo-A"] if operation == "convert" else [])
    if operation == "destroy":
        Host.open(host.directory)
    else:
        checkpoints.create(web)  # the next operation on the VM finishes it first
    document = web.load()
    assert document["intent"] is None
    recorded = {os.path.join("Virtual Hard Disks", f) for f in _disk_files(web) if f.endswith("hdx")}
    assert recorded == {f for files in document["files"].values() for f in files}
    assert web.disk(0).read(0, 1) == b"A" and web.disk(0).read(MiB, 1) == b"C"


# -- 5. one long operation per VM, and reference point names ---------------------------------------

HOLDER = """
import sys
from hvbackup.host import Host
vm = Host(sys.argv[1]).vm(sys.argv[2])
with vm.exclusive("backed up"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_exclusive_names_the_holder_across_processes(host, web):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, host.directory, "web"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(HostError) as info:
            with web.exclusive("restored"):
                pass
        assert info.value.return_value == SYSTEM_IN_USE
        assert f"VM web is already being backed up by process {holder.pid} since 20" in str(info.value)
        checkpoints.create(web)  # the host lock is not the VM's: other work goes on
    finally:
        holder.communicate("\n", timeout=60)
    with web.exclusive("restored"):  # released when its holder ended
        pass


def test_exclusive_waits_when_asked_and_never_under_the_host_lock(host, web):
    entered, release = threading.Event(), threading.Event()

    def hold():
        with web.exclusive("backed up"):
            checkpoints.create(web)  # the holder takes the host lock for its metadata changes
            entered.set()
            release.wait(30)
    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(30)
    started = time.monotonic()
    with pytest.raises(HostError, match=f"backed up by process {os.getpid()}"):
        with web.exclusive("exported", timeout=0.3):
            pass
    assert time.monotonic() - started >= 0.3
    with host.lock.held():
        with pytest.raises(HostError) as info:
            with web.exclusive("exported", timeout=5):  # would wait for a holder that needs the host lock
                pass
        assert info.value.return_value == INVALID_STATE
        with pytest.raises(HostError, match="already being backed up"):
            with web.exclusive("exported"):  # not waiting: allowed, and fails at once
                pass
    threading.Timer(0.3, release.set).start()
    with web.exclusive("exported", timeout=30):
        assert release.is_set()  # taken only once the holder let go
    holder.join(30)
    with pytest.raises(RuntimeError):
        with web.exclusive("exported"):
            raise RuntimeError("inside")
    with web.exclusive("exported"):  # released after an exception too
        pass
    # A waiter reading the holder's record must never find a past holder's.
    assert os.path.getsize(os.path.join(web.directory, "exclusive.lock")) == 0


def test_reference_points_take_a_name_per_repository(host, web):
    first = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY, name="hvbackup repo-A 1")
    assert refpoints.convert_to_reference_point(web, first.instance_id).element_name == "hvbackup repo-A 1"
    service = VirtualSystemSnapshotService(host)
    second = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    answer, job = service.convert_to_reference_point(web, second.instance_id, {"element_name": "repo-B",
                                                                               "consistency_level": 1})
    assert answer == 4096 and job.wait(60) and job.succeeded
    assert job.result.element_name == "repo-B" and job.result.consistency_level == 1
    assert sorted(p.element_name for p in web.reference_points()) == ["hvbackup repo-A 1", "repo-B"]
    third = checkpoints.create(web, snapshot_type=SNAPSHOT_TYPE_RECOVERY)
    for settings in ({"element_name": 5}, {"consistency_level": 7}, {"name": "x"}, ["element_name"]):
        answer, error = service.convert_to_reference_point(web, third.instance_id, settings)
        assert answer == 4, settings  # CIM Invalid Parameter
    assert code_of(checkpoints.create, web, name=5) == INVALID_PARAMETER


# -- 6. file system failures are host errors -------------------------------------------------------

def test_file_system_failures_are_host_errors_naming_the_file(host, web, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(HostError, match="is not a directory") as info:
        export_system_definition(web, str(tmp_path / "a-file" / "sub"), ExportSettings(
            snapshot_virtual_system=checkpoints.create(web).instance_id))
    assert info.value.return_value == INVALID_PARAMETER
    with pytest.raises(HostError, match="a-file"):
        Host.init(str(tmp_path / "a-file" / "host"))

    from hvbackup.host import host as host_module
    real_listdir = os.listdir

    def denied(path="."):
        if str(path).endswith("vms"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_listdir(path)
    monkeypatch.setattr(host_module.os, "listdir", denied)
    with pytest.raises(HostError, match="Permission denied") as info:
        host.vms()
    assert info.value.return_value == ACCESS_DENIED and host.vms_directory in str(info.value)
    monkeypatch.undo()

    web.close_disks()
    os.rename(host.vms_directory, host.vms_directory + "-moved")
    with pytest.raises(HostError, match="missing"):
        Host.open(host.directory)
    os.rename(host.vms_directory + "-moved", host.vms_directory)

    def no_space(path, parts):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("hvbackup.host.store.durable.write_file", no_space)
    with pytest.raises(HostError, match="vm.json: cannot write: No space left on device") as info:
        web.request_state_change("stop")
    assert info.value.return_value == FAILED
