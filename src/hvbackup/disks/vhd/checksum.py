"""The VHD checksum ("Hard Disk Footer Format", Checksum): the one's complement of the byte sum of a
structure, its own checksum field counted as zero. The dynamic disk header uses the same rule."""

import numpy as np


def vhd_checksum(data, field_offset: int) -> int:
    view = memoryview(data).cast("B")
    total = int(np.frombuffer(view, dtype=np.uint8).sum(dtype=np.uint64))
    total -= sum(view[field_offset:field_offset + 4])
    return ~total & 0xFFFFFFFF
