"""The backup repository (hvbackup.backup.repository): round trips, dedup, zero chunks and tails,
encryption, a stateful model of puts/commits/forgets/prunes, corruption, a full filesystem, the lock,
and writers and prunes SIGKILLed at random moments. Real files throughout."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hvbackup.backup.chunks import chunk_path
from hvbackup.backup.geometry import Geometry
from hvbackup.backup.manifest import decode as decode_manifest
from hvbackup.backup.repository import DEFAULT_CHUNK_SIZE, Repository
from hvbackup.errors import RepositoryCorruptError, RepositoryError, RepositoryLockedError

SMALL = 64 << 10  # the smallest chunk size keeps most tests fast
def geometry(size: int) -> Geometry:
    return Geometry(size, 1 << 20, 512, 4096)


def pattern(key: int, length: int) -> bytes:
    """Deterministic, incompressible bytes for a key (0 gives zeros)."""
    if key == 0:
        return bytes(length)
    return np.random.default_rng(key).integers(0, 256, length, dtype=np.uint8).tobytes()


def store(repo: Repository, images: list[bytes], fields: dict | None = None) -> str:
    with repo.writer() as w:
        for index, image in enumerate(images):
            w.add_disk(index, geometry(len(image)))
            for offset in range(0, len(image), repo.chunk_size):
                w.put(index, offset, image[offset: offset + repo.chunk_size])
        return w.commit(fields or {})


def read_back(repo: Repository, point_id: str, index: int) -> bytes:
    return b"".join(data for _, data in repo.read_disk(point_id, index))


def chunk_files(repo: Repository) -> list[Path]:
    return [p for p in Path(repo.path, "chunks").rglob("*") if p.is_file()]


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


# -- round trips and dedup


def test_round_trip_dedup_across_disks_and_points(tmp_path):
    repo = Repository.init(tmp_path / "r")
    chunk = repo.chunk_size
    assert chunk == DEFAULT_CHUNK_SIZE == 1 << 20
    disk0 = pattern(1, 3 * chunk) + pattern(2, chunk + 12345)
    disk1 = pattern(1, 3 * chunk)  # the same chunks as disk 0's first three: stored once
    first = store(repo, [disk0, disk1], {"vm_name": "web", "vm_config": {"memory": 1024}, "rct_ids": ["rct:1"]})
    assert len(chunk_files(repo)) == 5

    second = store(repo, [disk0, disk1], {"vm_name": "web"})
    assert repo.point(second).bytes_stored < 1 << 20
    assert repo.point(second).bytes_read == len(disk0) + len(disk1)
    assert len(chunk_files(repo)) == 5
    for point_id in (first, second):
        assert read_back(repo, point_id, 0) == disk0
        assert read_back(repo, point_id, 1) == disk1
    summary = Repository.open(repo.path).points()
    assert [p.point_id for p in summary] == [first, second]
    assert summary[0].vm_config == {"memory": 1024} and summary[0].rct_ids == ["rct:1"]
    assert summary[0].disks[0].geometry.virtual_size == len(disk0)
    assert repo.verify(read_data=True) == []


def test_zero_chunks_are_not_stored_and_tails_round_trip(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    image = bytes(SMALL) + pattern(3, SMALL) + bytes(SMALL) + pattern(4, 1000)
    point = store(repo, [image, bytes(100)])
    chunks = repo.point(point).disks[0].chunks
    assert chunks.slots.tolist() == [1, 3] and chunks.count == 4
    assert chunks.to_json() == [1, chunks.name_at(1), 1, chunks.name_at(3)]
    assert repo.point(point).disks[1].chunks.to_json() == [1]
    assert len(chunk_files(repo)) == 2
    assert read_back(repo, point, 0) == image and read_back(repo, point, 1) == bytes(100)
    assert [o for o, _ in repo.read_disk(point, 0, zeros=False)] == [SMALL, 3 * SMALL]


def test_incremental_reuses_previous_chunks(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    base = pattern(5, 4 * SMALL)
    full = store(repo, [base])
    previous = repo.point(full).disks[0].chunks
    changed = pattern(6, SMALL)
    with repo.writer() as w:
        assert w.add_disk(0, geometry(len(base)), previous) == []  # nothing of the base is lost
        w.put(0, 2 * SMALL, changed)
        w.put(0, 3 * SMALL, bytes(SMALL))  # a slot of the base that becomes zeros
        incremental = w.commit({"reference_point": "rp-1", "method": "virtdisk"})
    assert read_back(repo, incremental, 0) == base[: 2 * SMALL] + changed + bytes(SMALL)
    assert repo.point(incremental).bytes_read == 2 * SMALL
    assert read_back(repo, full, 0) == base  # the base point is untouched


def test_an_incremental_stores_again_what_its_base_lost(tmp_path):
    """A chunk the base references but the repository lacks (deleted, or set aside by verify) must
    be put again: the writer says which slots, and refuses to commit without them."""
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    base = pattern(5, 2 * SMALL) + pattern(5, 2 * SMALL)  # slots 0, 2 and 1, 3 share chunks
    full = store(repo, [base])
    previous = repo.point(full).disks[0].chunks
    os.unlink(chunk_path(repo.path, previous.name_at(1)))
    with repo.writer() as w:
        assert w.add_disk(0, geometry(len(base)), previous) == [1, 3]
        w.put(0, SMALL, base[SMALL: 2 * SMALL])
        with pytest.raises(RepositoryError, match="offset 196608 is lost"):
            w.commit({})
        w.put(0, 3 * SMALL, base[3 * SMALL:])
        healed = w.commit({})
    assert read_back(repo, healed, 0) == base
    assert read_back(repo, full, 0) == base  # the same chunk name: the old point is whole again
    assert repo.verify(read_data=True) == []


def test_writer_refuses_bad_use(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    with repo.writer() as w:
        w.add_disk(0, geometry(2 * SMALL))
        with pytest.raises(RepositoryError, match="chunk boundary"):
            w.put(0, 100, b"x")
        with pytest.raises(RepositoryError, match="expected"):
            w.put(0, 0, b"x")
        with pytest.raises(RepositoryError, match="unknown manifest fields"):
            w.commit({"colour": "red"})
        with pytest.raises(RepositoryError, match="in order"):
            w.add_disk(2, geometry(SMALL))
    assert repo.point_ids() == []
    outside = repo.session().writer()  # a session that never took the lock
    with pytest.raises(RepositoryError, match="not open"):
        outside.add_disk(0, geometry(SMALL))
    with repo.writer() as w:
        w.commit({})
        with pytest.raises(RepositoryError, match="not open"):
            w.commit({})
    with pytest.raises(RepositoryError, match="chunk size"):
        Repository.init(tmp_path / "other", chunk_size=SMALL + 4096)
    with pytest.raises(RepositoryError, match="not a repository"):
        Repository.open(tmp_path)


def test_puts_from_several_threads(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    image = b"".join(pattern(k % 5, SMALL) for k in range(40)) + pattern(6, 10)
    with repo.writer() as w:
        w.add_disk(0, geometry(len(image)))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda off: w.put(0, off, image[off: off + SMALL]), range(0, len(image), SMALL)))
        point = w.commit({})
    assert read_back(repo, point, 0) == image
    assert len(chunk_files(repo)) == 5 and repo.verify(read_data=True) == []


# -- encryption


def test_encryption_round_trip_and_wrong_passphrase(tmp_path):
    repo = Repository.init(tmp_path / "r", passphrase="correct horse", chunk_size=SMALL)
    image = pattern(8, 2 * SMALL + 7) + bytes(SMALL)
    point = store(repo, [image], {"vm_name": "secret-vm"})
    opened = Repository.open(repo.path, passphrase="correct horse")
    assert read_back(opened, point, 0) == image
    assert opened.verify(read_data=True) == []
    # Keyed names: the plain BLAKE3 of a chunk is not its name, and no file holds the VM name in clear.
    assert blake3(image[:SMALL]).hexdigest() not in repo.point(point).disks[0].chunks.to_json()
    assert all(b"secret-vm" not in p.read_bytes() for p in Path(repo.path).rglob("*") if p.is_file())
    with pytest.raises(RepositoryError, match="wrong passphrase"):
        Repository.open(repo.path, passphrase="wrong")
    with pytest.raises(RepositoryError, match="encrypted"):
        Repository.open(repo.path)


def test_encrypted_chunk_tampering_fails_authentication(tmp_path):
    repo = Repository.init(tmp_path / "r", passphrase="pw", chunk_size=SMALL)
    point = store(repo, [pattern(9, SMALL)])
    path = Path(chunk_path(repo.path, repo.point(point).disks[0].chunks.name_at(0)))
    data = bytearray(path.read_bytes())
    data[40] ^= 1  # inside the sealed payload; recompute the outer checksum so only the AEAD can notice
    data[-32:] = blake3(bytes(data[:-32])).digest()
    path.write_bytes(bytes(data))
    with pytest.raises(RepositoryCorruptError, match="authentication failed"):
        read_back(repo, point, 0)


# -- stateful model


class RepositoryModel(RuleBasedStateMachine):
    """Random puts, commits (full and incremental), forgets and prunes against a dict of expected images."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="repo-model-")
        self.repo = Repository.init(os.path.join(self.dir, "r"), chunk_size=SMALL)
        self.expected: dict[str, list[bytes]] = {}

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(disks=st.lists(st.tuples(st.integers(0, 4 * SMALL + 100), st.lists(st.integers(0, 4), min_size=5,
                                                                                max_size=5)),
                         min_size=1, max_size=3))
    def commit_full(self, disks):
        # Chunk contents come from a pool of five keys, so dedup across disks and points happens often.
        images = [b"".join(pattern(k, SMALL) for k in keys)[:size] for size, keys in disks]
        self.expected[store(self.repo, images)] = images

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def commit_incremental(self, data):
        base = data.draw(st.sampled_from(sorted(self.expected)))
        previous = self.repo.point(base).disks
        images = []
        with self.repo.writer() as w:
            for index, disk in enumerate(previous):
                image = bytearray(self.expected[base][index])
                assert w.add_disk(index, disk.geometry, disk.chunks) == []
                for i in range(disk.chunks.count):
                    offset = i * SMALL
                    if data.draw(st.booleans()):
                        piece = pattern(data.draw(st.integers(0, 6)), len(image[offset: offset + SMALL]))
                        image[offset: offset + len(piece)] = piece
                        w.put(index, offset, piece)
                images.append(bytes(image))
            if data.draw(st.booleans()):
                return  # abandoned before commit: must leave no trace
            self.expected[w.commit({"reference_point": base})] = images

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def forget(self, data):
        point = data.draw(st.sampled_from(sorted(self.expected)))
        self.repo.forget(point)
        del self.expected[point]

    @rule()
    def prune(self):
        self.repo.prune()

    @invariant()
    def every_point_reads_back(self):
        assert self.repo.point_ids() == sorted(self.expected)
        for point, images in self.expected.items():
            for index, image in enumerate(images):
                assert read_back(self.repo, point, index) == image

    @invariant()
    def sound(self):
        assert self.repo.verify(read_data=True) == []


