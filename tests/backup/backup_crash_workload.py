"""The processes the backup crash tests (test_backup_crash.py) kill with SIGKILL.

    python backup_crash_workload.py backup HOST_DIR REPO_DIR LOG SEED
    python backup_crash_workload.py prune REPO_DIR
    python backup_crash_workload.py restore-disk REPO_DIR POINT INDEX TARGET FORMAT
    python backup_crash_workload.py restore-vm REPO_DIR POINT HOST_DIR NAME

``backup`` loops forever on the VM "crash": guest writes to every disk, a marker (the backup's number
``n``, unique across runs: SEED * 1000 + i) in the first 8 bytes of disk 0, a flush, then
``B n sha256(disk 0) sha256(disk 1) …`` appended to LOG and fsynced, then a backup (methods
alternating, every fifth one full), then ``C n POINT_ID``. A restore point whose disk 0 starts with
``n`` must therefore restore to exactly the hashes of ``B n``; the kill may fall anywhere, including
between the commit and the ``C`` line.

The other modes print ``ready`` once everything is imported and opened, run their one operation,
print ``done`` and then wait to be killed (an encrypted repository's passphrase comes from
``HVBACKUP_PASSPHRASE``), so the parent can aim its kill at the operation itself
and tell afterwards whether it landed inside it.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time

from hvbackup.backup.engine import METHODS, backup_vm
from hvbackup.backup.repository import Repository
from hvbackup.backup.restore import restore_disk, restore_vm
from hvbackup.host import Host

GRAIN = 4096
MARKER = 8


def disk_hash(disk) -> str:
    return hashlib.sha256(disk.read(0, disk.size)).hexdigest()


def guest_writes(vm, rng: random.Random, n: int) -> None:
    """A few writes of random, partly compressible data to every disk, then the marker ``n``."""
    for index in range(len(vm.config.disks)):
        disk = vm.disk(index)
        for _ in range(rng.randint(1, 6)):
            length = rng.choice([GRAIN, 16 * GRAIN, rng.randint(1, 64) * GRAIN])
            offset = rng.randrange(0, disk.size - length + 1) // GRAIN * GRAIN
            data = rng.randbytes(length // 2) + bytes([rng.randrange(256)]) * (length - length // 2)
            disk.write(offset, data)
        if index == 0:
            disk.write(0, n.to_bytes(MARKER, "little") + rng.randbytes(GRAIN - MARKER))
        disk.flush()


def backups(host_dir: str, repo_dir: str, log: str, seed: int) -> None:
    rng = random.Random(seed)
    host = Host.open(host_dir)
    vm = host.vm("crash")
    repo = Repository.open(repo_dir)
    journal = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(1, 1000):
        n = seed * 1000 + i
        guest_writes(vm, rng, n)
        hashes = [disk_hash(vm.disk(index)) for index in range(len(vm.config.disks))]
        os.write(journal, f"B {n} {' '.join(hashes)}\n".encode())
        os.fsync(journal)
        with repo.session() as session:
            result = backup_vm(session, vm, method=METHODS[i % 2], full=rng.random() < 0.2)
        os.write(journal, f"C {n} {result.point_id}\n".encode())
        os.fsync(journal)


def announce(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


def one_operation(mode: str, args: list[str]) -> None:
    repo = Repository.open(args[0], passphrase=os.environ.get("HVBACKUP_PASSPHRASE"))
    if mode == "prune":
        announce("ready")
        repo.prune()
    elif mode == "restore-disk":
        point, index, target, format = args[1], int(args[2]), args[3], args[4]
        announce("ready")
        restore_disk(repo, point, index, target, format=format)
    elif mode == "restore-vm":
        point, host_dir, name = args[1], args[2], args[3]
        host = Host.open(host_dir)
        announce("ready")
        restore_vm(repo, point, host, name=name)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    announce("done")
    time.sleep(3600)


if __name__ == "__main__":
    if sys.argv[1] == "backup":
        backups(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        one_operation(sys.argv[1], sys.argv[2:])
