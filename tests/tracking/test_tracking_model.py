"""Random interleavings of writes, trims, reopens, ID captures, differencing children and merges:
for every captured ID, the query answers exactly the granules written after it (nothing crashed)."""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hvbackup import stack, tracking
from hvbackup.units import MiB

SIZE = 12 * MiB + 4096           # not a multiple of the block size or the granularity
GRANULARITY = 256 * 1024
MAX_DEPTH = 2

offsets = st.integers(0, SIZE - 1)
lengths = st.integers(1, 3 * GRANULARITY)


class TrackingModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="hvbackup-tracking-")
        self.chain = [os.path.join(self.dir, "base.vhdx")]
        stack.create(self.chain[0], SIZE, block_size=MiB).close()
        tracking.enable(self.chain[0], granularity=GRANULARITY)
        self.disk = None
        self.writes: list[set[int]] = []         # granules of each write, in order
        self.captured: dict[str, int] = {}       # ID -> number of writes made before it
        self._capture_current()

    # -- helpers ---------------------------------------------------------------------------------

    def _granules(self, offset: int, length: int) -> set[int]:
        return set(range(offset // GRANULARITY, (offset + length - 1) // GRANULARITY + 1))

    def _capture_current(self) -> None:
        status = tracking.status(self.chain[-1])
        assert status.state == "active"
        self.captured.setdefault(status.most_recent_id, len(self.writes))

    def _open(self):
        if self.disk is None:
            self.disk = stack.open(self.chain[-1])
        return self.disk

    def _close(self) -> None:
        if self.disk is not None:
            self.disk.close()
            self.disk = None
            self._capture_current()

    def _clip(self, offset: int, length: int) -> int:
        return min(length, SIZE - offset)

    # -- rules -----------------------------------------------------------------------------------

    @rule(offset=offsets, length=lengths, byte=st.integers(0, 255))
    def write(self, offset, length, byte):
        length = self._clip(offset, length)
        self._open().write(offset, bytes([byte]) * length)
        self.writes.append(self._granules(offset, length))

    @rule(offset=offsets, length=lengths)
    def trim(self, offset, length):
        length = self._clip(offset, length)
        self._open().trim(offset, length)
        self.writes.append(self._granules(offset, length))

    @rule()
    def reopen(self):
        self._close()
        self._open()

    @rule()
    def seal(self):
        self.captured[self._open().seal()] = len(self.writes)

    @precondition(lambda self: len(self.chain) <= MAX_DEPTH)
    @rule()
    def create_child(self):
        self._close()
        child = os.path.join(self.dir, f"child{len(self.chain)}.avhdx")
        stack.create(child, type="differencing", parent=self.chain[-1], block_size=MiB).close()
        self.chain.append(child)
        self._capture_current()

    @precondition(lambda self: len(self.chain) > 1)
    @rule()
    def merge(self):
        self._close()
        assert stack.merge(self.chain.pop()) == self.chain[-1]
        self._capture_current()

    # -- the property ------------------------------------------------------------------------------

    @invariant()
    def every_captured_id_answers_exactly(self):
        for change_id, before in self.captured.items():
            truth = set().union(*self.writes[before:])
            if self.disk is not None:
                ranges, covered = self.disk.query(change_id, 0, SIZE)
            else:
                ranges, covered = tracking.query(self.chain[-1], change_id)
            assert covered == SIZE
            reported = set()
            for offset, length in ranges:
                assert offset % GRANULARITY == 0 and (length % GRANULARITY == 0 or offset + length == SIZE)
                reported |= self._granules(offset, length)
            assert reported == truth, change_id

    def teardown(self):
        if self.disk is not None:
            self.disk.close()
        shutil.rmtree(self.dir)


TestTrackingModel = TrackingModel.TestCase