# A third of the profile's examples: 20 in CI, over 300 with --full.
RepositoryModel.TestCase.settings = settings(settings.default, max_examples=settings.default.max_examples // 3,
                                             stateful_step_count=8)
test_repository_model = RepositoryModel.TestCase


def test_prune_deletes_only_unreferenced_chunks(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    keep = store(repo, [pattern(10, SMALL) + pattern(11, SMALL)])
    drop = store(repo, [pattern(10, SMALL) + pattern(12, SMALL)])
    assert len(chunk_files(repo)) == 3
    repo.forget(drop)
    assert len(chunk_files(repo)) == 3  # forget removes the manifest only
    result = repo.prune()
    assert result["chunks_deleted"] == 1 and result["chunks_kept"] == 2
    assert read_back(repo, keep, 0) == pattern(10, SMALL) + pattern(11, SMALL)
    with pytest.raises(RepositoryError, match="no restore point"):
        repo.point(drop)


# -- corruption


@pytest.mark.parametrize("at", [0, 9, 20, 30, 100, -1])
def test_flipped_byte_in_a_chunk_is_found(tmp_path, at):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    point = store(repo, [pattern(13, SMALL)])
    name = repo.point(point).disks[0].chunks.name_at(0)
    flip(Path(chunk_path(repo.path, name)), at)
    # A damaged frame header no longer fits the file, which even the plain check sees; past the
    # header only reading the data can tell.
    assert bool(repo.verify()) == (0 <= at < 24)
    problems = repo.verify(read_data=True)
    assert name in problems[0] and any(point in p and "damaged" in p for p in problems)
    # verify set the chunk aside, so the next writer that has its data stores it again
    assert Path(repo.path, "damaged", "chunks", name).exists() and not Path(chunk_path(repo.path, name)).exists()
    with pytest.raises(RepositoryCorruptError, match="missing"):
        read_back(repo, point, 0)
    again = store(repo, [pattern(13, SMALL)])
    assert read_back(repo, point, 0) == read_back(repo, again, 0) == pattern(13, SMALL)
    assert repo.verify(read_data=True) == []


@pytest.mark.parametrize("at", [0, 9, 17, 30, -5])
def test_flipped_byte_in_a_manifest_is_found(tmp_path, at):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    point = store(repo, [pattern(14, SMALL)])
    flip(Path(repo.path, "points", point), at)
    problems = repo.verify()
    assert len(problems) == 1 and point in problems[0]
    with pytest.raises(RepositoryCorruptError):
        repo.point(point)
    with pytest.raises(RepositoryError, match="damaged"):
        repo.prune()  # never delete chunks a damaged manifest might still need
    assert len(chunk_files(repo)) == 1


@pytest.mark.parametrize("at", [0, 9, 17, 40, -1])
def test_flipped_byte_in_the_config_is_refused(tmp_path, at):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    flip(Path(repo.path, "config"), at)
    with pytest.raises(RepositoryCorruptError, match="config"):
        Repository.open(repo.path)


@pytest.fixture(scope="module")
def fuzz_repo(tmp_path_factory) -> Repository:
    repo = Repository.init(tmp_path_factory.mktemp("fuzz") / "r", chunk_size=SMALL)
    store(repo, [pattern(22, SMALL) + bytes(100)])
    return repo


@given(st.data())
def test_damaged_files_raise_only_repository_errors(fuzz_repo, data):
    """Whatever bytes a chunk or manifest file holds, reading it gives a RepositoryError, never
    another exception or a wrong answer."""
    repo = fuzz_repo
    name = repo.codec.name(pattern(22, SMALL))
    good_chunk, point = repo.codec.encode(name, pattern(22, SMALL)), repo.point_ids()[0]
    good_manifest = Path(repo.path, "points", point).read_bytes()
    for good, read in ((good_chunk, lambda b: repo.codec.decode(name, b)),
                       (good_manifest, lambda b: decode_manifest(b, point, None, repo.id, SMALL))):
        damaged = bytearray(good)
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(damaged) - 1))
            damaged[at] = data.draw(st.integers(0, 255))
        damaged = damaged[: data.draw(st.integers(0, len(damaged)))] + data.draw(st.binary(max_size=64))
        if len(damaged) > 56 and data.draw(st.booleans()):
            damaged[-32:] = blake3(bytes(damaged[:-32])).digest()  # get past the checksum to the parsers
        if bytes(damaged) == good:
            continue
        with pytest.raises(RepositoryError):
            read(bytes(damaged))


