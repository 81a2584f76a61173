"""Backup exports and imports (ExportSystemDefinition, ImportSystemDefinition, RealizePlannedSystem)
and GetVirtualDiskChanges: the xHyper-VBackup flow end to end, full and differential, PreserveChain
and Merge, under a guest that keeps writing, with the peers (qemu-img, libvhdi) reading the results."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
from vm_model import GuestModel

from hvbackup import disks
from hvbackup.errors import HostError
from hvbackup.host import SNAPSHOT_TYPE_FULL, SNAPSHOT_TYPE_RECOVERY, Host, checkpoints, refpoints
from hvbackup.host.changes import get_virtual_disk_changes
from hvbackup.host.export import export_system_definition
from hvbackup.host.importing import import_system_definition, realize_planned_system
from hvbackup.host.model import BACKUP_INTENT_MERGE, BACKUP_INTENT_PRESERVE_CHAIN, ExportSettings
from hvbackup.units import MiB
from tests.tools import libvhdi_read, qemu_check

K64 = 64 << 10


def recovery_checkpoint(vm):
    return checkpoints.create(vm, snapshot_type=SNAPSHOT_TYPE_RECOVERY)


def export(vm, directory, checkpoint, base=None, **fields) -> dict:
    settings = ExportSettings(snapshot_virtual_system=checkpoint.instance_id, differential_backup_base=base,
                              create_vm_export_subdirectory=False, **fields)
    return export_system_definition(vm, str(directory), settings)


def read_all(path: str) -> bytes:
    with disks.open(path, read_only=True) as disk:
        return disk.read(0, disk.size)


def import_into(tmp_path, name: str, definition: str, **options):
    other = Host.init(str(tmp_path / name))
    return realize_planned_system(import_system_definition(other, definition, **options))


@pytest.mark.parametrize("intent", [BACKUP_INTENT_PRESERVE_CHAIN, BACKUP_INTENT_MERGE])
def test_xhyperv_backup_flow_full_then_differential(host, tmp_path, intent):
    guest = GuestModel.create(host, [256 * MiB, 32 * MiB])
    vm = guest.vm
    rng = random.Random(intent)
    guest.write(0, 0, rng.randbytes(16 * MiB))
    guest.write(0, 200 * MiB, rng.randbytes(8 * MiB))
    guest.write(1, MiB, rng.randbytes(4 * MiB))

    # Full backup: recovery checkpoint -> export -> reference point.
    first = recovery_checkpoint(vm)
    at_first = guest.snapshot()
    full = export(vm, tmp_path / "full", first)
    assert [os.path.basename(p) for p in full["virtual_hard_disks"]] == ["web_disk0.vhdx", "web_disk1.vhdx"]
    assert vm.checkpoint(first.instance_id).exported == full["virtual_hard_disks"]
    for path, want in zip(full["virtual_hard_disks"], at_first):
        qemu_check(path, "vhdx")
        assert read_all(path) == want
    point = refpoints.convert_to_reference_point(vm, first.instance_id)
    assert point.exported == full["virtual_hard_disks"]

    # The guest changes 1 % of disk 0 (40 x 64 KiB, scattered) and a little of disk 1.
    offsets = rng.sample(range(256 * MiB // K64), 40)
    for block in offsets:
        guest.write(0, block * K64, rng.randbytes(K64))
    guest.trim(0, 200 * MiB, K64)
    guest.write(1, 0, b"\x5a" * K64)
    changed = (len(offsets) + 1) * K64

    # Incremental backup against the reference point; writes after the checkpoint must stay out.
    second = recovery_checkpoint(vm)
    at_second = guest.snapshot()
    guest.write(0, 0, b"\xff" * MiB)
    diff = export(vm, tmp_path / "incremental", second, point.instance_id, backup_intent=intent)
    newer = refpoints.convert_to_reference_point(vm, second.instance_id)
    refpoints.destroy_reference_point(vm, point.instance_id)
    assert newer.exported == diff["virtual_hard_disks"] and vm.reference_points() == [newer]

    top = diff["virtual_hard_disks"][0]
    if intent == BACKUP_INTENT_PRESERVE_CHAIN:
        assert top.endswith(f"web_disk0_{second.instance_id}.avhdx")
        # Space the differential takes: the changed data and the VHDX's own 4 MiB of structures, not the
        # disk; its length is at most one 2 MiB block per change plus those structures.
        assert os.stat(top).st_blocks * 512 <= changed + 5 * MiB
        assert os.path.getsize(top) <= (len(offsets) + 1) * 2 * MiB + 5 * MiB
        parents = [full["virtual_hard_disks"][0]]
        for offset in [offsets[0] * K64, 200 * MiB, 0, 100 * MiB]:
            assert libvhdi_read(top, offset, K64, parents) == at_second[0][offset:offset + K64]
    else:
        # Merge: one full set at the destination, the base's export consumed into it.
        assert top.endswith("web_disk0.vhdx")
        assert not any(os.path.exists(p) for p in full["virtual_hard_disks"])
        qemu_check(top, "vhdx")

    restored = import_into(tmp_path, "restore", diff["definition_file"], generate_new_identifier=True)
    assert restored.vm_id != vm.vm_id and restored.name == "web"
    for index, want in enumerate(at_second):
        assert read_all(restored.path_of(restored.config.disks[index].active)) == want
    vm.close_disks()


class SequencedWriter(threading.Thread):
    """Writes 4 KiB blocks holding their sequence number (from 1) round-robin into SLOTS slots and
    records how far it got: ``issued`` is set before a write starts, ``acked`` after it returns."""

    SLOTS, SPACING, BLOCK = 64, 256 << 10, 4096

    def __init__(self, vm):
        super().__init__(daemon=True)
        self.vm, self.issued, self.acked, self.stop = vm, 0, 0, threading.Event()

    def run(self) -> None:
        disk = self.vm.disk(0)
        seq = 0
        while not self.stop.is_set():
            seq += 1
            self.issued = seq
            disk.write((seq % self.SLOTS) * self.SPACING, struct.pack("<Q", seq) * (self.BLOCK // 8))
            disk.flush()  # acknowledged, and visible to any reader of the file (an export of the wrong one)
            self.acked = seq

    def wait_for(self, writes: int) -> None:
        target = self.acked + writes
        while self.acked < target:
            time.sleep(0.001)

    @classmethod
    def last_write(cls, path: str) -> int:
        """The sequence number the image is a prefix up to; fails unless every slot holds exactly the
        last write to it up to that number (no newer write, none missing)."""
        with disks.open(path, read_only=True) as disk:
            seen = [struct.unpack_from("<Q", disk.read(s * cls.SPACING, 8))[0] for s in range(cls.SLOTS)]
        last = max(seen)
        for slot, value in enumerate(seen):
            newest = last - (last - slot) % cls.SLOTS  # the last write to this slot up to ``last``
            expected = newest if newest >= 1 else 0
            assert value == expected, f"slot {slot} holds write {value}, a prefix up to {last} gives {expected}"
        return last


def test_checkpoints_taken_under_guest_writes_export_exactly_what_preceded_them(host, tmp_path):
    guest = GuestModel.create(host, [64 * MiB])
    vm = guest.vm
    writer = SequencedWriter(vm)
    writer.start()
    try:
        writer.wait_for(300)
        acked_before = writer.acked
        first = recovery_checkpoint(vm)
        issued_after = writer.issued
        writer.wait_for(50)  # newer writes exist before the export reads (and while it does)
        full = export(vm, tmp_path / "full", first)
        point = refpoints.convert_to_reference_point(vm, first.instance_id)
        writer.wait_for(300)
        acked_before2 = writer.acked
        second = recovery_checkpoint(vm)
        issued_after2 = writer.issued
        writer.wait_for(50)
        diff = export(vm, tmp_path / "incremental", second, point.instance_id)
        writer.wait_for(100)
    finally:
        writer.stop.set()
        writer.join()
    vm.close_disks()
    last = SequencedWriter.last_write(full["virtual_hard_disks"][0])
    # Write ``issued_after`` may have completed just before the checkpoint froze the disk; later ones
    # began after it returned.
    assert acked_before <= last <= issued_after
    last2 = SequencedWriter.last_write(diff["virtual_hard_disks"][0])  # through its parent, the full export
    assert acked_before2 <= last2 <= issued_after2 and last2 > last


def test_standard_checkpoint_exports_and_serves_as_a_differential_base(host, tmp_path):
    """Msvm_VirtualSystemExportSettingData allows DifferentialBackupBase to be a snapshot and does not
    limit ExportOneSnapshotForBackup to recovery snapshots: both work here."""
    guest = GuestModel.create(host, [16 * MiB])
    guest.write(0, 0, b"a" * MiB)
    standard = checkpoints.create(guest.vm, snapshot_type=SNAPSHOT_TYPE_FULL)
    full = export(guest.vm, tmp_path / "full", standard)
    guest.write(0, 4 * MiB, b"b" * 6 * MiB)  # one large change: the pipelined copy's case
    recovery = recovery_checkpoint(guest.vm)
    want = guest.snapshot()[0]
    diff = export(guest.vm, tmp_path / "incremental", recovery, standard.instance_id)
    assert read_all(diff["virtual_hard_disks"][0]) == want
    assert os.stat(diff["virtual_hard_disks"][0]).st_blocks * 512 <= 6 * MiB + 5 * MiB
    assert full["virtual_hard_disks"] == guest.vm.checkpoint(standard.instance_id).exported
    guest.vm.close_disks()


def test_settings_shape_the_export(host, tmp_path):
    guest = GuestModel.create(host, [8 * MiB])
    checkpoint = recovery_checkpoint(guest.vm)
    settings = ExportSettings(snapshot_virtual_system=checkpoint.instance_id, copy_vm_storage=False,
                              copy_vm_runtime_information=True)
    result = export_system_definition(guest.vm, str(tmp_path / "config-only"), settings)
    root = tmp_path / "config-only" / "web"
    assert result["directory"] == str(root) and result["virtual_hard_disks"] == []
    assert sorted(os.listdir(root)) == ["Virtual Machines"]
    definition = json.loads((root / "Virtual Machines" / f"{guest.vm.vm_id}.vmcx").read_text())
    assert definition["runtime"] == {"enabled_state": 2}
    assert definition["configuration"]["disks"][0]["chain"] == ["web_disk0.vhdx"]
    assert definition["snapshot"]["virtual_system_type"] == "Microsoft:Hyper-V:Snapshot:Recovery"
    assert guest.vm.checkpoint(checkpoint.instance_id).exported == []  # nothing a differential could use

    flat = export(guest.vm, tmp_path / "flat", checkpoint)
    assert sorted(os.listdir(tmp_path / "flat")) == ["Virtual Hard Disks", "Virtual Machines"]
    assert "runtime" not in json.loads(open(flat["definition_file"]).read())
    guest.vm.close_disks()


def test_export_errors(host, tmp_path):
    guest = GuestModel.create(host, [8 * MiB])
    vm = guest.vm
    checkpoint = recovery_checkpoint(vm)

    def code(**fields) -> int:
        with pytest.raises(HostError) as info:
            export_system_definition(vm, str(tmp_path / "x"), ExportSettings(**fields))
        return info.value.return_value

    assert code(snapshot_virtual_system="no-such-checkpoint") == 32773
    assert code(snapshot_virtual_system=None) == 32773
    assert code(snapshot_virtual_system=checkpoint.instance_id, copy_snapshot_configuration=0) == 32770
    assert code(snapshot_virtual_system=checkpoint.instance_id, copy_snapshot_configuration=7) == 32773
    assert code(snapshot_virtual_system=checkpoint.instance_id, backup_intent=2) == 32773
    assert code(snapshot_virtual_system=checkpoint.instance_id, differential_backup_base="nothing") == 32773

    # A reference point made without an export cannot be the base of a differential.
    point = refpoints.convert_to_reference_point(vm, checkpoint.instance_id)
    guest.write(0, 0, b"x" * K64)
    second = recovery_checkpoint(vm)
    with pytest.raises(HostError) as info:
        export(vm, tmp_path / "incremental", second, point.instance_id)
    assert info.value.return_value == 32773 and "export" in str(info.value)
    assert not (tmp_path / "incremental" / "Virtual Machines" / f"{vm.vm_id}.vmcx").exists()

    export(vm, tmp_path / "full", second)
    with pytest.raises(HostError) as info:
        export(vm, tmp_path / "full", second)  # never over an earlier export
    assert info.value.return_value == 32773
    vm.close_disks()


def test_a_detached_differential_needs_no_export_of_its_base_and_reads_alone(host, tmp_path):
    """A backup application that keeps its base elsewhere asks for a detached differential: the base
    reference point has no export, the differential's own sectors are exactly the changed ranges,
    readable without its parent, and laid over the base they give the disk at the checkpoint."""
    guest = GuestModel.create(host, [8 * MiB, 4 * MiB])
    guest.write(0, 0, os.urandom(3 * MiB))
    base = guest.snapshot()
    point = refpoints.convert_to_reference_point(guest.vm, recovery_checkpoint(guest.vm).instance_id)
    guest.write(0, 5 * MiB + 4096, os.urandom(K64))
    guest.trim(0, MiB, K64)
    checkpoint = recovery_checkpoint(guest.vm)
    settings = ExportSettings(snapshot_virtual_system=checkpoint.instance_id,
                              differential_backup_base=point.instance_id, create_vm_export_subdirectory=False)
    files = export_system_definition(guest.vm, str(tmp_path / "x"), settings, detached=True)["virtual_hard_disks"]
    assert sorted(os.listdir(tmp_path / "x" / "Virtual Hard Disks")) == sorted(map(os.path.basename, files))
    want = guest.snapshot()
    for index, path in enumerate(files):
        with disks.open(path, read_only=True, without_parent=True) as alone:
            assert alone.disk_type == "differencing" and alone.parent is None
            own = [(e.offset, e.length) for e in alone.extents() if e.state == disks.ExtentState.DATA]
            laid = bytearray(base[index])
            for offset, length in own:
                laid[offset:offset + length] = alone.read(offset, length)
        assert bytes(laid) == want[index]
        # The tracking granules the changes touch (the write straddles two), nothing more.
        assert sum(length for _, length in own) == (3 * K64 if index == 0 else 0)
    with pytest.raises(Exception, match="read-only"):
        disks.open(files[0], without_parent=True)
    merge = ExportSettings(snapshot_virtual_system=checkpoint.instance_id, differential_backup_base=point.instance_id,
                           backup_intent=BACKUP_INTENT_MERGE)
    with pytest.raises(HostError) as refused:  # a Merge writes into the base's export: there is none
        export_system_definition(guest.vm, str(tmp_path / "y"), merge, detached=True)
    assert refused.value.return_value == 32773 and not (tmp_path / "y").exists()
    guest.vm.close_disks()


@pytest.mark.parametrize("intent", [BACKUP_INTENT_PRESERVE_CHAIN, BACKUP_INTENT_MERGE])
def test_cancelled_export_leaves_nothing_that_looks_complete(host, tmp_path, intent):
    guest = GuestModel.create(host, [64 * MiB])
    vm = guest.vm
    guest.write(0, 0, os.urandom(32 * MiB))
    first = recovery_checkpoint(vm)
    calls = []

    def cancel_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    settings = ExportSettings(snapshot_virtual_system=first.instance_id, create_vm_export_subdirectory=False)
    with pytest.raises(HostError, match="cancelled"):
        export_system_definition(vm, str(tmp_path / "full"), settings, cancelled=cancel_after_two)
    assert not (tmp_path / "full").exists()  # what the export made, it removed
    assert vm.checkpoint(first.instance_id).exported == []
    full = export(vm, tmp_path / "full", first)  # again, from the start
    point = refpoints.convert_to_reference_point(vm, first.instance_id)

    for block in range(0, 32 * MiB, 2 * MiB):
        guest.write(0, block, os.urandom(K64))
    second = recovery_checkpoint(vm)
    want = guest.snapshot()[0]
    calls.clear()
    settings = ExportSettings(snapshot_virtual_system=second.instance_id, differential_backup_base=point.instance_id,
                              backup_intent=intent, create_vm_export_subdirectory=False)
    with pytest.raises(HostError, match="cancelled"):
        export_system_definition(vm, str(tmp_path / "incremental"), settings, cancelled=cancel_after_two)
    assert not (tmp_path / "incremental" / "Virtual Machines").exists()
    if intent == BACKUP_INTENT_MERGE:  # a Merge keeps its work (the base's disk) to resume
        assert os.listdir(tmp_path / "incremental" / "Virtual Hard Disks") == [".web_disk0.vhdx.merging"]
    else:
        assert not (tmp_path / "incremental").exists()
    diff = export_system_definition(vm, str(tmp_path / "incremental"), settings)
    assert os.listdir(tmp_path / "incremental" / "Virtual Hard Disks") == [
        os.path.basename(diff["virtual_hard_disks"][0])]
    assert read_all(diff["virtual_hard_disks"][0]) == want
    assert (intent == BACKUP_INTENT_MERGE) != os.path.exists(full["virtual_hard_disks"][0])
    vm.close_disks()


def test_import_checks_chains_identifiers_and_names(host, tmp_path):
    guest = GuestModel.create(host, [16 * MiB])
    vm = guest.vm
    guest.write(0, 0, b"q" * MiB)
    first = recovery_checkpoint(vm)
    full = export(vm, tmp_path / "full", first)
    point = refpoints.convert_to_reference_point(vm, first.instance_id)
    guest.write(0, MiB, b"r" * MiB)
    second = recovery_checkpoint(vm)
    diff = export(vm, tmp_path / "incremental", second, point.instance_id)
    vm.close_disks()

    planned = import_system_definition(host, diff["definition_file"], generate_new_identifier=True)
    with pytest.raises(HostError, match="named 'web'") as info:  # the same host: the name is taken
        realize_planned_system(planned)
    assert info.value.return_value == 32773
    planned.config.name = "web-restored"  # what vm import --name does
    assert realize_planned_system(planned).name == "web-restored"

    other = Host.init(str(tmp_path / "other"))
    other.create_vm("not-web", [MiB], vm_id=vm.vm_id)
    with pytest.raises(HostError, match="ID") as info:
        import_system_definition(other, full["definition_file"])
    assert info.value.return_value == 32773
    planned = import_system_definition(other, full["definition_file"], generate_new_identifier=True)
    restored = realize_planned_system(planned)
    assert restored.vm_id != vm.vm_id and len(other.vms()) == 2
    with pytest.raises(HostError, match="already has a VM"):
        realize_planned_system(planned)  # realized once already

    same = import_into(tmp_path, "same-id", diff["definition_file"])
    assert same.vm_id == vm.vm_id and same.config.disks[0].instance_id == vm.config.disks[0].instance_id
    assert read_all(same.path_of(same.config.disks[0].active))[:2 * MiB] == b"q" * MiB + b"r" * MiB

    os.unlink(full["virtual_hard_disks"][0])  # a differential without its base is no disk
    with pytest.raises(HostError, match="parent") as info:
        import_system_definition(Host.init(str(tmp_path / "third")), diff["definition_file"])
    assert info.value.return_value == 32773
    with pytest.raises(HostError):
        import_system_definition(other, str(tmp_path / "missing.vmcx"))


def test_get_virtual_disk_changes(host, tmp_path):
    guest = GuestModel.create(host, [16 * MiB])
    vm = guest.vm
    checkpoint = recovery_checkpoint(vm)
    guest.write(0, 3 * K64, b"c" * K64)
    guest.write(0, 10 * MiB, b"d" * 2 * K64)
    vm.close_disks()
    active = vm.path_of(vm.config.disks[0].active)
    rct = checkpoint.disks[0].rct_id
    vhd = str(tmp_path / "legacy.vhd")
    disks.create(vhd, MiB, format="vhd").close()
    assert get_virtual_disk_changes(active, rct, 0, 16 * MiB) == (16 * MiB, [3 * K64, 10 * MiB], [K64, 2 * K64])
    assert get_virtual_disk_changes(active, rct, 8 * MiB, 8 * MiB) == (8 * MiB, [10 * MiB], [2 * K64])
    for args, value in [((active, rct, 0, 16 * MiB + 512), 32773), ((active, rct, 8 * MiB, 9 * MiB), 32773),
                        ((active, "rctX:no-such-id:1", 0, MiB), 32773), ((active + ".gone", rct, 0, MiB), 32779),
                        ((vhd, rct, 0, MiB), 32770)]:
        with pytest.raises(HostError) as info:
            get_virtual_disk_changes(*args)
        assert info.value.return_value == value, args


EXPORT_CHILD = """
import json, sys
from hvbackup.host import Host
from hvbackup.host.export import export_system_definition
from hvbackup.host.model import ExportSettings
vm = Host.open(sys.argv[1]).vm("web")
settings = ExportSettings(**json.loads(sys.argv[3]))
print("ready", flush=True)
export_system_definition(vm, sys.argv[2], settings)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "differential", "merge"])
def test_export_killed_at_random_moments(host, tmp_path, mode, sample):
    """SIGKILL an exporting process at random moments: whatever sits under a final name is whole, a
    .vmcx means the export is complete and recorded, and running the export again finishes it."""
    guest = GuestModel.create(host, [16 * MiB, 8 * MiB])
    rng = random.Random(mode)
    guest.write(0, 0, rng.randbytes(12 * MiB))
    guest.write(1, 0, rng.randbytes(6 * MiB))
    base = recovery_checkpoint(guest.vm)  # stays a checkpoint: it can be exported again for every Merge
    export(guest.vm, tmp_path / "base", base)
    for offset in range(0, 16 * MiB, MiB):
        guest.write(0, offset + K64, rng.randbytes(3 * K64))
    guest.write(1, 0, bytes(K64))
    checkpoint = recovery_checkpoint(guest.vm)
    want = guest.snapshot()
    guest.vm.close_disks()
    fields = {"snapshot_virtual_system": checkpoint.instance_id, "create_vm_export_subdirectory": False,
              "differential_backup_base": None if mode == "full" else base.instance_id,
              "backup_intent": BACKUP_INTENT_MERGE if mode == "merge" else BACKUP_INTENT_PRESERVE_CHAIN}
    for case in range(sample(6, 30)):
        if mode == "merge":
            export(guest.vm, tmp_path / f"base{case}", base)  # a fresh full set for the Merge to consume
        dest = tmp_path / f"export{case}"
        child = subprocess.Popen([sys.executable, "-c", EXPORT_CHILD, host.directory, str(dest), json.dumps(fields)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0, 0.06))
        child.send_signal(signal.SIGKILL)
        child.wait()

        reopened = Host.open(host.directory).vm("web")
        definition = dest / "Virtual Machines" / f"{reopened.vm_id}.vmcx"
        disk_dir = dest / "Virtual Hard Disks"
        names = sorted(n for n in os.listdir(disk_dir) if not n.startswith(".")) if disk_dir.exists() else []
        for name in names:  # nothing under a final name is partial
            assert read_all(str(disk_dir / name)) == want[0 if "disk0" in name else 1], (case, name)
        if definition.exists():
            result = reopened.checkpoint(checkpoint.instance_id).exported
            assert sorted(os.path.basename(p) for p in result) == names
        else:
            result = export_system_definition(reopened, str(dest), ExportSettings(**fields))["virtual_hard_disks"]
            assert reopened.checkpoint(checkpoint.instance_id).exported == result
            assert sorted(os.listdir(disk_dir)) == sorted(os.path.basename(p) for p in result)  # no leftovers
        assert [read_all(p) for p in result] == want, case
