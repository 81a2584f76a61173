"""Round trips and validation of each [MS-VHDX] structure on its own."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvbackup.disks.vhdx import header, region
from hvbackup.disks.vhdx.bat import Geometry
from hvbackup.disks.vhdx.locator import ParentLocator
from hvbackup.disks.vhdx.log import SECTOR, build_entry, descriptor_sectors, parse_entry
from hvbackup.disks.vhdx.metadata import FileParameters, Metadata
from hvbackup.disks.vhdx.replay import find_active_sequence
from hvbackup.errors import DiskFormatError

guids = st.uuids()


@given(seq=st.integers(0, 2**64 - 1), a=guids, b=guids, c=guids,
       log_length=st.integers(0, 2**32 - 1), log_offset=st.integers(0, 2**64 - 1))
def test_header_round_trip(seq, a, b, c, log_length, log_offset):
    h = header.Header(seq, a, b, c, log_length, log_offset)
    assert header.Header.unpack(h.pack()) == h


def test_header_checksum_and_signature_are_checked():
    packed = bytearray(header.Header(7, uuid.uuid4(), uuid.uuid4(), header.NULL_GUID, 1 << 20, 1 << 20).pack())
    packed[100] ^= 1  # a reserved byte still counts in the checksum
    assert header.Header.unpack(bytes(packed)) is None
    assert header.Header.unpack(b"HEAD" + bytes(packed[4:])) is None


def test_current_header_is_the_valid_one_with_the_higher_sequence():
    def make(seq):
        return header.Header(seq, uuid.uuid4(), uuid.uuid4(), header.NULL_GUID, 1 << 20, 1 << 20)

    low, high = make(3), make(4)
    raw = [low.pack(), high.pack()]
    assert header.choose_current([low, high], raw) == 1
    assert header.choose_current([low, None], raw) == 0
    with pytest.raises(DiskFormatError) as caught:
        header.choose_current([None, None], raw)
    assert caught.value.reason == "vhdx.header.checksum"
    # Disk2VHD writes two identical headers; accepted. Different ones with equal numbers are not.
    assert header.choose_current([low, low], [raw[0], raw[0]]) == 0
    with pytest.raises(DiskFormatError) as caught:
        header.choose_current([make(5), make(5)], [make(5).pack(), make(5).pack()])
    assert caught.value.reason == "vhdx.header.sequence"


def test_header_rules():
    base = header.Header(1, uuid.uuid4(), uuid.uuid4(), header.NULL_GUID, 1 << 20, 1 << 20)
    header.validate(base)
    for bad, reason in [
        ({"version": 2}, "vhdx.header.version"),
        ({"log_version": 1, "log_guid": uuid.uuid4()}, "vhdx.header.log-version"),
        ({"log_offset": 4096}, "vhdx.header.log-alignment"),
        ({"log_offset": 0}, "vhdx.header.log-overlap"),
        ({"log_length": 0, "log_guid": uuid.uuid4()}, "vhdx.header.no-log-space"),
    ]:
        with pytest.raises(DiskFormatError) as caught:
            header.validate(header.Header(**{**base.__dict__, **bad}))
        assert caught.value.reason == reason


def test_region_table_round_trip_and_rules():
    table = region.RegionTable((
        region.RegionEntry(region.BAT_GUID, 3 << 20, 1 << 20, True),
        region.RegionEntry(region.METADATA_GUID, 2 << 20, 1 << 20, True),
    ))
    assert region.RegionTable.unpack(table.pack()) == table
    overlapping = region.RegionTable((
        region.RegionEntry(region.BAT_GUID, 2 << 20, 2 << 20, True),
        region.RegionEntry(region.METADATA_GUID, 3 << 20, 1 << 20, True),
    ))
    with pytest.raises(DiskFormatError) as caught:
        region.RegionTable.unpack(overlapping.pack())
    assert caught.value.reason == "vhdx.region.overlap"
    damaged = bytearray(table.pack())
    damaged[40] ^= 0x80
    with pytest.raises(DiskFormatError) as caught:
        region.RegionTable.unpack(bytes(damaged))
    assert caught.value.reason == "vhdx.region.checksum"
    too_many = bytearray(table.pack())
    struct.pack_into("<I", too_many, 8, 5000)
    struct.pack_into("<I", too_many, 4, 0)
    from hvbackup.disks.vhdx.checksum import crc32c_with_zeroed_field
    struct.pack_into("<I", too_many, 4, crc32c_with_zeroed_field(too_many, 4))
    with pytest.raises(DiskFormatError) as caught:
        region.RegionTable.unpack(bytes(too_many))
    assert caught.value.reason == "vhdx.region.entry-count"


@given(st.integers(0, 600))
def test_descriptor_sectors(count):
    # 126 descriptors share the first sector with the entry header, 128 fit in each later one.
    capacity = 126 + 128 * (descriptor_sectors(count) - 1)
    assert count <= capacity and (descriptor_sectors(count) == 1 or count > capacity - 128)


def _page(seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(SECTOR))


@given(st.lists(st.integers(0, 1000), max_size=300, unique=True), st.integers(1, 2**63))
def test_log_entry_round_trip(page_numbers, sequence):
    guid = uuid.uuid4()
    pages = [(0x300000 + n * SECTOR, _page(n)) for n in page_numbers]
    entry = build_entry(sequence=sequence, tail=0, log_guid=guid, pages=pages,
                        flushed_file_offset=8 << 20, last_file_offset=9 << 20)
    ring = entry + bytes(SECTOR)
    parsed = parse_entry(lambda pos, n: ring[pos:pos + n], 0, len(ring), guid)
    assert parsed is not None
    assert [(off, data) for off, data, _ in parsed.updates] == pages
    assert (parsed.flushed_file_offset, parsed.last_file_offset) == (8 << 20, 9 << 20)
    # Another log GUID, a torn sector, or a wrong sequence number in a data sector invalidate it.
    assert parse_entry(lambda pos, n: ring[pos:pos + n], 0, len(ring), uuid.uuid4()) is None
    if pages:
        torn = bytearray(ring)
        torn[len(entry) - 1] ^= 1
        assert parse_entry(lambda pos, n: bytes(torn[pos:pos + n]), 0, len(ring), guid) is None


def _ring(entries: list[tuple[int, bytes]], length: int) -> bytes:
    ring = bytearray(length)
    for position, data in entries:
        for i, byte in enumerate(data):
            ring[(position + i) % length] = byte
    return bytes(ring)


def test_active_sequence_is_the_newest_complete_one():
    guid = uuid.uuid4()
    def build(seq, tail, n):
        return build_entry(sequence=seq, tail=tail, log_guid=guid, pages=[(0x300000, _page(seq))] * n,
                           flushed_file_offset=0, last_file_offset=0)
    one, two = build(5, 0, 1), build(6, 0, 1)
    # Entry 6 continues entry 5; its tail points back at 5, so both are replayed, oldest first.
    ring = _ring([(0, one), (len(one), two)], 64 * SECTOR)
    assert [e.sequence for e in find_active_sequence(ring, guid)] == [5, 6]
    # A newer entry whose tail points at itself stands alone.
    three = build(7, 2 * len(one), 1)
    ring = _ring([(0, one), (len(one), two), (2 * len(one), three)], 64 * SECTOR)
    assert [e.sequence for e in find_active_sequence(ring, guid)] == [7]
    # An entry that wraps around the end of the ring is read across the wrap.
    wrapping = build(9, 62 * SECTOR, 3)
    ring = _ring([(62 * SECTOR, wrapping)], 64 * SECTOR)
    assert [e.sequence for e in find_active_sequence(ring, guid)] == [9]
    with pytest.raises(DiskFormatError) as caught:
        find_active_sequence(bytes(64 * SECTOR), guid)
    assert caught.value.reason == "vhdx.log.sequence"


def test_geometry_counts_and_interleaving():
    # 512-byte sectors and 1 MiB blocks: 4096 blocks per chunk, then one sector bitmap entry.
    geo = Geometry(10 << 30, 1 << 20, 512, has_parent=False)
    assert geo.chunk_ratio == 4096 and geo.data_blocks == 10240
    assert geo.entry_count == 10240 + 2
    assert geo.payload_index(4095) == 4095 and geo.payload_index(4096) == 4097
    assert geo.bitmap_index(0) == 4096 and geo.bitmap_index(1) == 8193
    diff = Geometry(10 << 30, 1 << 20, 512, has_parent=True)
    assert diff.entry_count == 3 * 4097
    assert Geometry(1 << 40, 256 << 20, 4096, has_parent=False).chunk_ratio == 128
    for bad, reason in [
        ((0, 1 << 20, 512), "vhdx.metadata.virtual-size"),
        ((1000, 1 << 20, 512), "vhdx.metadata.virtual-size"),
        (((64 << 40) + 512, 1 << 20, 512), "vhdx.metadata.virtual-size"),
        ((1 << 30, 3 << 20, 512), "vhdx.metadata.block-size"),
        ((1 << 30, 512 << 20, 512), "vhdx.metadata.block-size"),
        ((1 << 30, 1 << 20, 1024), "vhdx.metadata.logical-sector-size"),
    ]:
        with pytest.raises(DiskFormatError) as caught:
            Geometry(*bad, has_parent=False)
        assert caught.value.reason == reason


def test_metadata_round_trip_keeps_unknown_items():
    from hvbackup.disks.vhdx.metadata import MetadataEntry

    user = (MetadataEntry(uuid.uuid4(), 0, 5, is_user=True), b"hello")
    optional = (MetadataEntry(uuid.uuid4(), 0, 3, is_virtual_disk=True), b"abc")
    md = Metadata(FileParameters(32 << 20), 1 << 30, uuid.uuid4(), 512, 4096,
                  ParentLocator({"parent_linkage": "{" + str(uuid.uuid4()) + "}", "relative_path": "p.vhdx"}),
                  (user, optional))
    md = Metadata(**{**md.__dict__, "file_parameters": FileParameters(32 << 20, has_parent=True)})
    region_bytes = md.pack(1 << 20)
    again = Metadata.read(lambda off, n: region_bytes[off:off + n], 1 << 20)
    assert again.file_parameters == md.file_parameters and again.parent_locator == md.parent_locator
    assert [(e.item_id, d) for e, d in again.other_items] == [(e.item_id, d) for e, d in md.other_items]
    required = (MetadataEntry(uuid.uuid4(), 0, 4, is_required=True), b"need")
    strict = Metadata(**{**md.__dict__, "other_items": (required,)}).pack(1 << 20)
    with pytest.raises(DiskFormatError) as caught:
        Metadata.read(lambda off, n: strict[off:off + n], 1 << 20)
    assert caught.value.reason == "vhdx.metadata.unknown-required"


def test_parent_locator_rules(tmp_path):
    good = ParentLocator({"parent_linkage": "{" + str(uuid.uuid4()).upper() + "}",
                          "relative_path": "..\\base\\p.vhdx", "absolute_win32_path": "\\\\?\\\\srv\\p.vhdx"})
    assert ParentLocator.unpack(good.pack()) == good
    assert len(good.linkages) == 1
    child = str(tmp_path / "child" / "c.vhdx")
    assert good.candidates(child) == [str(tmp_path / "base" / "p.vhdx"), "/srv/p.vhdx"]
    for entries, reason in [
        ({"relative_path": "p.vhdx"}, "vhdx.parent-locator.missing-key"),
        ({"parent_linkage": "{not-a-guid}", "relative_path": "p.vhdx"}, "vhdx.parent-locator.linkage"),
        ({"parent_linkage": "{" + str(uuid.uuid4()) + "}"}, "vhdx.parent-locator.missing-path"),
    ]:
        with pytest.raises(DiskFormatError) as caught:
            ParentLocator.unpack(ParentLocator(entries).pack())
        assert caught.value.reason == reason
    for cut, reason in [(30, "vhdx.parent-locator.entry-count"), (10, "vhdx.parent-locator.truncated")]:
        with pytest.raises(DiskFormatError) as caught:
            ParentLocator.unpack(good.pack()[:cut])
        assert caught.value.reason == reason