def test_deleted_chunk_is_reported(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    point = store(repo, [pattern(15, SMALL) + pattern(16, SMALL)])
    name = repo.point(point).disks[0].chunks.name_at(1)
    os.unlink(chunk_path(repo.path, name))
    problems = repo.verify()
    assert len(problems) == 1 and "missing" in problems[0] and name in problems[0]
    with pytest.raises(RepositoryCorruptError, match="missing"):
        read_back(repo, point, 0)


def test_torn_chunk_file_is_rewritten_not_trusted(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    data = pattern(17, SMALL)
    torn = Path(chunk_path(repo.path, repo.codec.name(data).hex()))
    torn.write_bytes(b"HVBKCHNK" + bytes(10))  # what a crash without fsync could leave
    point = store(repo, [data])
    assert read_back(repo, point, 0) == data and repo.verify(read_data=True) == []


# -- the lock, a full disk, crashes


def test_second_writer_is_refused(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    with repo.writer():
        with pytest.raises(RepositoryLockedError, match=f"pid {os.getpid()}"):
            Repository.open(repo.path).writer().__enter__()
        with pytest.raises(RepositoryLockedError):
            repo.prune()
    assert store(repo, [pattern(18, SMALL)])


def _run_child(code: str, *args) -> subprocess.Popen:
    tests = str(Path(__file__).parent)
    return subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {tests!r}); {code}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def write_until_full(path: str) -> None:
    """Child: with files capped at 100 KiB (as a full disk would refuse writes), store a point whose
    chunks do not fit; print the error the writer raised."""
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-limit write then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100 << 10, 100 << 10))
    try:
        store(Repository.open(path), [pattern(19, SMALL * 4)])
    except RepositoryError as exc:
        print(exc)


