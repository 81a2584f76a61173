"""Change tracking IDs in Hyper-V's shape: ``rctX:`` + the lineage GUID with ``:`` separators + ``:`` +
an 8-hex-digit sequence number, e.g. ``rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001``.

The lineage GUID names one unbroken tracking history of a disk; the sequence number counts the
points sealed in it (1 is the point tracking started at).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from hvbackup.errors import TrackingError
from hvbackup.winerror import ERROR_VHD_INVALID_CHANGE_TRACKING_ID

MAX_LENGTH = 256  # VIRTUAL_DISK_MAXIMUM_CHANGE_TRACKING_ID_LENGTH
_PATTERN = re.compile(r"rctX:([0-9a-f]{8}):([0-9a-f]{4}):([0-9a-f]{4}):([0-9a-f]{4}):([0-9a-f]{12}):([0-9a-f]{8})",
                      re.IGNORECASE)


@dataclass(frozen=True, order=True)
class RctId:
    lineage: uuid.UUID
    sequence: int

    def __str__(self) -> str:
        return "rctX:" + str(self.lineage).replace("-", ":") + f":{self.sequence:08x}"

    @classmethod
    def parse(cls, text: str) -> RctId:
        match = _PATTERN.fullmatch(text) if isinstance(text, str) and len(text) <= MAX_LENGTH else None
        if match is None:
            raise TrackingError(ERROR_VHD_INVALID_CHANGE_TRACKING_ID,
                                f"{text!r} is not a change tracking ID (rctX:<guid>:<8 hex digits>)")
        return cls(uuid.UUID("-".join(match.groups()[:5])), int(match.group(6), 16))
