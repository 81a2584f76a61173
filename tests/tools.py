"""The real peers the interop tests run: qemu-img, qemu-io, vhdiinfo and libvhdi-python."""

from __future__ import annotations

import json
import shutil
import subprocess


def require(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed; .ci/run installs it (qemu-utils, libvhdi-utils)"
    return path


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    require(args[0])
    result = subprocess.run(args, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def qemu_format(fmt: str) -> str:
    """qemu's name for a format: it calls VHD 'vpc'."""
    return {"vhd": "vpc"}.get(fmt, fmt)


def qemu_check(path: str, fmt: str) -> None:
    run("qemu-img", "check", "-f", qemu_format(fmt), path)


def qemu_to_raw(path: str, fmt: str, dest: str) -> None:
    run("qemu-img", "convert", "-f", qemu_format(fmt), "-O", "raw", path, dest)


def qemu_info(path: str, fmt: str) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", "-f", qemu_format(fmt), path).stdout)


def qemu_io(path: str, fmt: str, *commands: str) -> str:
    args = ["qemu-io", "-f", qemu_format(fmt)]
    for command in commands:
        args += ["-c", command]
    return run(*args, path).stdout


def libvhdi_read(path: str, offset: int, length: int, parents: list[str] = ()) -> bytes:
    """Read through libvhdi-python, attaching the parent chain explicitly (top child first)."""
    import pyvhdi

    files = [pyvhdi.file() for _ in range(1 + len(parents))]
    for f, p in zip(files, [path, *parents]):
        f.open(p)
    # Bottom up: libvhdi reads a parent's own parent only if it was attached first.
    for child, parent in reversed(list(zip(files, files[1:]))):
        child.set_parent(parent)
    try:
        return files[0].read_buffer_at_offset(length, offset)
    finally:
        for f in files:
            f.close()
