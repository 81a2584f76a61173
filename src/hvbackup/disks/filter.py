"""The passthrough filter: a block device over another (``next``) that hands on every call it does not
override, as nbdkit's filters do. A filter defines only what it changes; what the disk is, the I/O it
leaves alone and the answers to "can you do X" are the next layer's.
"""

from __future__ import annotations

from typing import Iterator

from hvbackup.disks.device import BlockDevice, Extent


def _next_layers(name: str) -> property:
    return property(lambda self: getattr(self.next, name), doc=f"The next layer's {name}.")


class Filter(BlockDevice):
    next: BlockDevice

    def __init__(self, next: BlockDevice):
        self.next = next

    format = _next_layers("format")
    disk_type = _next_layers("disk_type")
    path = _next_layers("path")
    size = _next_layers("size")
    block_size = _next_layers("block_size")
    logical_sector_size = _next_layers("logical_sector_size")
    physical_sector_size = _next_layers("physical_sector_size")
    disk_id = _next_layers("disk_id")
    parent = _next_layers("parent")
    read_only = _next_layers("read_only")
    closed = _next_layers("closed")
    write_alignment = _next_layers("write_alignment")
    linkage_id = _next_layers("linkage_id")

    def readinto(self, offset: int, buffer) -> None:
        self.next.readinto(offset, buffer)

    def read(self, offset: int, length: int) -> bytes:
        return self.next.read(offset, length)

    def write(self, offset: int, data) -> None:
        self.next.write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        self.next.trim(offset, length)

    def flush(self) -> None:
        self.next.flush()

    def start_flush(self) -> None:
        self.next.start_flush()

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        return self.next.extents(offset, length)

    def close(self) -> None:
        self.next.close()

    def change_tracker(self):
        return self.next.change_tracker()

    def info(self) -> dict:
        return self.next.info()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} over {self.next!r}>"
