"""Which host owns a file, so that commands changing disk files directly (``hvbackup disk merge``,
``check --repair``, ``tracking on/off``, ``create``/``convert`` into a host's directory) leave a
host's files to the host.

A file belongs to a host when its real path (symlinks and relative paths resolved) lies in a
directory holding ``host.json``. The host's metadata (``host.json``, ``host.lock``) and everything
under its ``vms/`` directory are the host's; a disk file a VM's document records, or one of its
change tracking side files, is that VM's. Other files in a host directory (a backup's temporary
export, say) belong to nobody, but ``changing`` holds the host's lock while they change, so no host
operation runs meanwhile.

Finding the host walks up from the file to the file system root, one stat per level: cheap for a
file in no host. Hard links are not followed: a second name outside the host directory is a file
the host does not know about.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from hvbackup.errors import HostError
from hvbackup.host import store
from hvbackup.host.host import Host
from hvbackup.host.returns import INVALID_PARAMETER, SYSTEM_IN_USE
from hvbackup.host.store import STAGING_SUFFIX
from hvbackup.host.vm import Vm

HOST_METADATA = ("host.json", "host.lock")
SIDE_FILE_SUFFIXES = (".rct", ".mrt")  # change tracking's files beside a disk (tracking/sidefiles.py)


@dataclass(frozen=True)
class Owner:
    """The host in ``host_directory`` and, if a VM's document records the file, that VM."""

    host_directory: str
    vm_id: str | None = None
    vm_name: str | None = None

    def __str__(self) -> str:
        if self.vm_id is None:
            return f"host {self.host_directory}"
        return f"VM {self.vm_name} of host {self.host_directory}"

    def hint(self) -> str:
        return ("hvbackup checkpoint delete" if self.vm_id is not None
                else "hvbackup checkpoint clean removes files no VM records")


def owner_of(path: str) -> Owner | None:
    """Who owns ``path`` (which need not exist yet), or None if no host does."""
    real = _real_path(path)
    host_directory = _enclosing_host(real)
    return None if host_directory is None else _owner_in(host_directory, real)


def refuse_if_owned(paths: str | Iterable[str], action: str) -> None:
    """HostError 32774 if a host owns any of ``paths`` (checked under that host's lock)."""
    with changing(paths, action):
        pass


@contextlib.contextmanager
def changing(paths: str | Iterable[str], action: str) -> Iterator[None]:
    """Refuse, as ``refuse_if_owned`` does, then hold the lock of every host whose directory holds
    one of ``paths`` until the block ends, so that the answer stays true while the caller changes
    the files. Usage: ``with changing([child, parent], "merge"): stack.merge(child)``."""
    located = []
    for path in [paths] if isinstance(paths, (str, bytes, os.PathLike)) else paths:
        real = _real_path(path)
        located.append((path, real, _enclosing_host(real)))
    with contextlib.ExitStack() as held:
        # Always in one order, so two callers never wait for each other.
        for host_directory in sorted({h for _, _, h in located if h is not None}):
            held.enter_context(store.host_lock(host_directory).held())
        for path, real, host_directory in located:
            owner = None if host_directory is None else _owner_in(host_directory, real)
            if owner is not None:
                raise HostError(f"cannot {action} {os.fsdecode(path)}: it belongs to {owner}; change it through "
                                f"the host (e.g. {owner.hint()})", SYSTEM_IN_USE)
        yield


def _real_path(path: str) -> str:
    try:
        return os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError, OSError) as exc:
        raise HostError(f"{path!r} is not a usable path: {exc}", INVALID_PARAMETER) from None


def _enclosing_host(real: str) -> str | None:
    directory = real
    while True:
        if os.path.isfile(os.path.join(directory, "host.json")):
            return directory
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _owner_in(host_directory: str, real: str) -> Owner | None:
    parts = os.path.relpath(real, host_directory).split(os.sep)
    if parts == ["."] or (len(parts) == 1 and parts[0] in HOST_METADATA):
        return Owner(host_directory)
    if parts[0] != "vms":
        return None
    if len(parts) < 3 or parts[1].endswith(STAGING_SUFFIX):
        return Owner(host_directory)
    vm = Vm(Host(host_directory), parts[1])
    try:
        document = vm.load()
    except HostError:  # a damaged document records nothing we can trust: the host's
        return Owner(host_directory)
    recorded = {name for tree in document["files"].values() for name in tree}
    in_vm = os.path.join(*parts[2:])
    if in_vm in recorded or any(in_vm.endswith(s) and in_vm[:-len(s)] in recorded for s in SIDE_FILE_SUFFIXES):
        return Owner(host_directory, vm.vm_id, document["config"]["name"])
    return Owner(host_directory)
