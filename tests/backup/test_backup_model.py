"""The backup application against a model: random interleavings of guest writes and trims, backups by
both methods (alone, forced full, several VMs at once), standard checkpoints, forgets and prunes. Every
remaining restore point restores bit-identical to the VM's disks as they were when it was taken; the
repository stays sound; the engine says "incremental" exactly when it can build on the previous point
and says why whenever it reads in full unasked."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from blake3 import blake3
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hvbackup.backup.engine import backup_vm, backup_vms
from hvbackup.backup.repository import Repository
from hvbackup.backup.restore import restore_disk, restore_vm
from hvbackup.host import Host, checkpoints

KiB, MiB = 1 << 10, 1 << 20
# Per VM: one disk whose size is a multiple of neither chunk size nor the 64 KiB tracking granule (a
# tail chunk), one that is. Small, so an example stays fast; blocks of 1 MiB, so writes cross them.
DISK_SIZES = [9 * MiB + 100 * KiB, 8 * MiB]
BLOCK_SIZE = MiB
GRANULE = 64 * KiB
METHODS = ("virtdisk", "export")


def content(seed: int, length: int) -> bytes:
    """Deterministic bytes: a few seeds only, so the same data lands at several places (dedup)."""
    if seed < 4:
        return bytes([seed * 0x41]) * length  # 0 gives zeros: writes that make chunks read as zeros
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


def fingerprint(data: bytes, chunk_size: int) -> list[str]:
    """Per-chunk digests of a disk image: cheap to keep for every point, and a mismatch names the chunk."""
    view = memoryview(data)
    return [blake3(view[o:o + chunk_size]).hexdigest()
            for o in range(0, len(data), chunk_size)]


def scratch_dir() -> str:
    """A temporary directory, in memory when there is room: the host and the repository fsync every
    step, which would otherwise dominate an example's time."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 2 << 30:
        return tempfile.mkdtemp(prefix="hvbackup-backup-model-", dir=shm)
    return tempfile.mkdtemp(prefix="hvbackup-backup-model-")


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class BackupModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = scratch_dir()
        self.host = Host.init(os.path.join(self.dir, "host"))
        self.vms = []
        self.repo = None
        self.expected: dict[str, tuple[str, list[list[str]]]] = {}  # point -> (VM name, per-disk fingerprints)
        self.shadow: dict[tuple[int, int], np.ndarray] = {}         # (VM, disk) -> bytes the guest wrote
        self.trimmed: dict[tuple[int, int], np.ndarray] = {}        # (VM, disk) -> bytes trimmed since
        self.last: dict[int, tuple[str, str] | None] = {}           # VM -> (point, method) of its last backup
        self.standard: dict[int, list[str]] = {}                    # VM -> its standard checkpoints
        self.restored = 0
        self.unchecked: set[str] = set()                            # points to restore at the next check

    # -- set-up ----------------------------------------------------------------------------------

    @initialize(count=st.integers(1, 2), chunk_size=st.sampled_from([256 * KiB, MiB]),
                method=st.sampled_from(METHODS), writes=st.lists(st.tuples(st.integers(0, 1), st.integers(1, 6)),
                                                                  max_size=3))
    def setup(self, count, chunk_size, method, writes):
        """The VMs, some data on them, and a first backup of all: later ones can be incremental."""
        self.repo = Repository.init(os.path.join(self.dir, "repo"), chunk_size=chunk_size)
        for v in range(count):
            vm = self.host.create_vm(f"vm{v}", DISK_SIZES, block_size=BLOCK_SIZE)
            vm.request_state_change("start")
            self.vms.append(vm)
            self.last[v] = None
            self.standard[v] = []
            for d, size in enumerate(DISK_SIZES):
                self.shadow[v, d] = np.zeros(size, np.uint8)
                self.trimmed[v, d] = np.zeros(size, bool)
        for d, seed in writes:
            for v, vm in enumerate(self.vms):
                offset = seed * MiB - 3 * KiB  # a boundary of both chunk sizes, crossed
                payload = content(seed, 2 * chunk_size)
                vm.disk(d).write(offset, payload)
                self.shadow[v, d][offset:offset + len(payload)] = np.frombuffer(payload, np.uint8)
        self._backup_all(method, False)

    # -- guest I/O -------------------------------------------------------------------------------

    def _target(self, data):
        v = data.draw(st.integers(0, len(self.vms) - 1), label="vm")
        d = data.draw(st.integers(0, len(DISK_SIZES) - 1), label="disk")
        size = DISK_SIZES[d]
        chunk = self.repo.chunk_size
        offset = data.draw(st.one_of(
            st.integers(0, size - 1),                                      # anywhere, unaligned
            st.integers(0, (size - 1) // chunk).map(lambda c: c * chunk),   # a chunk boundary
            st.integers(1, size // chunk).map(lambda c: c * chunk - 1000),  # just before one
            st.just(size - 1000),                                          # into the tail
        ), label="offset")
        length = data.draw(st.one_of(st.integers(1, 4 * KiB), st.integers(1, 2 * chunk + 12345),
                                     st.just(chunk)), label="length")
        return v, d, offset, min(length, size - offset)

    @rule(data=st.data(), ops=st.lists(st.integers(0, 7), min_size=1, max_size=4))
    def guest_io(self, data, ops):
        """A few guest writes (content 0-6: zeros, fills or repeated random data) or trims (7)."""
        for op in ops:
            v, d, offset, length = self._target(data)
            if op == 7:
                self.vms[v].disk(d).trim(offset, length)
                self.trimmed[v, d][offset:offset + length] = True
            else:
                payload = content(op, length)
                self.vms[v].disk(d).write(offset, payload)
                self.shadow[v, d][offset:offset + length] = np.frombuffer(payload, np.uint8)
                self.trimmed[v, d][offset:offset + length] = False

    @rule(data=st.data())
    def standard_checkpoint(self, data):
        """Create or destroy a standard checkpoint: the disks' chains change under the tracking."""
        v = data.draw(st.integers(0, len(self.vms) - 1), label="vm")
        if self.standard[v] and (len(self.standard[v]) == 2 or data.draw(st.booleans(), label="destroy")):
            checkpoint = data.draw(st.sampled_from(self.standard[v]), label="checkpoint")
            checkpoints.destroy(self.vms[v], checkpoint)
            self.standard[v].remove(checkpoint)
        else:
            self.standard[v].append(checkpoints.create(self.vms[v]).instance_id)

    # -- backups ---------------------------------------------------------------------------------

    def _disk_state(self, v: int) -> list[list[str]]:
        """The VM's disks as the guest sees them now, checked against what it wrote."""
        prints = []
        for d, size in enumerate(DISK_SIZES):
            now = self.vms[v].disk(d).read(0, size)
            got = np.frombuffer(now, np.uint8)
            shadow, trimmed = self.shadow[v, d], self.trimmed[v, d]
            # Outside trimmed ranges the disk holds what was written; a trimmed byte reads as zero or as before.
            differ = np.flatnonzero(got != shadow)
            bad = differ[~(trimmed[differ] & (got[differ] == 0))]
            assert not len(bad), f"vm{v} disk {d}: reads differ from the writes at {bad[:5].tolist()}"
            shadow[:] = got
            trimmed[:] = False
            prints.append(fingerprint(now, self.repo.chunk_size))
        return prints

    def _expected_kind(self, v: int, method: str, full: bool) -> str:
        last = self.last[v]
        if full or last is None:
            return "full"
        point, _ = last
        if point not in self.expected:   # forgotten: the VM's only reference point matches no point
            return "full"
        return "incremental"             # whichever method made the base

    def _record(self, v: int, result, method: str, full: bool, state: list[list[str]]) -> None:
        assert result.vm == self.vms[v].name and result.method == method
        expected = self._expected_kind(v, method, full)
        assert result.kind == expected, (result.kind, expected, result.notes)
        if result.kind == "full" and not full:
            assert result.notes, "a backup read in full unasked must say why"
        if result.kind == "incremental":
            assert result.base_point == self.last[v][0]
        point = self.repo.point(result.point_id)
        assert point.kind == result.kind and point.method == method and point.vm_name == result.vm
        assert [d.geometry.virtual_size for d in point.disks] == DISK_SIZES
        event(f"{method} {result.kind}{' (forced)' if full else ''}")
        self.expected[result.point_id] = (result.vm, state)
        self.last[v] = (result.point_id, method)
        self.unchecked.add(result.point_id)
        # The VM keeps exactly one reference point: the one this point names.
        assert [r.instance_id for r in self.vms[v].reference_points()] == [result.reference_point]
        assert not [c for c in self.vms[v].checkpoints() if c.instance_id not in self.standard[v]]

    @rule(data=st.data(), method=st.sampled_from(METHODS), full=st.booleans())
    def backup(self, data, method, full):
        full = full and data.draw(st.booleans(), label="really full")  # forced fulls a quarter of the time
        v = data.draw(st.integers(0, len(self.vms) - 1), label="vm")
        state = self._disk_state(v)
        with self.repo.session() as session:
            result = backup_vm(session, self.vms[v], method=method, full=full)
        self._record(v, result, method, full, state)

    @precondition(lambda self: len(self.vms) == 2)
    @rule(method=st.sampled_from(METHODS), full=st.booleans())
    def backup_both(self, method, full):
        self._backup_all(method, full)

    def _backup_all(self, method: str, full: bool) -> None:
        states = [self._disk_state(v) for v in range(len(self.vms))]
        with self.repo.session() as session:
            results = backup_vms(session, self.vms, method=method, full=full)
        for v, result in enumerate(results):
            assert not isinstance(result, Exception), result
            self._record(v, result, method, full, states[v])

    # -- retention -------------------------------------------------------------------------------

    @rule(data=st.data())
    def forget(self, data):
        """Forget a point: often the VM's newest (the next backup's base), else any."""
        if not self.expected:
            return
        newest = [last[0] for last in self.last.values() if last and last[0] in self.expected]
        # In the order taken: point IDs of VMs backed up together may sort either way from run to run.
        choices = st.sampled_from(list(self.expected))
        point = data.draw(st.sampled_from(newest) | choices if newest else choices, label="point")
        self.repo.forget(point)
        del self.expected[point]
        self.unchecked.discard(point)

    @rule()
    def prune(self):
        event(f"prune leaving {len(self.expected)} points")
        self.repo.prune()
        assert self.repo.verify(read_data=True) == []
        self.unchecked = set(self.expected)  # every remaining point must still restore

    # -- the properties --------------------------------------------------------------------------

    @invariant()
    def points_match_the_model(self):
        if self.repo is not None:
            assert self.repo.point_ids() == sorted(self.expected)

    @invariant()
    def unchecked_points_restore_bit_identical(self):
        for point in sorted(self.unchecked):
            self._check_restore(point)
        self.unchecked.clear()

    def _check_restore(self, point: str) -> None:
        vm_name, prints = self.expected[point]
        for d, size in enumerate(DISK_SIZES):
            self.restored += 1
            target = os.path.join(self.dir, f"restored{self.restored}.raw")
            restore_disk(self.repo, point, d, target, format="raw")
            got = read_file(target)
            os.unlink(target)
            assert len(got) == size
            restored = fingerprint(got, self.repo.chunk_size)
            wrong = [i for i, (a, b) in enumerate(zip(restored, prints[d])) if a != b]
            assert not wrong, f"point {point} ({vm_name}) disk {d}: chunks {wrong} differ from the VM's"

    def teardown(self):
        try:
            if self.repo is not None:
                for point in sorted(self.expected):  # every remaining point, after the last step
                    self._check_restore(point)
                assert self.repo.verify(read_data=True) == []
        finally:
            for vm in self.vms:
                vm.close_disks()
            shutil.rmtree(self.dir, ignore_errors=True)


# Each example builds a host and a repository and backs up megabytes: a sixth of the profile's
# examples (20 in the bounded run, over 330 with --full), 16 steps each.
BackupModel.TestCase.settings = settings(settings.default, max_examples=settings.default.max_examples // 3,
                                         stateful_step_count=16)
test_backup_model = BackupModel.TestCase


# -- deterministic ------------------------------------------------------------------------------------


@pytest.fixture
def scratch():
    path = scratch_dir()
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _image(vm, index: int) -> bytes:
    return vm.disk(index).read(0, DISK_SIZES[index])


def _write_history(vm, step: int, chunk: int) -> None:
    """Step ``step`` of a fixed guest write history: unaligned writes across chunk boundaries, a
    repeated pattern at two places, and a trim."""
    rng = np.random.default_rng(step)
    for d, size in enumerate(DISK_SIZES):
        vm.disk(d).write(int(rng.integers(0, size - 3 * chunk)), content(10 + step, int(rng.integers(1, 2 * chunk))))
        vm.disk(d).write(size - 5000, content(4 + step % 2, 5000))      # the tail, with dedup across steps
        vm.disk(d).write(step * chunk, content(20, chunk))               # the same chunk at another place
        if step % 3 == 2:
            vm.disk(d).trim(int(rng.integers(0, size // chunk)) * chunk, chunk)


def test_alternating_methods_restore_every_point(scratch):
    chunk = 256 * KiB
    host = Host.init(str(scratch / "host"))
    repo = Repository.init(str(scratch / "repo"), chunk_size=chunk)
    vm = host.create_vm("alt", DISK_SIZES, block_size=BLOCK_SIZE)
    vm.request_state_change("start")
    images, kinds = {}, []
    methods = ["virtdisk", "virtdisk", "export", "export", "virtdisk", "export"]
    for step, method in enumerate(methods):
        _write_history(vm, step, chunk)
        before = [_image(vm, d) for d in range(len(DISK_SIZES))]
        with repo.session() as session:
            result = backup_vm(session, vm, method=method)
        images[result.point_id] = before
        kinds.append(result.kind)
        if result.kind == "full" and step:
            assert result.notes
    # First full; all else incremental, whichever method made the base.
    assert kinds == ["full"] + ["incremental"] * 5
    for point, before in images.items():
        for d in range(len(DISK_SIZES)):
            target = scratch / f"{point}-{d}.raw"
            restore_disk(repo, point, d, str(target), format="raw")
            assert target.read_bytes() == before[d], (point, d)
    # The whole VM too, from an incremental point, next to the original (so under a new ID).
    point = list(images)[4]
    restored = restore_vm(repo, point, host, name="alt-restored")
    assert restored.vm_id != vm.vm_id
    restored.request_state_change("start")
    assert [_image(restored, d) for d in range(len(DISK_SIZES))] == images[point]
    restored.close_disks()
    assert repo.verify(read_data=True) == []


def test_both_methods_store_identical_chunk_lists(scratch):
    """Two VMs with the same disks and the same write history: an incremental of each by a different
    method gives the same chunk lists, full and incremental alike."""
    chunk = 256 * KiB
    host = Host.init(str(scratch / "host"))
    repo = Repository.init(str(scratch / "repo"), chunk_size=chunk)
    vms = {}
    for method in METHODS:
        vms[method] = host.create_vm(f"by-{method}", DISK_SIZES, block_size=BLOCK_SIZE)
        vms[method].request_state_change("start")
    chunk_lists = []
    for step in range(3):
        results = {}
        for method, vm in vms.items():
            _write_history(vm, step, chunk)
            with repo.session() as session:
                results[method] = backup_vm(session, vm, method=method)
        assert _image(vms["virtdisk"], 0) == _image(vms["export"], 0)
        assert [r.kind for r in results.values()] == ["full" if step == 0 else "incremental"] * 2
        lists = [[d.chunks.to_json() for d in repo.point(r.point_id).disks] for r in results.values()]
        assert lists[0] == lists[1], step
        chunk_lists.append(lists[0])
    assert chunk_lists[1] != chunk_lists[2]  # the history did change the disks between the points
