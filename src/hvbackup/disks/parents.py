"""Finding the parent of a differencing disk, for VHDX and VHD alike.

Both formats name the parent by Windows-style paths — one relative to the child, one absolute —
and by an identity the parent must carry (VHDX: its DataWriteGuid; VHD: its unique id). Paths are
written with "\\" separators; on a POSIX host an absolute path has no drive letter, so it is the
host path with its separators turned. Reading accepts "\\\\?\\" prefixes and drive-letter paths
(which cannot exist here: the parent's file name next to the child is tried instead).
"""

from __future__ import annotations

import ntpath
import os
from typing import Callable, TypeVar

from hvbackup.errors import DiskError, ParentError

MAX_CHAIN_DEPTH = 128
_EXTENDED_PREFIX = "\\\\?\\"

Parent = TypeVar("Parent")


def relative_path(child_path: str, parent_path: str) -> str:
    """The parent relative to the child's directory, with "\\" separators."""
    rel = os.path.relpath(os.path.abspath(parent_path), os.path.dirname(os.path.abspath(child_path)))
    return rel.replace(os.sep, "\\")


def absolute_path(parent_path: str) -> str:
    """The parent's absolute host path with "\\" separators."""
    return os.path.abspath(parent_path).replace(os.sep, "\\")


def _without_prefix(path: str) -> str:
    return path[len(_EXTENDED_PREFIX):] if path.startswith(_EXTENDED_PREFIX) else path


def is_windows_drive_path(absolute: str) -> bool:
    """True for a drive-letter or UNC path, which only a Windows host resolves."""
    return bool(ntpath.splitdrive(_without_prefix(absolute))[0])


def candidates(child_path: str, relative: str | None, absolute: str | None, name: str | None = None) -> list[str]:
    """Host paths to try, in order: the relative path, the absolute one, then ``name`` (the parent's
    file name) next to the child."""
    child_dir = os.path.dirname(os.path.abspath(child_path))
    found = []
    if relative:
        found.append(os.path.normpath(os.path.join(child_dir, *relative.replace("\\", "/").split("/"))))
    if absolute:
        absolute = _without_prefix(absolute)
        if is_windows_drive_path(absolute):
            found.append(os.path.join(child_dir, ntpath.basename(absolute)))
        else:
            found.append(os.path.normpath(absolute.replace("\\", "/")))
    if name:
        found.append(os.path.join(child_dir, ntpath.basename(name)))
    return list(dict.fromkeys(found))


def open_parent(
    child_path: str,
    tried: list[str],
    chain: tuple[str, ...],
    open_read_only: Callable[[str, tuple[str, ...]], Parent],
    identity: Callable[[Parent], object],
    wanted: list,
    what: str,
) -> tuple[Parent, str]:
    """The first candidate that opens and whose ``identity`` is in ``wanted``, with its path.

    ``chain`` holds the real paths of the disks above; a candidate already in it is a loop.
    """
    if len(chain) > MAX_CHAIN_DEPTH:
        raise ParentError(f"{child_path}: the differencing chain is deeper than {MAX_CHAIN_DEPTH}",
                          reason="disk.parent.chain-too-deep")
    mismatched = unusable = None
    for candidate in tried:
        if not os.path.isfile(candidate):
            continue
        if os.path.realpath(candidate) in chain:
            raise ParentError(f"{child_path}: the differencing chain loops back to {candidate}",
                              reason="disk.parent.loop")
        try:
            parent = open_read_only(candidate, chain)
        except ParentError:
            raise
        except DiskError as exc:  # a damaged file at one path: another path may still find the parent
            unusable = unusable or f"{child_path}: parent {candidate} cannot be used: {exc}"
            continue
        if identity(parent) in wanted:
            return parent, candidate
        mismatched = (candidate, identity(parent))
        parent.close()
    if unusable and not mismatched:
        raise ParentError(unusable, reason="disk.parent.unusable")
    if mismatched:
        raise ParentError(
            f"{child_path}: parent {mismatched[0]} has {what} {mismatched[1]}, but the child was made from "
            f"{wanted[0]}: the parent changed after the child was created, or it is another disk",
            reason="disk.parent.identity-mismatch",
        )
    raise ParentError(f"{child_path}: parent not found (tried {', '.join(tried) or 'no usable path'})",
                      reason="disk.parent.not-found")
