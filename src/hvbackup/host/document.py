"""The VM document's shape (docs/host.md, *The VM document*), checked every time it is read or
written.

A vm.json that was truncated, hand-edited or written by something else must be reported as damaged,
naming the file, before any operation trusts it: otherwise a missing key or a wrong type surfaces as
a KeyError deep inside a merge, and one VM's bad document stops work on every other VM. Besides the
types, the checks cover what the operations rely on: file names stay inside the VM directory, each
disk's file tree has no loops and its chain follows it, every checkpoint's frozen file is in that
tree, and timestamps parse. Keys a newer version may add are ignored.
"""

from __future__ import annotations

import datetime
import os

from hvbackup.host.model import SNAPSHOT_TYPE_FULL, SNAPSHOT_TYPE_RECOVERY, VmState

MAX_PID = 2 ** 31 - 1
_STATES = {int(s) for s in VmState}


class DocumentProblem(Exception):
    """What is wrong with a document, and where; the caller names the file."""


def check_vm_document(document: object) -> None:
    """Raise DocumentProblem unless ``document`` has the shape of a VM document."""
    doc = _object(document, "the document", ("config", "state", "files", "checkpoints", "reference_points"))
    config = check_config(doc["config"], "config")
    _choice(doc["state"], _STATES, "state")
    files = _files(doc["files"])
    for i, disk in enumerate(config["disks"]):
        _chain_follows_tree(disk, files, f"config.disks[{i}]")
    for i, entry in enumerate(_list(doc["checkpoints"], "checkpoints")):
        _checkpoint(entry, files, f"checkpoints[{i}]")
    if doc.get("current_checkpoint") is not None:
        _text(doc["current_checkpoint"], "current_checkpoint")
    for i, entry in enumerate(_list(doc["reference_points"], "reference_points")):
        _reference_point(entry, f"reference_points[{i}]")
    _intent(doc.get("intent"))


def check_config(config: object, where: str) -> dict:
    """A VmConfig as a dict (a VM's, a checkpoint's or an export's)."""
    config = _object(config, where, ("vm_id", "name", "processors", "memory_mb", "notes", "disks"))
    _text(config["vm_id"], f"{where}.vm_id")
    _text(config["name"], f"{where}.name")
    _whole(config["processors"], f"{where}.processors", minimum=0)  # older versions did not insist on 1
    _whole(config["memory_mb"], f"{where}.memory_mb", minimum=0)
    _text(config["notes"], f"{where}.notes")
    for i, disk in enumerate(_list(config["disks"], f"{where}.disks")):
        here = f"{where}.disks[{i}]"
        disk = _object(disk, here, ("instance_id", "chain"))
        _text(disk["instance_id"], f"{here}.instance_id")
        chain = _list(disk["chain"], f"{here}.chain")
        if not chain:
            raise DocumentProblem(f"{here}.chain is empty")
        for j, name in enumerate(chain):
            _relative_path(name, f"{here}.chain[{j}]")
        _whole(disk.get("controller", 0), f"{here}.controller")
        _whole(disk.get("location", 0), f"{here}.location")
    return config


def _files(files: object) -> dict[str, dict[str, str | None]]:
    """Per disk, every file of its tree and its parent: parents in the same tree, no loops."""
    files = _object(files, "files", ())
    for instance_id, tree in files.items():
        tree = _object(tree, f"files[{instance_id!r}]", ())
        for name, parent in tree.items():
            _relative_path(name, f"a file of disk {instance_id}")
            if parent is not None and parent not in tree:
                raise DocumentProblem(f"files[{instance_id!r}]: the parent of {name!r} is not in the tree")
        for name in tree:
            seen = {name}
            while tree[name] is not None:
                name = tree[name]
                if name in seen:
                    raise DocumentProblem(f"files[{instance_id!r}]: the parents of {name!r} form a loop")
                seen.add(name)
    return files


def _chain_follows_tree(disk: dict, files: dict, where: str) -> None:
    tree = files.get(disk["instance_id"])
    if tree is None:
        raise DocumentProblem(f"{where}: disk {disk['instance_id']} has no entry in files")
    chain = disk["chain"]
    for parent, child in zip([None, *chain], chain):
        if child not in tree or tree[child] != parent:
            raise DocumentProblem(f"{where}.chain does not follow the disk's file tree at {child!r}")


