"""The WMI-shaped services and their jobs: return values from the right table (CIM 0..6 for the
snapshot service, 32768.. for the others), 0 for quick methods and 4096 with a Msvm_ConcreteJob for
long ones, job states and progress, cooperative cancellation, and failures reported, never raised."""

from __future__ import annotations

import datetime
import os
import threading

import pytest

from hvbackup.errors import DiskError, HostError
from hvbackup.host import SNAPSHOT_TYPE_RECOVERY, Checkpoint, Host, ReferencePoint, Vm, VmState
from hvbackup.host.jobs import ConcreteJob, JobState, JobType
from hvbackup.host.model import ExportSettings
from hvbackup.host.services import (
    ImageManagementService,
    MsvmError,
    VirtualSystemManagementService,
    VirtualSystemReferencePointService,
    VirtualSystemSnapshotService,
    outcome,
)
from hvbackup.units import MiB


@pytest.fixture
def vm(host):
    vm = host.create_vm("web", [16 * MiB, 8 * MiB])
    vm.request_state_change("start")
    vm.disk(0).write(0, b"\x11" * MiB)
    vm.disk(1).write(MiB, b"\x22" * MiB)
    yield vm
    vm.close_disks()


def finished(answer: tuple[int, object]) -> ConcreteJob:
    return_value, job = answer
    assert return_value == 4096 and isinstance(job, ConcreteJob), answer
    assert job.wait(30), job.to_dict()
    return job


def refused(answer: tuple[int, object], return_value: int, error_code: int) -> MsvmError:
    assert answer[0] == return_value, answer
    error = answer[1]
    assert isinstance(error, MsvmError) and error.error_code == error_code and error.description
    return error


# -- Msvm_ConcreteJob ------------------------------------------------------------------------------

def test_a_job_goes_new_running_completed_and_reports_progress():
    job = ConcreteJob(JobType.EXPORT_VIRTUAL_MACHINE, "test")
    assert job.job_state == JobState.NEW and not job.finished
    halfway, go_on = threading.Event(), threading.Event()

    def operation(progress, cancelled):
        progress(50, 100)
        halfway.set()
        go_on.wait(10)
        return "the result"

    job.run(operation)
    assert halfway.wait(10)
    assert job.job_state == JobState.RUNNING and job.percent_complete == 50
    assert not job.wait(0.01)
    go_on.set()
    assert job.wait(10)
    assert job.job_state == JobState.COMPLETED and job.succeeded and job.result == "the result"
    assert job.percent_complete == 100 and job.error_code == 0
    shape = job.to_dict()
    assert shape["job_state"] == 7 and shape["job_type"] == 62 and shape["percent_complete"] == 100
    assert job.request_state_change(4) == 4097  # finished: no transition left


def test_a_failed_job_carries_the_error_and_a_defect_is_reported_too():
    def fails(progress, cancelled):
        raise HostError("the VM is off", 32775)

    def disk_fails(progress, cancelled):
        raise DiskError("short read")

    def has_a_bug(progress, cancelled):
        return 1 / 0

    job = ConcreteJob(JobType.MERGING_VHD_DISKS).run(fails)
    assert job.wait(10)
    assert (job.job_state, job.error_code, job.error_description) == (JobState.EXCEPTION, 32775, "the VM is off")
    job = ConcreteJob(JobType.MERGING_VHD_DISKS).run(disk_fails)
    assert job.wait(10) and (job.job_state, job.error_code) == (JobState.EXCEPTION, 32768)
    job = ConcreteJob(JobType.MERGING_VHD_DISKS).run(has_a_bug)
    assert job.wait(10)
    assert job.job_state == JobState.EXCEPTION and job.error_code == 32768
    assert isinstance(job.exception, ZeroDivisionError) and "internal error" in job.error_description