def test_failed_write_leaves_repository_valid(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=256 << 10)
    first = store(repo, [pattern(20, 100)])
    child = _run_child("import test_repository as t; t.write_until_full(sys.argv[1])", repo.path)
    out, err = child.communicate(timeout=60)
    assert "cannot store chunk" in out, err
    assert repo.point_ids() == [first] and repo.verify(read_data=True) == []
    second = store(repo, [pattern(19, SMALL * 4)])
    assert read_back(repo, second, 0) == pattern(19, SMALL * 4)
    assert os.listdir(Path(repo.path, "tmp")) == []


def crash_image(seed: int, disk: int) -> bytes:
    """What the crash workload stores for a seed: a pool of keys, so points share chunks."""
    rng = random.Random(seed * 10 + disk)
    return b"".join(pattern(rng.choice([0, 1, 2, 3, seed * 10 + disk + 100]), SMALL) for _ in range(6))[:-999]


def crash_workload(path: str) -> None:
    """Child: store points forever, keeping the newest four (forget the oldest, prune); each point's
    seed is in its vm_config so the parent can tell what any point that exists must hold."""
    repo = Repository.open(path)
    for seed in range(1, 10**6):
        store(repo, [crash_image(seed, 0), crash_image(seed, 1)], {"vm_config": {"seed": seed}})
        points = repo.point_ids()
        if len(points) > 4:
            repo.forget(points[0])
            repo.prune()


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_repository_valid(tmp_path, sample):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    rng = random.Random(1234)
    for _ in range(sample(12, 200)):
        child = _run_child("import test_repository as t; t.crash_workload(sys.argv[1])", repo.path)
        time.sleep(rng.uniform(0.3, 1.2))  # interpreter start-up takes a good part of the first 0.3 s
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate()
        assert child.returncode == -signal.SIGKILL, err
        opened = Repository.open(repo.path)
        assert opened.verify(read_data=True) == []
        for point in opened.point_ids():
            seed = opened.point(point).vm_config["seed"]
            for disk in (0, 1):
                assert read_back(opened, point, disk) == crash_image(seed, disk)
    assert Repository.open(repo.path).point_ids(), "no point was ever committed: the kills came too early"
    assert store(repo, [pattern(21, SMALL)])
    assert os.listdir(Path(repo.path, "tmp")) == []  # the next writer cleared what the killed ones left