def _checkpoint(entry: object, files: dict, where: str) -> None:
    entry = _object(entry, where, ("instance_id", "name", "snapshot_type", "created", "consistency_level",
                                   "state", "config", "disks"))
    _text(entry["instance_id"], f"{where}.instance_id")
    _text(entry["name"], f"{where}.name")
    _choice(entry["snapshot_type"], {SNAPSHOT_TYPE_FULL, SNAPSHOT_TYPE_RECOVERY}, f"{where}.snapshot_type")
    _timestamp(entry["created"], f"{where}.created")
    _whole(entry["consistency_level"], f"{where}.consistency_level")
    _choice(entry["state"], _STATES, f"{where}.state")
    config = check_config(entry["config"], f"{where}.config")
    frozen_disks = set()
    for i, disk in enumerate(_list(entry["disks"], f"{where}.disks")):
        here = f"{where}.disks[{i}]"
        disk = _object(disk, here, ("instance_id", "frozen", "rct_id"))
        _text(disk["rct_id"], f"{here}.rct_id")
        tree = files.get(_text(disk["instance_id"], f"{here}.instance_id"))
        if tree is None or _relative_path(disk["frozen"], f"{here}.frozen") not in tree:
            raise DocumentProblem(f"{here}.frozen {disk['frozen']!r} is not a file of disk {disk['instance_id']}")
        frozen_disks.add(disk["instance_id"])
    for i, disk in enumerate(config["disks"]):
        if disk["instance_id"] not in frozen_disks:
            raise DocumentProblem(f"{where}.config.disks[{i}] is not among the checkpoint's disks")
    if entry.get("parent") is not None:
        _text(entry["parent"], f"{where}.parent")
    owner = entry.get("owner")
    if owner is not None:
        owner = _object(owner, f"{where}.owner", ("pid",))
        _whole(owner["pid"], f"{where}.owner.pid", minimum=1, maximum=MAX_PID)
        _text(owner.get("boot_id", ""), f"{where}.owner.boot_id")
    _texts(entry.get("exported", []), f"{where}.exported")


def _reference_point(entry: object, where: str) -> None:
    entry = _object(entry, where, ("instance_id", "virtual_system_identifier", "virtual_disk_identifiers",
                                   "resilient_change_tracking_identifiers", "consistency_level", "created"))
    _text(entry["instance_id"], f"{where}.instance_id")
    _text(entry["virtual_system_identifier"], f"{where}.virtual_system_identifier")
    disks = _texts(entry["virtual_disk_identifiers"], f"{where}.virtual_disk_identifiers")
    rct_ids = _texts(entry["resilient_change_tracking_identifiers"], f"{where}.resilient_change_tracking_identifiers")
    if len(disks) != len(rct_ids):
        raise DocumentProblem(f"{where}: the disk and RCT identifier arrays differ in length")
    _whole(entry["consistency_level"], f"{where}.consistency_level")
    _timestamp(entry["created"], f"{where}.created")
    _whole(entry.get("reference_point_type", 2), f"{where}.reference_point_type")
    _texts(entry.get("exported", []), f"{where}.exported")
    _text(entry.get("element_name", ""), f"{where}.element_name")


def _intent(intent: object) -> None:
    if intent is None:
        return
    intent = _object(intent, "intent", ("op",))
    if intent["op"] == "create_checkpoint":
        for i, name in enumerate(_list(intent.get("files"), "intent.files")):
            _relative_path(name, f"intent.files[{i}]")
    elif intent["op"] != "collapse":
        raise DocumentProblem(f"intent.op {intent['op']!r} is not create_checkpoint or collapse")


# -- the shapes of values -----------------------------------------------------------------------------

def _object(value: object, where: str, required: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise DocumentProblem(f"{where} is {_kind(value)}, not an object")
    missing = [key for key in required if key not in value]
    if missing:
        raise DocumentProblem(f"{where} lacks {', '.join(missing)}")
    return value


def _list(value: object, where: str) -> list:
    if not isinstance(value, list):
        raise DocumentProblem(f"{where} is {_kind(value)}, not a list")
    return value


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DocumentProblem(f"{where} is {_kind(value)}, not text")
    return value


def _texts(value: object, where: str) -> list[str]:
    for i, item in enumerate(_list(value, where)):
        _text(item, f"{where}[{i}]")
    return value  # type: ignore[return-value]


def _whole(value: object, where: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DocumentProblem(f"{where} is {_kind(value)}, not a whole number")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise DocumentProblem(f"{where} is {value}, out of range")
    return value


def _choice(value: object, allowed: set[int], where: str) -> None:
    if _whole(value, where) not in allowed:
        raise DocumentProblem(f"{where} is {value}, not one of {sorted(allowed)}")


def _timestamp(value: object, where: str) -> None:
    try:
        moment = datetime.datetime.fromisoformat(_text(value, where))
    except ValueError:
        raise DocumentProblem(f"{where} {value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise DocumentProblem(f"{where} {value!r} has no time zone")


def _relative_path(value: object, where: str) -> str:
    """A file of the VM: a relative path that stays inside the VM directory."""
    name = _text(value, where)
    parts = name.split(os.sep)
    if not name or os.path.isabs(name) or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise DocumentProblem(f"{where} {name!r} is not a file inside the VM directory")
    return name


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