def test_cancellation_is_cooperative():
    started = threading.Event()

    def stops_when_asked(progress, cancelled):
        started.set()
        while not cancelled():
            threading.Event().wait(0.001)
        raise HostError("stopped", 32768)

    job = ConcreteJob(JobType.EXPORT_VIRTUAL_MACHINE).run(stops_when_asked)
    assert started.wait(10)
    assert job.request_state_change(4) == 4096
    assert job.wait(10) and job.job_state == JobState.TERMINATED and not job.succeeded

    release = threading.Event()

    def ignores_it(progress, cancelled):
        started.set()
        release.wait(10)
        return "done anyway"

    started.clear()
    job = ConcreteJob(JobType.EXPORT_VIRTUAL_MACHINE).run(ignores_it)
    assert started.wait(10)
    assert job.cancel() == 4096 and job.job_state == JobState.SHUTTING_DOWN
    release.set()
    assert job.wait(10) and job.job_state == JobState.COMPLETED and job.result == "done anyway"

    stuck = ConcreteJob(JobType.MERGING_VHD_DISKS, cancellable=False)
    assert stuck.request_state_change(4) == 1      # Not Supported: this job cannot be stopped
    assert ConcreteJob(1).request_state_change(3) == 1  # Suspend is not offered
    assert ConcreteJob(1).request_state_change(99) == 5  # not a RequestedState


# -- Msvm_VirtualSystemSnapshotService (CIM return values) ----------------------------------------

def test_create_snapshot_is_synchronous_and_refuses_in_cim_values(host, vm):
    service = VirtualSystemSnapshotService(host)
    return_value, checkpoint = service.create_snapshot(vm, {"consistency_level": 1, "element_name": "b1"},
                                                       SNAPSHOT_TYPE_RECOVERY)
    assert return_value == 0 and isinstance(checkpoint, Checkpoint)
    assert (checkpoint.name, checkpoint.consistency_level, checkpoint.snapshot_type) == ("b1", 1, 32768)
    refused(service.create_snapshot(vm, None, 3), 4, 32773)                     # Disk Snapshot: not offered
    refused(service.create_snapshot(vm, {"consistency_level": 7}, 2), 4, 32773)
    refused(service.create_snapshot(vm, {"bogus": 1}, 2), 4, 32773)
    assert [c.instance_id for c in vm.checkpoints()] == [checkpoint.instance_id]


def test_destroy_apply_and_convert_run_as_jobs(host, vm):
    service = VirtualSystemSnapshotService(host)
    _, standard = service.create_snapshot(vm, None, 2)
    vm.disk(0).write(0, b"\x33" * MiB)
    job = finished(service.apply_snapshot(vm, standard.instance_id))
    assert job.succeeded and job.job_type == 71
    assert vm.state == VmState.SAVED  # a running VM's checkpoint comes back saved, as on Hyper-V
    vm.request_state_change("start")
    assert vm.disk(0).read(0, 16) == b"\x11" * 16

    refused(service.convert_to_reference_point(vm, standard.instance_id), 5, 32775)  # not a recovery checkpoint
    job = finished(service.destroy_snapshot(vm, standard.instance_id))
    assert job.succeeded and job.job_type == 72 and vm.checkpoints() == []
    refused(service.destroy_snapshot(vm, standard.instance_id), 4, 32773)

    _, recovery = service.create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY)
    refused(service.convert_to_reference_point(vm, recovery.instance_id, {"x": 1}), 4, 32773)
    job = finished(service.convert_to_reference_point(vm, recovery.instance_id))
    point = job.result
    assert job.succeeded and job.job_type == 200 and isinstance(point, ReferencePoint)
    assert point.resilient_change_tracking_identifiers == [d.rct_id for d in recovery.disks]
    assert vm.checkpoints() == [] and [p.instance_id for p in vm.reference_points()] == [point.instance_id]


