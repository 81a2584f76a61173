"""An open VHDX file as a block device: reads, writes, trims and extents over [MS-VHDX] structures.

Payload goes straight to its block in the file; metadata changes (BAT entries, sector bitmap pages,
the metadata region) collect in memory and reach the file only through the log, at ``flush()`` or
when the pending pages approach what one log entry can carry. Writes are ordered so that a crash
at any instant leaves a file that replays to a state where every flushed write is present:

* a new block is placed past the end of the file (reading as zeros) before its data is written;
* the log entry that makes a block visible is written only after that block's data is flushed;
* a session's header update (new FileWriteGuid, and DataWriteGuid before the first change a reader
  could see) happens before anything else in the file changes.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Iterator

import numpy as np

from hvbackup.disks import parents
from hvbackup.disks.device import Extent, ExtentState
from hvbackup.disks.filedisk import FileDisk
from hvbackup.disks.fileio import (
    MiB,
    data_ranges,
    punch_hole,
    read_exact,
    readinto_at,
    round_up,
    sync_data,
    write_at,
    write_zeros,
    zero_fill,
)
from hvbackup.disks.vhdx import bat as batmod
from hvbackup.disks.vhdx import identifier, region
from hvbackup.disks.vhdx.bat import Bat, Geometry
from hvbackup.disks.vhdx.bitmap import BITMAP_BLOCK, SectorBitmaps
from hvbackup.disks.vhdx.header import NULL_GUID, HeaderSet
from hvbackup.disks.vhdx.header import any_valid as header_slots_valid
from hvbackup.disks.vhdx.journal import Journal
from hvbackup.disks.vhdx.locator import ParentLocator, format_linkage, path_entries
from hvbackup.disks.vhdx.metadata import Metadata, MetadataEntry
from hvbackup.disks.vhdx.replay import Overlay, read_active_sequence, replay_in_place
from hvbackup.errors import DiskError, DiskFormatError, ParentError

HEADER_SECTION = MiB
_ZERO_STATES = (batmod.ZERO, batmod.UNMAPPED, batmod.UNMAPPED_V095, batmod.UNDEFINED)
_SOFT_ANCHOR_STATES = (batmod.UNMAPPED, batmod.UNMAPPED_V095, batmod.UNDEFINED)
_WINDOW = 1 << 18  # blocks examined at once by extents(): bounds its temporary arrays
_BAT_READ = 4 * MiB  # the BAT is read in pieces of this size


class VhdxDisk(FileDisk):
    format = "vhdx"

    # -- opening -------------------------------------------------------------------------------

    def _load(self, chain: tuple[str, ...]) -> None:
        fd, read_only = self._fd, self.read_only
        file_size = os.fstat(fd).st_size
        if file_size < HEADER_SECTION:
            identifier.FileTypeIdentifier.unpack(os.pread(fd, 8, 0))
            raise DiskFormatError("file is truncated: shorter than the 1 MiB VHDX header section",
                                  reason="disk.file.truncated")
        head = read_exact(fd, 520, 0, "file type identifier")
        if head[:8] != identifier.SIGNATURE and header_slots_valid(fd):
            raise DiskFormatError("the file type identifier at offset 0 is damaged (a valid header behind it "
                                  "shows a VHDX file; a repair restores the identifier)",
                                  reason="vhdx.identifier.damaged")
        self.creator = identifier.FileTypeIdentifier.unpack(head).creator
        self.headers = HeaderSet.read(fd)
        header = self.headers.current
        if header.log_offset + header.log_length > file_size:
            raise DiskFormatError("file is truncated: the VHDX log lies past the end of the file",
                                  reason="vhdx.log.beyond-file")
        if not read_only and (header.log_version != 0 or not header.log_length):
            # Writes go through the log: without one of a version we write, only reading is safe.
            log = f"log version {header.log_version}" if header.log_length else "no log"
            raise DiskFormatError(f"the file has {log}; it can be opened read-only only",
                                  reason="vhdx.log.not-writable")
        self.log_pending = header.log_pending
        self._overlay = Overlay()
        if self.log_pending:
            entries = read_active_sequence(
                fd, self.headers.current.log_offset, self.headers.current.log_length,
                self.headers.current.log_guid, file_size,
            )
            if read_only:
                self._overlay = Overlay(entries)
            else:
                self.headers.update()
                replay_in_place(fd, entries)
                self.headers.update(log_guid=NULL_GUID)
                file_size = os.fstat(fd).st_size
        self.file_size = max(file_size, self._overlay.last_file_offset)
        self.regions = self._read_region_table()
        self._load_metadata()
        self._load_bat()
        self._check_layout()
        if self.metadata.file_parameters.has_parent:
            self._open_parent(chain)
        self._bitmaps = SectorBitmaps(lambda off: self._read_meta(off, BITMAP_BLOCK))
        self._journal = None if read_only else Journal(fd, self.headers)
        self._next_free = round_up(file_size, MiB)
        self._visible_change_made = False
        self._next_data_write_guid: uuid.UUID | None = None
        self._unflushed = False
        if not read_only and self.parent is not None:
            self._refresh_stale_parent_paths()

    def _read_meta(self, offset: int, length: int) -> bytes:
        """File bytes as the log says they are: replayed in memory for a read-only open."""
        buffer = bytearray(length)
        readinto_at(self._fd, memoryview(buffer), offset)
        if self._overlay:
            self._overlay.patch(offset, memoryview(buffer))
        return bytes(buffer)

    def _read_region_table(self) -> region.RegionTable:
        problems, reasons = [], []
        self.region_table_problems: list[str] = []
        table = None
        for i, offset in enumerate(region.OFFSETS):
            try:
                candidate = region.RegionTable.unpack(self._read_meta(offset, region.SIZE))
            except DiskFormatError as exc:
                problems.append(f"region table {i + 1}: {exc}")
                reasons.append(exc.reason)
                continue
            table = table or candidate
        if table is None:  # both damaged: the first table's reason stands for the pair
            raise DiskFormatError("; ".join(problems), reason=reasons[0])
        self.region_table_problems = problems
        unknown = table.unknown_required()
        if unknown:
            raise DiskFormatError(f"the file needs region {unknown[0].guid}, which this engine does not know",
                                  reason="vhdx.region.unknown-required")
        for entry in table.entries:
            if entry.end > self.file_size:
                name = region.KNOWN_REGIONS.get(entry.guid, str(entry.guid))
                raise DiskFormatError(f"file is truncated: the {name} region lies past the end of the file",
                                      reason="vhdx.region.beyond-file")
        return table

    def _load_metadata(self) -> None:
        self.metadata_region = self.regions.find(region.METADATA_GUID)
        base = self.metadata_region.file_offset
        self.metadata = Metadata.read(lambda off, n: self._read_meta(base + off, n), self.metadata_region.length)
        md = self.metadata
        self.geometry = Geometry(md.virtual_size, md.file_parameters.block_size, md.logical_sector_size,
                                 md.file_parameters.has_parent)
        self.size = md.virtual_size
        self.block_size = md.file_parameters.block_size
        self.logical_sector_size = md.logical_sector_size
        self.physical_sector_size = md.physical_sector_size
        self.disk_id = md.disk_id
        params = md.file_parameters
        self.disk_type = "differencing" if params.has_parent else "fixed" if params.leave_block_allocated else "dynamic"

    def _load_bat(self) -> None:
        bat_region = self.regions.find(region.BAT_GUID)
        if bat_region.length < self.geometry.entry_count * batmod.ENTRY_SIZE:
            raise DiskFormatError(
                f"the BAT region holds {bat_region.length // 8} entries; this disk needs {self.geometry.entry_count}",
                reason="vhdx.bat.region-too-small",
            )
        self.bat = Bat(self.geometry, bat_region.file_offset)
        # Only what the file stores (or the log patches) can differ from zeros: holes are NOT_PRESENT
        # entries, so a sparse 256 MiB table costs what it holds.
        start, end = bat_region.file_offset, bat_region.file_offset + Bat.page_bytes_needed(self.geometry)
        for low, high in [*data_ranges(self._fd, start, end), *self._overlay.spans(start, end)]:
            low = start + (low - start) // batmod.PAGE * batmod.PAGE
            high = start + round_up(high - start, batmod.PAGE)
            for at in range(low, high, _BAT_READ):
                self.bat.load(at - start, self._read_meta(at, min(_BAT_READ, high - at)))
        self.bat.validate()

    def _check_layout(self) -> None:
        """2.1: every object lies inside the file, past the header section, and none overlap."""
        header = self.headers.current
        fixed = [(0, HEADER_SECTION, "header section")]
        if header.log_length:
            fixed.append((header.log_offset, header.log_length, "log"))
        fixed += [(r.file_offset, r.length, region.KNOWN_REGIONS.get(r.guid, "region")) for r in self.regions.entries]
        starts, lengths = self.bat.occupied()
        if starts.size:
            ends = starts + lengths
            beyond = np.flatnonzero((ends > self.file_size) | (starts < HEADER_SECTION))
            if beyond.size:
                raise DiskFormatError(
                    f"a BAT entry points outside the file: block at {int(starts[beyond[0]]):#x}, "
                    f"file size {self.file_size:#x}",
                    reason="vhdx.bat.entry-beyond-file",
                )
        all_starts = np.concatenate((starts, np.array([f[0] for f in fixed], dtype=np.int64)))
        all_lengths = np.concatenate((lengths, np.array([f[1] for f in fixed], dtype=np.int64)))
        order = np.argsort(all_starts, kind="stable")
        s, e = all_starts[order], all_starts[order] + all_lengths[order]
        clash = np.flatnonzero(e[:-1] > s[1:])
        if clash.size:
            raise DiskFormatError(f"structures overlap in the file at offset {int(s[clash[0] + 1]):#x}",
                                  reason="vhdx.layout.overlap")

    def _open_parent(self, chain: tuple[str, ...]) -> None:
        locator = self.metadata.parent_locator
        self.parent, self.parent_found_at = parents.open_parent(
            self.path, locator.candidates(self.path), chain,
            lambda path, above: VhdxDisk.open(path, read_only=True, _chain=above),
            lambda parent: parent.data_write_guid, locator.linkages, "DataWriteGuid",
        )
        if self.parent.logical_sector_size != self.logical_sector_size:
            raise ParentError(f"{self.path}: parent {self.parent_found_at} has a different logical sector size",
                              reason="disk.parent.sector-size")

    def _refresh_stale_parent_paths(self) -> None:
        """2.6.2.6.3: after a chain opens, point stale path entries at the parent actually used."""
        entries = dict(self.metadata.parent_locator.entries)
        fresh = {
            key: value for key, value in path_entries(self.path, self.parent_found_at).items()
            if entries.get(key) != value
            # A drive-letter path is left for the Windows hosts that can resolve it.
            and not (key == "absolute_win32_path" and parents.is_windows_drive_path(entries.get(key, "")))
        }
        if not fresh:
            return
        entries.update(fresh)
        self._rewrite_metadata(dataclasses.replace(self.metadata, parent_locator=ParentLocator(entries)))

    def add_parent_linkage2(self, guid: uuid.UUID) -> None:
        """Accept a parent whose DataWriteGuid is ``guid`` too: the first step of a safe merge."""
        entries = dict(self.metadata.parent_locator.entries)
        entries["parent_linkage2"] = format_linkage(guid)
        self._rewrite_metadata(dataclasses.replace(self.metadata, parent_locator=ParentLocator(entries)))

    def set_parent(self, parent_path: str, linkage: uuid.UUID) -> None:
        """Point the locator at another parent holding the same content as the current one (a merge
        below folded the current parent into it): its paths, and ``linkage`` as parent_linkage."""
        kept = {k: v for k, v in self.metadata.parent_locator.entries.items()
                if k not in ("parent_linkage2", "relative_path", "absolute_win32_path", "volume_path")}
        entries = {**kept, **path_entries(self.path, parent_path), "parent_linkage": format_linkage(linkage)}
        self._rewrite_metadata(dataclasses.replace(self.metadata, parent_locator=ParentLocator(entries)))

    def adopt_virtual_disk_items(self, child: Metadata) -> None:
        """2.6.1.2 merge rule: the parent drops its IsVirtualDisk items and takes the child's."""
        kept = tuple((e, d) for e, d in self.metadata.other_items if not e.is_virtual_disk)
        taken = tuple((e, d) for e, d in child.other_items if e.is_virtual_disk)
        adopted = dataclasses.replace(self.metadata, disk_id=child.disk_id, other_items=kept + taken)
        if adopted != self.metadata:
            self._prepare_change(visible=True)
            self._rewrite_metadata(adopted)
            self.disk_id = child.disk_id

    def set_virtual_disk_item(self, item_id: uuid.UUID, data: bytes | None) -> None:
        """Add, replace or (with None) remove an optional user item of the virtual disk: IsUser and
        IsVirtualDisk, so new children copy it and a merge hands it to the parent (2.6.1.2)."""
        self._check_writable()
        kept = tuple((e, d) for e, d in self.metadata.other_items if not (e.is_user and e.item_id == item_id))
        if data is not None:
            kept += ((MetadataEntry(item_id, 0, len(data), is_user=True, is_virtual_disk=True), data),)
        self._rewrite_metadata(dataclasses.replace(self.metadata, other_items=kept))

    def virtual_disk_item(self, item_id: uuid.UUID) -> bytes | None:
        return next((d for e, d in self.metadata.other_items if e.is_user and e.item_id == item_id), None)

    def problems(self) -> list[str]:
        problems = []
        if self.log_pending:
            problems.append("the log holds metadata updates not yet applied (opening read-write replays them)")
        if not self.headers.both_valid:
            problems.append("one of the two headers is damaged")
        return problems + self.region_table_problems

    def repair(self) -> list[str]:
        """Rewrite redundant copies that are damaged; the log was already replayed by opening."""
        done = ["replayed the log"] if self.log_pending else []
        if not self.headers.both_valid:
            self._prepare_change(visible=False)
            done.append("rewrote the damaged header")
        if self.region_table_problems:
            self._prepare_change(visible=False)
            table = self.regions.pack()
            pages = [
                (offset + at, table[at:at + batmod.PAGE])
                for offset in region.OFFSETS for at in range(0, len(table), batmod.PAGE)
            ]
            self._commit_pages(pages)
            self.region_table_problems = []
            done.append("rewrote the damaged region table")
        return done

    # -- properties ----------------------------------------------------------------------------

    @property
    def data_write_guid(self) -> uuid.UUID:
        return self.headers.current.data_write_guid

    @property
    def linkage_id(self) -> uuid.UUID:
        """A child records its parent's DataWriteGuid as parent_linkage (2.6.2.6.3)."""
        return self.data_write_guid

    def info(self) -> dict:
        info = super().info()
        info.update(
            file_size=os.fstat(self._fd).st_size,
            log_pending=self.log_pending,
            creator=self.creator,
            data_write_guid=str(self.data_write_guid),
            chunk_ratio=self.geometry.chunk_ratio,
            parent_linkage=[str(g) for g in self.metadata.parent_locator.linkages] if self.parent else [],
        )
        return info

    # -- reads ---------------------------------------------------------------------------------

    def readinto(self, offset: int, buffer) -> None:
        view = memoryview(buffer).cast("B")
        self._check_range(offset, len(view))
        for pos, block, within, take, state, location in self._blocks(offset, len(view)):
            piece = view[pos:pos + take]
            if state == batmod.FULLY_PRESENT:
                self._read_file(piece, location + within)
            elif state == batmod.PARTIALLY_PRESENT:
                self._read_partial(block, location, within, piece)
            elif state == batmod.NOT_PRESENT and self.parent is not None:
                self._read_parent(offset + pos, piece)
            else:
                zero_fill(piece)

    def _blocks(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int, int, int]]:
        """For each block [offset, offset+length) touches: (position in the range, block, offset in
        the block, bytes, BAT state, file location). The entry is read as each block is reached."""
        bs = self.geometry.block_size
        pos = 0
        while pos < length:
            block, within = divmod(offset + pos, bs)
            take = min(bs - within, length - pos)
            value = self.bat.payload(block)
            yield pos, block, within, take, value & batmod.STATE_MASK, (value >> batmod.OFFSET_SHIFT) * MiB
            pos += take

    def _read_file(self, piece: memoryview, file_offset: int) -> None:
        readinto_at(self._fd, piece, file_offset)
        if self._overlay:
            self._overlay.patch(file_offset, piece)

    def _read_partial(self, block: int, location: int, within: int, piece: memoryview) -> None:
        base = block * self.geometry.block_size
        for present, lo, hi in self._sector_runs(block, within, within + len(piece)):
            part = piece[lo - within:hi - within]
            if present:
                self._read_file(part, location + lo)
            else:
                self._read_parent(base + lo, part)

    def _sector_runs(self, block: int, start: int, end: int) -> Iterator[tuple[bool, int, int]]:
        """(in this file?, start, end) byte runs of [start, end) within a PARTIALLY_PRESENT block,
        from its sector bitmap; partial sectors at either end are included."""
        lss = self.logical_sector_size
        first_sector, end_sector = start // lss, -(-end // lss)
        chunk, first = self._chunk_sector(block, first_sector * lss)
        location = self._bitmap_location(chunk)
        for present, sector, count in self._bitmaps.runs(chunk, location, first, end_sector - first_sector):
            run_start = (first_sector + sector - first) * lss
            yield present, max(start, run_start), min(end, run_start + count * lss)

    def _chunk_sector(self, block: int, within: int) -> tuple[int, int]:
        """The chunk of ``block`` and the index, within that chunk's bitmap, of the sector at ``within``."""
        geo = self.geometry
        chunk, index = divmod(block, geo.chunk_ratio)
        return chunk, index * geo.sectors_per_block + within // geo.logical_sector_size

    def _bitmap_location(self, chunk: int) -> int:
        return (self.bat.bitmap(chunk) >> batmod.OFFSET_SHIFT) * MiB

    # -- writes --------------------------------------------------------------------------------

    def _write(self, offset: int, view: memoryview) -> None:
        self._prepare_change(visible=True)
        for pos, block, within, take, state, location in self._blocks(offset, len(view)):
            piece = view[pos:pos + take]
            if state == batmod.FULLY_PRESENT:
                write_at(self._fd, piece, location + within)
            elif state == batmod.PARTIALLY_PRESENT:
                self._make_room()
                write_at(self._fd, piece, location + within)
                self._mark_present(block, within, take)
            else:
                self._write_new_block(block, state, location, within, piece)
        self._unflushed = True

    def _write_new_block(self, block: int, state: int, anchor: int, within: int, piece: memoryview | None,
                         length: int | None = None) -> None:
        """Write into a block with no data in this file: place it, then record it in the BAT.
        ``piece`` None writes ``length`` zeros, which a freshly placed block already holds."""
        self._make_room()
        length = len(piece) if piece is not None else length
        whole = within == 0 and length == self.geometry.block_length(block)
        location = self._place_block(state, anchor)
        if piece is not None:
            write_at(self._fd, piece, location + within)
        if self.parent is not None and state == batmod.NOT_PRESENT and not whole:
            # The rest of the block still comes from the parent, sector by sector.
            self._ensure_bitmap(block // self.geometry.chunk_ratio)
            self.bat.set_payload(block, batmod.PARTIALLY_PRESENT, location)
            self._mark_present(block, within, length)
        else:
            self.bat.set_payload(block, batmod.FULLY_PRESENT, location)

    def _place_block(self, state: int, anchor: int) -> int:
        """A file offset for a block whose unwritten bytes must read as zeros."""
        if anchor and state in _SOFT_ANCHOR_STATES:
            # Reuse the space a trim left behind; punching it guarantees zeros around the write.
            punch_hole(self._fd, anchor, self.geometry.block_size)
            return anchor
        return self._allocate(self.geometry.block_size)

    def _allocate(self, length: int) -> int:
        """Space at the end of the file: new, so it reads as zeros."""
        location = self._next_free
        self._next_free = location + round_up(length, MiB)
        try:
            os.ftruncate(self._fd, self._next_free)
        except OSError as exc:
            self._next_free = location
            raise DiskError(f"{self.path}: cannot grow the file: {exc.strerror}") from exc
        return location

    def _ensure_bitmap(self, chunk: int) -> None:
        if self.bat.bitmap(chunk) & batmod.STATE_MASK == batmod.SB_PRESENT:
            return
        location = self._allocate(BITMAP_BLOCK)
        self._bitmaps.attach(chunk, location, fresh=True)
        self.bat.set_bitmap(chunk, batmod.SB_PRESENT, location)

    def _mark_present(self, block: int, within: int, length: int) -> None:
        chunk, first = self._chunk_sector(block, within)
        self._bitmaps.mark_present(chunk, self._bitmap_location(chunk), first, length // self.logical_sector_size)

    # -- trim ----------------------------------------------------------------------------------

    def _trim(self, offset: int, length: int) -> None:
        """Afterwards the range reads as zeros.

        A dynamic disk punches the data out; whole blocks become UNMAPPED and keep their space as a
        soft anchor for reuse. A fixed disk zeroes in place and stays fully provisioned. A
        differencing disk holds explicit zeros, so the parent cannot show through: libvhdi reads
        every state below FULLY_PRESENT in a child from the parent, even ZERO.
        """
        self._prepare_change(visible=True)
        fixed = self.metadata.file_parameters.leave_block_allocated and self.parent is None
        for _, block, within, take, state, location in self._blocks(offset, length):
            whole = within == 0 and take == self.geometry.block_length(block)
            if state in (batmod.FULLY_PRESENT, batmod.PARTIALLY_PRESENT):
                if fixed:
                    write_zeros(self._fd, location + within, take)
                else:
                    punch_hole(self._fd, location + within, take)
                    self._make_room()
                    if self.parent is None and whole:
                        self.bat.set_payload(block, batmod.UNMAPPED, location)
                    elif state == batmod.PARTIALLY_PRESENT and whole:
                        self.bat.set_payload(block, batmod.FULLY_PRESENT, location)
                    elif state == batmod.PARTIALLY_PRESENT:
                        self._mark_present(block, within, take)
            elif self.parent is not None and state == batmod.NOT_PRESENT:
                self._write_new_block(block, state, 0, within, None, take)
        self._unflushed = True

    # -- extents -------------------------------------------------------------------------------

    def _extents(self, start: int, end: int) -> Iterator[Extent]:
        if start >= end:
            return
        bs = self.geometry.block_size
        first, stop = start // bs, (end - 1) // bs + 1
        for window in range(first, stop, _WINDOW):
            starts, ends, states = self.bat.payload_runs(window, min(stop, window + _WINDOW))
            for low, high, state in zip(starts.tolist(), ends.tolist(), states.tolist()):
                yield from self._run_extents(state, max(start, low * bs), min(end, high * bs))

    def _run_extents(self, state: int, start: int, end: int) -> Iterator[Extent]:
        if state == batmod.FULLY_PRESENT:
            yield Extent(start, end - start, ExtentState.DATA)
        elif state in _ZERO_STATES:
            yield Extent(start, end - start, ExtentState.ZERO)
        elif state == batmod.NOT_PRESENT:
            yield from self._parent_extents(start, end)
        else:
            yield from self._partial_extents(start, end)

    def _partial_extents(self, start: int, end: int) -> Iterator[Extent]:
        bs = self.geometry.block_size
        pos = start
        while pos < end:
            block, within = divmod(pos, bs)
            base = block * bs
            stop = min(end, base + bs)
            for present, lo, hi in self._sector_runs(block, within, stop - base):
                if present:
                    yield Extent(base + lo, hi - lo, ExtentState.DATA)
                else:
                    yield from self._parent_extents(base + lo, base + hi)
            pos = stop

    # -- metadata commits ----------------------------------------------------------------------

    def _prepare_change(self, *, visible: bool) -> None:
        """2.2.2: new FileWriteGuid before the first modification, new DataWriteGuid before the first
        change a reader could observe."""
        if visible and not self._visible_change_made:
            self.headers.update(data_write_guid=self._next_data_write_guid or uuid.uuid4())
            self._visible_change_made = True
        elif not self.headers.first_update_done:
            self.headers.update()

    def set_next_data_write_guid(self, guid: uuid.UUID) -> None:
        """Choose the DataWriteGuid the next visible change takes (a merge records it in the child's
        parent_linkage2 first, 2.6.2.6.3 note <12>)."""
        if self._visible_change_made:
            raise DiskError(f"{self.path}: the DataWriteGuid of this session is already chosen")
        self._next_data_write_guid = guid

    @property
    def next_data_write_guid(self) -> uuid.UUID | None:
        """The DataWriteGuid chosen for the next visible change, if one was."""
        return self._next_data_write_guid

    def _pending_pages(self) -> int:
        return len(self.bat.dirty_pages) + len(self._bitmaps.dirty_pages)

    def _make_room(self) -> None:
        """Commit early if one more block's worth of metadata might not fit in a log entry."""
        worst = 2 + self.geometry.sectors_per_block // 8 // batmod.PAGE + 1
        if self._pending_pages() + worst > self._journal.capacity:
            self._commit()

    def _commit(self) -> None:
        pages = self.bat.pages_to_commit() + self._bitmaps.pages_to_commit()
        self._journal.commit(pages, last_file_offset=self._next_free)
        self.bat.dirty_pages.clear()
        self._bitmaps.dirty_pages.clear()

    def _rewrite_metadata(self, metadata: Metadata) -> None:
        """Replace the metadata region through the log, one entry for every changed page."""
        self._prepare_change(visible=False)
        region_entry = self.metadata_region
        old = self._read_meta(region_entry.file_offset, region_entry.length)
        new = metadata.pack(region_entry.length)
        pages = [
            (region_entry.file_offset + at, new[at:at + batmod.PAGE])
            for at in range(0, len(new), batmod.PAGE)
            if new[at:at + batmod.PAGE] != old[at:at + batmod.PAGE]
        ]
        self._commit_pages(pages)
        self.metadata = metadata

    def _commit_pages(self, pages: list[tuple[int, bytes]]) -> None:
        """Commit pending BAT and bitmap pages, then ``pages`` as one atomic log entry."""
        if len(pages) > self._journal.capacity:
            raise DiskError(f"{self.path}: the metadata change is larger than the log can apply atomically")
        self._commit()
        self._journal.commit(pages, last_file_offset=self._next_free)

    def flush(self) -> None:
        if self.read_only or self.closed:
            return
        if self._pending_pages():
            self._commit()
        elif self._unflushed:
            sync_data(self._fd)
        self._unflushed = False

    def _finish_writes(self) -> None:
        self.flush()
        self._journal.close()


class VhdxDiskAlone(VhdxDisk):
    """A differencing VHDX read without its parent: what the file holds is DATA, the rest is
    UNALLOCATED (reads as zeros). For a differential whose parent is not at hand (a backup's
    differential export); read-only, so nothing is ever written on the parent's behalf."""

    def _open_parent(self, chain: tuple[str, ...]) -> None:
        """The parent stays absent."""
