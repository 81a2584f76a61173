"""One thread-safe byte meter: what long work has done out of what it has to do, and whether it
was asked to stop. Worker threads ``add``; the CLI's progress bars read it through ``report``, and
the work checks ``cancelled`` between pieces."""

from __future__ import annotations

import threading
from typing import Callable

Report = Callable[[int, int], None]  # (bytes done, bytes to do)


class ByteMeter:
    def __init__(self, report: Report | None = None, cancel: threading.Event | None = None, total: int = 0):
        self.report, self.cancel = report, cancel
        self.total, self.done = total, 0
        self._lock = threading.Lock()

    def grow(self, count: int) -> None:
        """More bytes to do (work found as it goes)."""
        with self._lock:
            self.total += count

    def add(self, count: int) -> None:
        """``count`` more bytes done; reports under the lock, so reports arrive in order."""
        with self._lock:
            self.done += count
            if self.report is not None:
                self.report(self.done, self.total)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()