# -- the command


def test_cli_repo_init(tmp_path, hv, hv_json, monkeypatch):
    made = hv_json("repo", "init", tmp_path / "plain", "--chunk-size", "1M")
    assert made["chunk_size"] == 1 << 20 and made["encrypted"] is False
    assert Repository.open(str(tmp_path / "plain")).id == made["id"]
    monkeypatch.setenv("HVBACKUP_PASSPHRASE", "from-env")
    made = hv_json("repo", "init", tmp_path / "secret", "--encrypt")
    assert made["encrypted"] is True and made["chunk_size"] == 1 << 20
    assert Repository.open(str(tmp_path / "secret"), passphrase="from-env").encrypted
    refused = hv("repo", "init", tmp_path / "secret")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "not an empty directory" in refused.stderr
    text = hv("repo", "init", tmp_path / "third")
    assert text.returncode == 0 and "not encrypted" in text.stdout
    assert json.loads(Path(tmp_path / "third" / "config").read_bytes()[24:-32])["hash"] == "blake3"


def test_a_relative_path_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    repo = Repository.init("relative", chunk_size=SMALL)
    with repo.writer() as w:
        w.add_disk(0, geometry(SMALL))
        w.put(0, 0, pattern(3, SMALL))
        point_id = w.commit({})
    assert [data for _, data in Repository.open("relative").read_disk(point_id, 0)] == [pattern(3, SMALL)]