def test_listing_checkpoints_and_orphans_through_the_service(host, vm):
    service = VirtualSystemSnapshotService(host)
    _, standard = service.create_snapshot(vm, None, 2)
    _, owned = service.create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY, owner_pid=os.getpid())
    _, unowned = service.create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY)

    def ids(answer):
        return [c.instance_id for c in outcome(answer)]
    assert ids(service.get_snapshots(vm)) == [standard.instance_id, owned.instance_id, unowned.instance_id]
    assert ids(service.get_snapshots(vm, SNAPSHOT_TYPE_RECOVERY)) == [owned.instance_id, unowned.instance_id]
    refused(service.get_snapshots(vm, 3), 4, 32773)

    assert outcome(service.find_orphans()).checkpoints == []  # unowned, but younger than a day
    found = outcome(service.find_orphans(max_age=datetime.timedelta(0)))
    assert [(v.vm_id, c.instance_id) for v, c, _ in found.checkpoints] == [(vm.vm_id, unowned.instance_id)]
    refused(service.find_orphans(max_age=3600), 4, 32773)
    job = finished(service.clean_orphans(max_age=datetime.timedelta(0)))
    assert job.succeeded and job.job_type == 72 and len(job.result.checkpoints) == 1
    assert ids(service.get_snapshots(vm)) == [standard.instance_id, owned.instance_id]


def test_outcome_gives_the_result_or_raises_the_failure(host, vm):
    service = VirtualSystemSnapshotService(host)
    checkpoint = outcome(service.create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY))
    assert isinstance(outcome(service.convert_to_reference_point(vm, checkpoint.instance_id)), ReferencePoint)
    with pytest.raises(HostError, match="no checkpoint") as refusal:
        outcome(service.destroy_snapshot(vm, checkpoint.instance_id))  # refused before a job started
    assert refusal.value.return_value == 32773

    def fails(progress, cancelled):
        raise HostError("the VM is off", 32775)
    with pytest.raises(HostError, match="the VM is off") as failure:
        outcome((4096, ConcreteJob(JobType.MERGING_VHD_DISKS).run(fails)))
    assert failure.value.return_value == 32775

    def interrupted(progress, cancelled):
        raise KeyboardInterrupt
    with pytest.raises(HostError, match="ended Terminated") as stopped:
        outcome((4096, ConcreteJob(JobType.MERGING_VHD_DISKS, "merge").run(interrupted)))
    assert stopped.value.return_value == 32768


# -- vendor return values: reference points, management, image management --------------------------

def test_reference_point_service(host, vm):
    _, recovery = VirtualSystemSnapshotService(host).create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY)
    point = finished(VirtualSystemSnapshotService(host).convert_to_reference_point(vm, recovery.instance_id)).result
    service = VirtualSystemReferencePointService(host)
    return_value, points = service.get_reference_points(vm)
    assert return_value == 0 and [p.instance_id for p in points] == [point.instance_id]
    assert service.destroy_reference_point(vm, point.instance_id) == (0, None)
    assert service.get_reference_points(vm) == (0, [])
    refused(service.destroy_reference_point(vm, point.instance_id), 32773, 32773)


def test_management_service_state_changes_and_definitions(host, vm):
    service = VirtualSystemManagementService(host)
    assert service.request_state_change(vm, 9) == (0, VmState.PAUSED)
    refused(service.request_state_change(vm, 9), 32775, 32775)  # Paused -> Paused is not a transition
    refused(service.request_state_change(vm, 4), 32773, 32773)
    assert service.request_state_change(vm, 3) == (0, VmState.OFF)
    return_value, other = service.define_system("db", [4 * MiB], processors=2)
    assert return_value == 0 and isinstance(other, Vm) and other.config.processors == 2
    refused(service.define_system("db", [4 * MiB]), 32773, 32773)


def test_export_and_import_are_jobs(host, vm, tmp_path):
    snapshots = VirtualSystemSnapshotService(host)
    _, checkpoint = snapshots.create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY)
    service = VirtualSystemManagementService(host)
    refused(service.export_system_definition(vm, str(tmp_path / "x"), ExportSettings(snapshot_virtual_system="nope")),
            32773, 32773)
    refused(service.export_system_definition(vm, str(tmp_path / "x"), ExportSettings(
        snapshot_virtual_system=checkpoint.instance_id, differential_backup_base="nope")), 32773, 32773)
    job = finished(service.export_system_definition(
        vm, str(tmp_path / "full"), ExportSettings(snapshot_virtual_system=checkpoint.instance_id)))
    assert job.succeeded and job.job_type == 62 and job.percent_complete == 100, job.to_dict()
    report = job.result
    assert all(os.path.isfile(p) for p in [report["definition_file"], *report["virtual_hard_disks"]])

    restore_host = Host.init(str(tmp_path / "restore"))
    service = VirtualSystemManagementService(restore_host)
    refused(service.import_system_definition(str(tmp_path / "missing.vmcx")), 32773, 32773)
    job = finished(service.import_system_definition(report["definition_file"], None, True))
    assert job.succeeded and job.job_type == 61, job.to_dict()
    planned = job.result
    planned.config.name = "web-restored"
    job = finished(service.realize_planned_system(planned))
    assert job.succeeded and job.job_type == 141, job.to_dict()
    restored = job.result
    assert restored.vm_id != vm.vm_id and restored.name == "web-restored"
    restored.request_state_change("start")
    assert restored.disk(1).read(MiB, MiB) == b"\x22" * MiB
    restored.close_disks()


