"""A model-based test the formats share: random writes, trims, flushes, reopens and reads on one disk,
checked against a plain bytearray of what it should hold.

A format's test subclasses ``DiskModel`` with an ``@initialize`` rule that sets ``dir``, ``path``,
``size``, ``block_size`` (the unit whole-block trims use), ``model`` and ``disk``, and may override
the ``wrote``/``trimmed`` hooks to track what its own extent invariants need.
"""

from __future__ import annotations

import hashlib
import shutil

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hvbackup import disks
from hvbackup.disks import ExtentState


def pattern(seed: int, length: int) -> bytes:
    return hashlib.shake_128(seed.to_bytes(8, "little")).digest(length) if length else b""


class DiskModel(RuleBasedStateMachine):
    max_span = 3 << 20

    def wrote(self, offset: int, length: int) -> None:
        """Called after a write of [offset, offset+length)."""

    def trimmed(self, offset: int, length: int) -> None:
        """Called after a trim of [offset, offset+length)."""

    def teardown(self):
        if hasattr(self, "disk"):
            self.disk.close()
            with disks.open(self.path, read_only=True) as disk:
                assert disk.read(0, self.size) == bytes(self.model)
            shutil.rmtree(self.dir)

    def _span(self, data) -> tuple[int, int]:
        offset = data.draw(st.integers(0, self.size - 1))
        length = data.draw(st.integers(1, min(self.size - offset, self.max_span)))
        return offset, length

    @precondition(lambda self: not self.disk.read_only)
    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def write(self, data, seed):
        offset, length = self._span(data)
        payload = pattern(seed, length)
        self.disk.write(offset, payload)
        self.model[offset:offset + length] = payload
        self.wrote(offset, length)

    @precondition(lambda self: not self.disk.read_only)
    @rule(data=st.data(), whole_blocks=st.booleans())
    def trim(self, data, whole_blocks):
        offset, length = self._span(data)
        if whole_blocks:  # whole blocks take the formats' block-state paths
            offset = offset // self.block_size * self.block_size
            length = min(max(self.block_size, length // self.block_size * self.block_size), self.size - offset)
        self.disk.trim(offset, length)
        self.model[offset:offset + length] = bytes(length)
        self.trimmed(offset, length)

    @rule()
    def flush(self):
        self.disk.flush()

    @rule(read_only=st.booleans())
    def reopen(self, read_only):
        self.disk.close()
        self.disk = disks.open(self.path, read_only=read_only)

    @precondition(lambda self: self.disk.read_only)
    @rule()
    def back_to_writable(self):
        self.disk.close()
        self.disk = disks.open(self.path)

    @rule(data=st.data())
    def read_any_range(self, data):
        offset = data.draw(st.integers(0, self.size))
        length = data.draw(st.integers(0, self.size - offset))
        assert self.disk.read(offset, length) == bytes(self.model[offset:offset + length])

    @rule(data=st.data())
    def extents_of_a_range(self, data):
        """The extents of a range are those of the whole disk, clipped to it."""
        offset = data.draw(st.integers(0, self.size - 1))
        length = data.draw(st.integers(1, self.size - offset))
        whole = [(e.offset, e.end, e.state, e.depth) for e in self.disk.extents()]
        clipped = [(max(s, offset), min(e, offset + length), state, depth) for s, e, state, depth in whole
                   if s < offset + length and e > offset]
        assert [(e.offset, e.end, e.state, e.depth) for e in self.disk.extents(offset, length)] == clipped

    @invariant()
    def reads_match(self):
        if hasattr(self, "disk"):
            assert self.disk.read(0, self.size) == bytes(self.model)

    @invariant()
    def extents_tile_the_disk_and_only_data_holds_data(self):
        if not hasattr(self, "disk"):
            return
        covered = 0
        for ext in self.disk.extents():
            assert ext.offset == covered and ext.length > 0, ext
            covered = ext.end
            if ext.state != ExtentState.DATA:
                assert not any(self.model[ext.offset:ext.end]), ext
        assert covered == self.size
