"""CRC-32C as [MS-VHDX] 2 uses it: over a whole structure with its own checksum field as zero."""

import crc32c

_ZERO_FIELD = bytes(4)


def crc32c_with_zeroed_field(data, field_offset: int) -> int:
    view = memoryview(data).cast("B")
    crc = crc32c.crc32c(view[:field_offset])
    crc = crc32c.crc32c(_ZERO_FIELD, crc)
    return crc32c.crc32c(view[field_offset + 4:], crc)