def test_a_detached_differential_export_needs_no_export_of_its_base(host, vm, tmp_path):
    snapshots, service = VirtualSystemSnapshotService(host), VirtualSystemManagementService(host)
    first = outcome(snapshots.create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY))
    point = outcome(snapshots.convert_to_reference_point(vm, first.instance_id))
    vm.disk(0).write(4 * MiB, b"\x55" * MiB)
    checkpoint = outcome(snapshots.create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY))
    settings = ExportSettings(snapshot_virtual_system=checkpoint.instance_id,
                              differential_backup_base=point.instance_id)
    job = finished(service.export_system_definition(vm, str(tmp_path / "attached"), settings))
    assert (job.job_state, job.error_code) == (JobState.EXCEPTION, 32773)  # the base was never exported
    report = outcome(service.export_system_definition(vm, str(tmp_path / "detached"), settings, detached=True))
    assert [os.path.basename(p) for p in report["virtual_hard_disks"]] == [
        f"web_disk{i}_{checkpoint.instance_id}.avhdx" for i in range(2)]


def test_an_export_job_can_be_cancelled(host, vm, tmp_path):
    _, checkpoint = VirtualSystemSnapshotService(host).create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY)
    service = VirtualSystemManagementService(host)
    destination = tmp_path / "cancelled"
    with host.lock.held():  # the job waits for the host lock, so the request is in before it starts copying
        return_value, job = service.export_system_definition(
            vm, str(destination), ExportSettings(snapshot_virtual_system=checkpoint.instance_id))
        assert return_value == 4096 and job.cancellable
        assert job.cancel() == 4096 and job.job_state == JobState.SHUTTING_DOWN
    assert job.wait(30)
    assert job.job_state == JobState.TERMINATED and job.error_code == 32768 and job.error_description
    leftovers = [f for _, _, files in os.walk(destination) for f in files if f.endswith((".vhdx", ".vmcx"))]
    assert leftovers == []
    # the checkpoint is untouched and exports normally afterwards
    assert finished(service.export_system_definition(
        vm, str(destination), ExportSettings(snapshot_virtual_system=checkpoint.instance_id))).succeeded


def test_get_virtual_disk_changes(host, vm):
    service = ImageManagementService(host)
    _, first = VirtualSystemSnapshotService(host).create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY)
    point = finished(VirtualSystemSnapshotService(host).convert_to_reference_point(vm, first.instance_id)).result
    vm.disk(0).write(4 * MiB, b"\x44" * MiB)
    _, second = VirtualSystemSnapshotService(host).create_snapshot(vm, None, SNAPSHOT_TYPE_RECOVERY)
    frozen = vm.path_of(second.disks[0].frozen)
    return_value, (processed, offsets, lengths) = service.get_virtual_disk_changes(
        frozen, point.resilient_change_tracking_identifiers[0], 0, 16 * MiB)
    assert return_value == 0 and processed == 16 * MiB
    changed = list(zip(offsets, lengths))
    assert changed and all(o <= 4 * MiB and o + n >= 5 * MiB for o, n in changed[:1])
    assert sum(lengths) < 4 * MiB
    refused(service.get_virtual_disk_changes(frozen + ".missing", "rctX:x", 0, MiB), 32779, 32779)
    code, error = service.get_virtual_disk_changes(frozen, "rctX:not-an-id", 0, MiB)
    assert code >= 32768 and isinstance(error, MsvmError)
