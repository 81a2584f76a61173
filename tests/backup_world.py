"""What the backup commands' tests share: a host and a repository named to every command by the
environment, running VMs with data, and what a restore must give back."""

from __future__ import annotations

import hashlib
import random
import subprocess

import pytest

from hvbackup import disks
from hvbackup.backup.repository import Repository
from hvbackup.host import Host
from hvbackup.units import MiB

SIZES = (16 * MiB, 8 * MiB + 512 * 1024)  # a tail chunk on disk 1


@pytest.fixture
def where(monkeypatch, tmp_path):
    """A host and a 1 MiB-chunk repository, named to every command by HVBACKUP_HOST and HVBACKUP_REPO."""
    host = Host.init(str(tmp_path / "host"))
    Repository.init(str(tmp_path / "repo"), chunk_size=MiB)
    monkeypatch.setenv("HVBACKUP_HOST", str(tmp_path / "host"))
    monkeypatch.setenv("HVBACKUP_REPO", str(tmp_path / "repo"))
    monkeypatch.delenv("HVBACKUP_PASSPHRASE", raising=False)
    return host, tmp_path


def guest_write(vm, index: int, offset: int, data: bytes) -> None:
    """Write as the guest, then let go of the disk files: the commands open the host on their own."""
    vm.disk(index).write(offset, data)
    vm.close_disks()


def new_vm(host: Host, name: str = "web", sizes=SIZES):
    """A running VM with some data on every disk."""
    vm = host.create_vm(name, list(sizes), block_size=MiB)
    vm.request_state_change("start")
    fill = random.Random(name)
    for index in range(len(sizes)):
        guest_write(vm, index, index * 3 * MiB + 4096, fill.randbytes(2 * MiB + 777 * 512))
    return vm


def digests(vm) -> list[str]:
    """What the guest sees on each disk now."""
    found = [hashlib.sha256(vm.disk(i).read(0, vm.disk(i).size)).hexdigest() for i in range(len(vm.config.disks))]
    vm.close_disks()
    return found


def file_digest(path) -> str:
    with disks.open(str(path), read_only=True) as disk:
        return hashlib.sha256(disk.read(0, disk.size)).hexdigest()


def error(result: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed as docs/cli.md promises: exit 2, one line, no traceback, saying ``words``."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("hvbackup: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert all(w in result.stderr for w in words), result.stderr
    return result.stderr