# -- what a review of the healing found


def test_a_config_whose_id_could_name_a_path_is_refused(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    from hvbackup.backup import envelope
    from hvbackup.backup.repository import CONFIG_MAGIC

    config = json.loads(bytes(envelope.unframe(Path(repo.path, "config").read_bytes(), CONFIG_MAGIC, 1 << 16, "c")[2]))
    for bad in ("../../..", "", "A" * 32, "0" * 31):
        edited = json.dumps({**config, "id": bad}).encode()
        Path(repo.path, "config").write_bytes(envelope.frame(CONFIG_MAGIC, 0, edited))
        with pytest.raises(RepositoryCorruptError, match="not a supported repository configuration"):
            Repository.open(repo.path)


def test_prune_fails_closed_when_a_manifest_cannot_be_read(tmp_path, monkeypatch):
    """A manifest that reads once and fails the next time (a passing I/O error) must stop prune, not
    drop its chunks from the mark."""
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    keep = store(repo, [pattern(30, SMALL)])
    real, calls = Repository._manifest, []

    def flaky(self, directory, point_id):
        calls.append(point_id)
        if len(calls) == 1:
            raise RepositoryCorruptError(f"point {point_id}: cannot be read: Input/output error")
        return real(self, directory, point_id)

    monkeypatch.setattr(Repository, "_manifest", flaky)
    with pytest.raises(RepositoryError, match="cannot tell which chunks"):
        repo.prune()
    monkeypatch.undo()
    assert read_back(repo, keep, 0) == pattern(30, SMALL)


def test_a_manifest_too_large_for_readers_is_never_committed(tmp_path, monkeypatch):
    from hvbackup.backup import manifest

    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    monkeypatch.setattr(manifest, "MAX_STORED", 200)
    with pytest.raises(RepositoryError, match="larger chunks"):
        store(repo, [pattern(31, 8 * SMALL)])
    assert repo.point_ids() == []


def test_repair_reports_what_it_could_not_set_aside(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    point = store(repo, [pattern(32, SMALL)])
    name = repo.point(point).disks[0].chunks.name_at(0)
    flip(Path(chunk_path(repo.path, name)), 100)
    Path(repo.path, "damaged").mkdir()
    Path(repo.path, "damaged", "chunks").write_text("a file where the directory belongs")
    result = repo.repair()
    assert any(name in line and "still in place" in line for line in result.remaining), result.remaining


def test_a_passing_read_error_is_neither_reported_nor_set_aside(tmp_path, monkeypatch):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    point = store(repo, [pattern(33, SMALL)])
    real, failed = Repository.read_chunk, []

    def once(self, name_hex):
        if not failed:
            failed.append(name_hex)
            raise RepositoryCorruptError(f"chunk {name_hex} cannot be read: Input/output error")
        return real(self, name_hex)

    monkeypatch.setattr(Repository, "read_chunk", once)
    result = repo.repair()
    assert failed and result.moved_points == {} and result.remaining == []
    assert repo.point_ids() == [point] and repo.verify(read_data=True) == []


def test_a_torn_base_chunk_is_put_again(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    base = store(repo, [pattern(34, SMALL) + pattern(35, SMALL)])
    index = repo.point(base).disks[0].chunks
    torn = Path(chunk_path(repo.path, index.name_at(1)))
    torn.write_bytes(torn.read_bytes()[:100])
    with repo.writer() as w:
        assert w.add_disk(0, geometry(2 * SMALL), index) == [1]


def test_fields_another_version_stored_are_kept_and_encoded_again(tmp_path):
    """A point with fields this version does not know reads, and encodes to the bytes it was stored as."""
    import zstandard

    from hvbackup.backup import envelope, manifest

    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    point = store(repo, [pattern(37, SMALL)])
    document = repo.point(point).to_dict()
    document["disks"][0]["label"] = "system"
    document["tags"] = ["nightly"]
    payload = zstandard.ZstdCompressor(level=3).compress(json.dumps(document, separators=(",", ":")).encode())
    stored = envelope.frame(manifest.MAGIC, envelope.FLAG_COMPRESSED, payload)
    decoded = manifest.decode(stored, point, None, repo.id, SMALL)
    assert decoded.extra == {"tags": ["nightly"]} and decoded.disks[0].extra == {"label": "system"}
    assert manifest.encode(decoded, None) == stored


def test_a_manifest_with_absurd_numbers_is_one_damaged_point(tmp_path):
    """Valid frame and JSON, but a size no disk has, or fields of the wrong type: damaged, not a crash
    of every command."""
    from dataclasses import replace

    from hvbackup.backup import manifest
    from hvbackup.backup.index import ChunkIndex

    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    good = store(repo, [pattern(36, SMALL)])
    doc = manifest.Manifest("", repo.id, SMALL)
    bad_docs = [replace(doc, disks=[manifest.Disk(0, geometry((10 ** 30 + 1) * SMALL),
                                                  ChunkIndex.empty(0))]),
                replace(doc, rct_ids=5), replace(doc, vm_id=["x"])]
    for n, bad in enumerate(bad_docs):
        point_id = f"20990101T00000{n}.000000Z-0000000{n}"
        raw = manifest.encode(replace(bad, point_id=point_id), None)
        Path(repo.path, "points", point_id).write_bytes(raw)
    scan = repo.scan()
    assert [p.point_id for p in scan.points] == [good] and len(scan.damaged) == len(bad_docs)


def test_prune_keeps_the_chunks_of_points_repair_set_aside(tmp_path):
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    old = store(repo, [pattern(37, SMALL) + pattern(38, SMALL)])
    os.unlink(chunk_path(repo.path, repo.point(old).disks[0].chunks.name_at(1)))
    assert old in repo.repair().moved_points
    assert repo.prune()["chunks_deleted"] == 0  # chunk 0 stays: the set-aside point may come back
    shutil.move(os.path.join(repo.path, "damaged", "points", old), os.path.join(repo.path, "points", old))
    store(repo, [pattern(37, SMALL) + pattern(38, SMALL)])  # the lost chunk is stored again
    assert read_back(repo, old, 0) == pattern(37, SMALL) + pattern(38, SMALL)


# -- the pipe (issue 12): what is compressed, and chunk files made durable by the session's sync threads


def chunk_flags(repo: Repository, name_hex: str) -> int:
    from hvbackup.backup import envelope

    return envelope.HEADER.unpack(Path(chunk_path(repo.path, name_hex)).read_bytes()[:envelope.HEADER.size])[2]


def log_text(length: int) -> bytes:
    return (b"1795630132 backup volume sector read ok latency_ms=3 host=web01\n" * (length // 64 + 1))[:length]


@pytest.mark.parametrize("passphrase", [None, "pw"])
def test_incompressible_pieces_are_stored_as_they_are_and_compressible_ones_compressed(tmp_path, passphrase):
    """At the default 1 MiB chunks a piece is sampled before zstd compresses it whole; at 64 KiB it
    is always tried whole. Either way every piece reads back exactly."""
    from hvbackup.backup import envelope

    for chunk in (DEFAULT_CHUNK_SIZE, SMALL):
        repo = Repository.init(tmp_path / f"r{chunk}", passphrase=passphrase, chunk_size=chunk)
        pieces = {
            "random": (pattern(31, chunk), False),
            "text": (log_text(chunk), True),
            "half random, half text": (pattern(32, chunk // 2) + log_text(chunk // 2), True),
            "random with one zero page": (pattern(33, chunk - 4096) + bytes(4096), chunk == SMALL),
        }
        image = b"".join(data for data, _ in pieces.values())
        point = store(repo, [image])
        names = repo.point(point).disks[0].chunks
        for slot, (what, (_, compressed)) in enumerate(pieces.items()):
            flags = chunk_flags(repo, names.name_at(slot))
            assert bool(flags & envelope.FLAG_COMPRESSED) == compressed, (chunk, what)
            assert bool(flags & envelope.FLAG_ENCRYPTED) == (passphrase is not None)
        assert read_back(repo, point, 0) == image
        assert repo.verify(read_data=True) == []


def test_a_compressed_chunk_is_what_a_fresh_level_3_compressor_makes(tmp_path):
    """Compressors are reused per thread: the stored bytes are those of the format, unchanged."""
    import zstandard

    repo = Repository.init(tmp_path / "r")
    data = log_text(repo.chunk_size)
    point = store(repo, [data, data[::-1]])
    for index, piece in enumerate((data, data[::-1])):
        stored = Path(chunk_path(repo.path, repo.point(point).disks[index].chunks.name_at(0))).read_bytes()
        assert stored[24:-32] == zstandard.ZstdCompressor(level=3).compress(piece)


def test_a_sampled_piece_whose_samples_miss_its_redundancy_is_stored_as_it_is(tmp_path):
    """The samples decide: text between them does not make a piece compressed, and it round-trips."""
    from hvbackup.backup import chunks, envelope

    repo = Repository.init(tmp_path / "r")
    chunk = repo.chunk_size
    data = bytearray(pattern(34, chunk))
    step = chunk // chunks.SAMPLES
    for i in range(chunks.SAMPLES):  # text everywhere except at the samples
        data[i * step + chunks.SAMPLE: (i + 1) * step] = log_text(step - chunks.SAMPLE)
    point = store(repo, [bytes(data)])
    assert not chunk_flags(repo, repo.point(point).disks[0].chunks.name_at(0)) & envelope.FLAG_COMPRESSED
    assert read_back(repo, point, 0) == bytes(data)


def test_every_chunk_file_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    import threading

    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    synced, lock = set(), threading.Lock()
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        real_fsync(fd)
        with lock:
            synced.add(os.readlink(f"/proc/self/fd/{fd}"))

    def rename(src, dst):
        if os.path.dirname(os.path.dirname(os.path.realpath(dst))) == os.path.realpath(Path(repo.path, "chunks")):
            with lock:
                assert os.path.realpath(src) in synced, f"{src} renamed to {dst} before its fsync"
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    image = b"".join(pattern(k, SMALL) for k in range(1, 60))
    with repo.writer() as w:
        w.add_disk(0, geometry(len(image)))
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda off: w.put(0, off, image[off: off + SMALL]), range(0, len(image), SMALL)))
        point = w.commit({})
    monkeypatch.undo()
    assert len(chunk_files(repo)) == 59 and read_back(repo, point, 0) == image


def test_a_chunk_that_cannot_be_made_durable_fails_the_point_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import threading

    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    first = store(repo, [pattern(40, SMALL)])
    staging = os.path.realpath(Path(repo.path, "tmp")) + os.sep
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(staging):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(RepositoryError, match="cannot store chunk [0-9a-f]{64}: Input/output error"):
        store(repo, [b"".join(pattern(k, SMALL) for k in range(41, 50))])
    monkeypatch.undo()
    assert not [t for t in threading.enumerate() if t.name.startswith("hvbackup-sync")]
    assert repo.point_ids() == [first] and len(chunk_files(repo)) == 1
    assert os.listdir(Path(repo.path, "tmp")) == [] and repo.verify(read_data=True) == []
    second = store(repo, [pattern(41, SMALL)])
    assert read_back(repo, second, 0) == pattern(41, SMALL)


def test_writers_of_one_session_share_a_chunk_still_on_its_way(tmp_path, monkeypatch):
    """A chunk written but not yet fsynced and renamed is not written again by another writer of
    the session; that writer's commit waits for it."""
    repo = Repository.init(tmp_path / "r", chunk_size=SMALL)
    real_fsync = os.fsync

    def slow_fsync(fd):
        time.sleep(0.3)
        real_fsync(fd)

    data = pattern(42, SMALL)
    with repo.session() as session:
        a, b = session.writer(), session.writer()
        a.add_disk(0, geometry(SMALL))
        b.add_disk(0, geometry(SMALL))
        monkeypatch.setattr(os, "fsync", slow_fsync)
        a.put(0, 0, data)
        b.put(0, 0, data)
        assert a.bytes_stored > 0 and b.bytes_stored == 0
        assert chunk_files(repo) == []  # on its way: still in tmp/
        point_b = b.commit({})
        assert len(chunk_files(repo)) == 1
        point_a = a.commit({})
    monkeypatch.undo()
    assert read_back(repo, point_a, 0) == read_back(repo, point_b, 0) == data
