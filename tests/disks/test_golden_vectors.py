"""Golden byte vectors for every on-disk structure (issue 12, item 5).

A format change that still round-trips with itself but breaks compatibility must fail here. For
each structure:

1. it is built from fixed inputs through the project's own pack/encode function and compared, byte
   for byte, with a committed vector in ``tests/disks/golden/`` (``tests/disks/golden/README.md`` says how the
   vectors were made and how to regenerate them deliberately);
2. the committed vector is parsed by the project's unpack/decode and its fields asserted;
3. the bytes the specification fixes (signatures, checksums over the stated range, reserved zeros,
   GUIDs in their binary form, field offsets) are asserted independently of the code, from the
   spec section cited next to them: [MS-VHDX] v8.0 (``reference/specs/MS-VHDX.md``), the VHD
   specification 1.0 (as summarised in ``reference/vhdx-notes.md`` section 2), and for hvbackup's
   own formats ``docs/tracking.md`` and ``docs/repository.md``;
4. where a real peer writes the same structure, its output is parsed too: qemu-img 7.2 (VHDX and
   VHD), libvhdi (reading vectors assembled into whole files), and the one file Windows made that
   we have, ``samples/rsvd.vhds``.

Compressed parts (the ``.rct`` payload, chunks, manifests) are zstd frames whose exact bytes depend
on the zstd library. Their vectors record the library version that made them: with that version
the bytes must match exactly; with another one, everything outside the compressed stream must match
exactly and the stream must decompress to the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
import zstandard
from blake3 import blake3
from crc32c import crc32c
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from tools import run

from hvbackup.backup import envelope, manifest
from hvbackup.backup.chunks import ChunkCodec
from hvbackup.backup.crypto import Keys
from hvbackup.backup.geometry import Geometry
from hvbackup.backup.index import ChunkIndex
from hvbackup.backup.repository import CONFIG_MAGIC, Repository
from hvbackup.disks.vhd import dynamic_header as vhd_header
from hvbackup.disks.vhd import footer as vhd_footer
from hvbackup.disks.vhd.bat import UNALLOCATED
from hvbackup.disks.vhd.bat import Bat as VhdBat
from hvbackup.disks.vhd.bitmap import SectorBitmaps as VhdSectorBitmaps
from hvbackup.disks.vhd.disk import VhdDisk
from hvbackup.disks.vhd.geometry import geometry_for_size, standard_geometry
from hvbackup.disks.vhd.locator import W2KU, W2RU, LocatorEntry
from hvbackup.disks.vhdx import bat as vbat
from hvbackup.disks.vhdx import header as vheader
from hvbackup.disks.vhdx import identifier as vident
from hvbackup.disks.vhdx import log as vlog
from hvbackup.disks.vhdx import metadata as vmeta
from hvbackup.disks.vhdx import region as vregion
from hvbackup.disks.vhdx.bitmap import SectorBitmaps
from hvbackup.disks.vhdx.checksum import crc32c_with_zeroed_field
from hvbackup.disks.vhdx.create import create_vhdx
from hvbackup.disks.vhdx.disk import VhdxDisk
from hvbackup.disks.vhdx.locator import ParentLocator
from hvbackup.disks.vhdx.replay import find_active_sequence
from hvbackup.errors import DiskFormatError
from hvbackup.tracking.changemap import ChangeMap
from hvbackup.tracking.mrtfile import MrtState
from hvbackup.tracking.rctfile import DENSE, RUNS, EarlierLineage, RctState, Retirement
from hvbackup.tracking.sidefiles import MARKER_ITEM, read_marker, write_marker
from hvbackup.units import GiB, MiB

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("HVBACKUP_REGENERATE_GOLDEN") == "1"


# ------------------------------------------------------------------------------------------------
# The vector files: annotated hex, one 16-byte line per row, all-zero rows left out.
# ------------------------------------------------------------------------------------------------

def _zstd_version() -> str:
    return ".".join(map(str, zstandard.ZSTD_VERSION))


def read_golden(name: str) -> tuple[bytes, dict[str, str]]:
    """The bytes of ``tests/disks/golden/NAME.hex`` and its ``key value`` settings (``size``, ``zstd``)."""
    meta: dict[str, str] = {}
    rows: list[tuple[int, bytes]] = []
    for line in (GOLDEN / f"{name}.hex").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if ":" in line:
            offset, _, data = line.partition(":")
            rows.append((int(offset, 16), bytes.fromhex(data)))
        else:
            key, value = line.split(None, 1)
            meta[key] = value
    data = bytearray(int(meta["size"]))
    for offset, row in rows:
        assert offset + len(row) <= len(data), f"{name}: a row at {offset:#x} lies past the size"
        data[offset:offset + len(row)] = row
    return bytes(data), meta


def write_golden(name: str, data: bytes, *, compressed: bool) -> None:
    lines = [f"# {DESCRIPTIONS[name]}",
             "# Made by tests/disks/test_golden_vectors.py; see tests/disks/golden/README.md.",
             "# Rows are 'offset: bytes' in hex; rows not listed are all zero.", f"size {len(data)}"]
    if compressed:
        lines.append(f"zstd {_zstd_version()}")
    for offset in range(0, len(data), 16):
        row = data[offset:offset + 16]
        if any(row):
            groups = " ".join(row[i:i + 4].hex() for i in range(0, len(row), 4))
            lines.append(f"{offset:08x}: {groups}")
    (GOLDEN / f"{name}.hex").write_text("\n".join(lines) + "\n")


def golden(name: str) -> bytes:
    return read_golden(name)[0]


def _first_difference(a: bytes, b: bytes) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"lengths {len(a)} / {len(b)}; first difference at offset {at:#x}: "
            f"built {a[at:at + 16].hex()} golden {b[at:at + 16].hex()}")


def check_golden(name: str, built: bytes, canonical=None) -> None:
    """``built`` (made by the project's code from the fixed inputs) equals the committed vector.

    ``canonical`` is given for structures holding a zstd stream: it maps the bytes to a form with
    the stream decompressed. Only when the zstd library is not the one that made the vector may the
    bytes differ, and then only inside the stream."""
    if REGENERATE:
        write_golden(name, built, compressed=canonical is not None)
        return
    expected, meta = read_golden(name)
    if built == expected:
        return
    if canonical is not None and meta.get("zstd") != _zstd_version():
        assert canonical(built) == canonical(expected), f"{name}: differs beyond its zstd stream"
        return
    pytest.fail(f"{name}: the bytes differ from tests/disks/golden/{name}.hex: {_first_difference(built, expected)}")


DESCRIPTIONS = {
    "vhdx_file_type_identifier": "[MS-VHDX] 2.2.1 File Type Identifier (64 KiB), creator 'hvbackup golden'",
    "vhdx_header": "[MS-VHDX] 2.2.2 Header (4 KiB), a clean file: LogGuid zero, log at 1 MiB",
    "vhdx_header_log_pending": "[MS-VHDX] 2.2.2 Header (4 KiB) naming a log to replay (LogGuid set)",
    "vhdx_region_table": "[MS-VHDX] 2.2.3 Region Table (64 KiB): BAT at 3 MiB, metadata at 2 MiB",
    "vhdx_bat_differencing": "[MS-VHDX] 2.5 BAT of a 5 GiB differencing file, 2 MiB blocks: every entry state",
    "vhdx_log_entry_data": "[MS-VHDX] 2.3.1 Log entry: header, two data descriptors, two data sectors",
    "vhdx_log_entry_zero": "[MS-VHDX] 2.3.1 Log entry: header, a zero descriptor, a data descriptor, a data sector",
    "vhdx_metadata_dynamic": ("[MS-VHDX] 2.6 Metadata region (1 MiB) of a 64 MiB dynamic disk, with hvbackup's "
                              "change tracking marker item (docs/tracking.md)"),
    "vhdx_metadata_differencing": "[MS-VHDX] 2.6 Metadata region (1 MiB) of a 5 GiB differencing disk",
    "vhdx_file_parameters": "[MS-VHDX] 2.6.2.1 File Parameters of a fixed disk (LeaveBlockAllocated)",
    "vhdx_parent_locator": "[MS-VHDX] 2.6.2.6 Parent Locator with all five VHDX locator keys",
    "vhdx_tracking_marker": "docs/tracking.md marker item: metadata table entry (32 bytes), then the item (20)",
    "vhd_footer_fixed": "VHD footer (512 bytes) of a fixed disk of 602/4/17 CHS",
    "vhd_footer_dynamic": "VHD footer (512 bytes) of a 64 MiB dynamic disk (maximum geometry)",
    "vhd_footer_differencing": "VHD footer (512 bytes) of a 64 MiB differencing disk",
    "vhd_dynamic_header": "VHD dynamic disk header (1024 bytes) of a 64 MiB dynamic disk",
    "vhd_differencing_header": "VHD dynamic disk header (1024 bytes) of a differencing disk: parent, W2ru, W2ku",
    "vhdx_sector_bitmap_page": "[MS-VHDX] 2.4 sector bitmap block, first 4 KiB page: sectors 3-12 and 32767 present",
    "vhd_sector_bitmap": "VHD sector bitmap of a 2 MiB block (512 bytes): sectors 3-12 and 4095 present",
    "vhd_bat": "VHD BAT of a 64 MiB dynamic disk (32 entries padded to a sector): blocks 0 and 5 present",
    "rct_dense": "docs/tracking.md .rct, dense payload, three earlier lineages",
    "rct_runs": "docs/tracking.md .rct, runs payload, one earlier lineage continued",
    "mrt": "docs/tracking.md .mrt: 13 regions of 256 MiB, regions 0, 2, 3, 8 and 12 marked",
    "repo_config": "docs/repository.md config frame (HVBKCONF), unencrypted repository",
    "repo_config_encrypted": "docs/repository.md config frame (HVBKCONF), encrypted repository (scrypt, AES-256-GCM)",
    "repo_chunk_plain": "docs/repository.md chunk frame (HVBKCHNK), stored as it is (flags 0): a 512-byte tail",
    "repo_chunk_compressed": "docs/repository.md chunk frame (HVBKCHNK), zstd (flags COMPRESSED): 64 KiB",
    "repo_chunk_plain_encrypted": "docs/repository.md chunk frame, ENCRYPTED, not compressed; fixed nonce",
    "repo_chunk_compressed_encrypted": "docs/repository.md chunk frame, COMPRESSED and ENCRYPTED; fixed nonce",
    "repo_manifest": "docs/repository.md manifest frame (HVBKMANI): two disks, chunk index with names and zero runs",
    "repo_manifest_encrypted": "docs/repository.md manifest frame, encrypted repository; fixed nonce",
    "windows_rsvd_vhds": ("samples/rsvd.vhds, a VHD Set written by Windows 10.0.10011 (from Microsoft's "
                          "WindowsProtocolTestSuites, MIT): a peer's bytes, not made by hvbackup"),
}


# ------------------------------------------------------------------------------------------------
# Spec helpers written from the specifications, not from the project's code.
# ------------------------------------------------------------------------------------------------

def ms_guid(text: str) -> bytes:
    """[MS-DTYP] 2.3.4.2: a GUID in binary form — Data1 (u32), Data2, Data3 (u16) little-endian, then
    Data4's eight bytes as they are. [MS-VHDX] 2.2.3 uses GUIDs "in their binary form"."""
    digits = text.strip("{}").replace("-", "")
    return struct.pack("<IHH", int(digits[:8], 16), int(digits[8:12], 16), int(digits[12:16], 16)) + \
        bytes.fromhex(digits[16:])


def spec_crc(data: bytes, field: int) -> int:
    """[MS-VHDX] 2: CRC-32C over the structure with its Checksum field taken as zero."""
    return crc32c(data[:field] + bytes(4) + data[field + 4:])


def vhd_spec_checksum(data: bytes, field: int) -> int:
    """VHD spec, Hard Disk Footer "Checksum": one's complement of the sum of all bytes, the checksum
    field itself left out."""
    return ~sum(data[:field] + data[field + 4:]) & 0xFFFFFFFF


def vhd_spec_chs(total_sectors: int) -> tuple[int, int, int]:
    """VHD spec Appendix, "CHS Calculation", transcribed."""
    if total_sectors > 65535 * 16 * 255:
        total_sectors = 65535 * 16 * 255
    if total_sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total_sectors // spt
    else:
        spt = 17
        cth = total_sectors // spt
        heads = (cth + 1023) // 1024
        if heads < 4:
            heads = 4
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total_sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total_sectors // spt
    return cth // heads, heads, spt


def u16(data, at): return struct.unpack_from("<H", data, at)[0]
def u32(data, at): return struct.unpack_from("<I", data, at)[0]
def u64(data, at): return struct.unpack_from("<Q", data, at)[0]
def be32(data, at): return struct.unpack_from(">I", data, at)[0]
def be64(data, at): return struct.unpack_from(">Q", data, at)[0]


def test_the_checksum_algorithms_are_the_specified_ones():
    # [MS-VHDX] 2: CRC-32C, Castagnoli polynomial 0x1EDC6F41; its standard check value.
    assert crc32c(b"123456789") == 0xE3069283
    # BLAKE3-256 (docs/repository.md): the reference test vector of the empty input.
    assert blake3(b"").hexdigest() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    # [MS-DTYP] binary GUID layout, checked on the spec's BAT region GUID.
    assert ms_guid("2DC27766-F623-4200-9D64-115E9BFD4A08").hex() == "6677c22d23f600429d64115e9bfd4a08"


# ------------------------------------------------------------------------------------------------
# Fixed inputs
# ------------------------------------------------------------------------------------------------

FILE_WRITE_GUID = uuid.UUID("0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0")
DATA_WRITE_GUID = uuid.UUID("a1b2c3d4-e5f6-4708-9a1b-2c3d4e5f6071")
LOG_GUID = uuid.UUID("5c4b3a29-1807-4f6e-8d7c-6b5a49382716")
DISK_ID = uuid.UUID("c0ffee00-1234-4abc-9def-0123456789ab")
PARENT_DWG = uuid.UUID("83ed0ec3-24c8-49a6-a959-5e4bf1288bfb")   # the example of [MS-VHDX] 2.6.2.6.3
PARENT_DWG2 = uuid.UUID("0d5f4c6a-7b8e-4f90-a1b2-c3d4e5f60718")
LINEAGE = uuid.UUID("5bfde23b-ce75-4303-b54f-6c18394f105c")       # the example of docs/tracking.md
EARLIER = [uuid.UUID("11111111-2222-4333-8444-555555555555"), uuid.UUID("66666666-7777-4888-9999-aaaaaaaaaaaa"),
           uuid.UUID("bbbbbbbb-cccc-4ddd-aeee-ffff00001111")]
VHD_ID = uuid.UUID("d2e3f405-1627-4839-9a4b-5c6d7e8f9012")
VHD_PARENT_ID = uuid.UUID("0a1b2c3d-4e5f-4061-8273-9485a6b7c8d9")
VHD_TIME = 0x30B4E6C0           # seconds since 2000-01-01: 2025-11-22 21:25:20 UTC
VHD_CREATOR_VERSION = 0x00010002
HEADER_SEQUENCE = 0x0102030405060708
LOG_SEQUENCE = 0x0000000A0000000B   # SequenceHigh 0xA, SequenceLow 0xB ([MS-VHDX] 2.3.1.4)

VHD_FIXED_SIZE = 602 * 4 * 17 * 512   # exactly its standard CHS geometry
VHD_DYNAMIC_SIZE = 64 * MiB            # not a CHS size: the maximum geometry stands for it
VHD_BLOCK = 2 * MiB
VHD_TABLE_OFFSET = 1536
VHD_BLOCK0_AT = 2048                       # right after the one-sector BAT
VHD_BLOCK5_AT = VHD_BLOCK0_AT + 512 + VHD_BLOCK   # sector bitmap (one sector) + data
VHD_RELATIVE = ".\\parent.vhd"
VHD_ABSOLUTE = "C:\\vms\\parent.vhd"

REPO_ID = "0123456789abcdef0123456789abcdef"
ENC_REPO_ID = "fedcba9876543210fedcba9876543210"
CHUNK_SIZE = 64 * 1024
POINT_ID = "20261125T181030.512345Z-3e3e2d06"   # the example of docs/repository.md
PASSPHRASE = "golden passphrase"
MASTER = bytes(range(64))
SALT = bytes(range(100, 132))
WRAP_NONCE = b"\x11" * 12
NONCES = {"plain": b"\x22" * 12, "compressed": b"\x33" * 12, "manifest": b"\x44" * 12}
PIECE_A = (b"hvbackup golden chunk A: the same 64 KiB twice on disk 0. " * 1200)[:CHUNK_SIZE]
PIECE_T = blake3(b"hvbackup golden tail").digest(length=512)    # incompressible: stored as it is
DISK0_SIZE = 6 * CHUNK_SIZE + 512      # 7 pieces; the last is a 512-byte tail
DISK1_SIZE = 4 * GiB                   # 65536 pieces, all zero


# ================================================================================================
# VHDX
# ================================================================================================

def build_identifier() -> bytes:
    return vident.FileTypeIdentifier("hvbackup golden").pack().ljust(vident.SIZE, b"\0")


def test_vhdx_file_type_identifier():
    check_golden("vhdx_file_type_identifier", build_identifier())
    data = golden("vhdx_file_type_identifier")
    # [MS-VHDX] 2.2.1: Signature 0x7668647866696C65 "vhdxfile", then Creator, UTF-16, 512 bytes.
    assert len(data) == 64 * 1024
    assert data[:8] == bytes.fromhex("7668647866696C65") == b"vhdxfile"
    assert data[8:8 + 512].decode("utf-16-le").rstrip("\0") == "hvbackup golden"
    assert not any(data[8 + 512:])  # reserved up to the 64 KiB boundary
    assert vident.FileTypeIdentifier.unpack(data).creator == "hvbackup golden"
    with pytest.raises(DiskFormatError) as caught:
        vident.FileTypeIdentifier.unpack(b"vhdxfilf" + data[8:])
    assert caught.value.reason == "vhdx.identifier.signature"


def build_header(log_guid=vheader.NULL_GUID, sequence=HEADER_SEQUENCE) -> bytes:
    return vheader.Header(sequence_number=sequence, file_write_guid=FILE_WRITE_GUID,
                          data_write_guid=DATA_WRITE_GUID, log_guid=log_guid,
                          log_length=MiB, log_offset=MiB).pack()


def _assert_spec_header(data: bytes, log_guid: uuid.UUID) -> None:
    # [MS-VHDX] 2.2.2: the 4 KiB header, field by field.
    assert len(data) == 4096
    assert data[0:4] == bytes.fromhex("68656164") == b"head"
    assert u32(data, 4) == spec_crc(data, 4)
    assert u64(data, 8) == HEADER_SEQUENCE
    assert data[16:32] == ms_guid(str(FILE_WRITE_GUID))
    assert data[32:48] == ms_guid(str(DATA_WRITE_GUID))
    assert data[48:64] == ms_guid(str(log_guid))
    assert u16(data, 64) == 0       # LogVersion MUST be 0
    assert u16(data, 66) == 1       # Version MUST be 1
    assert u32(data, 68) == MiB     # LogLength
    assert u64(data, 72) == MiB     # LogOffset
    assert not any(data[80:])       # Reserved (4016 bytes) MUST be 0


@pytest.mark.parametrize("name, log_guid", [("vhdx_header", vheader.NULL_GUID),
                                            ("vhdx_header_log_pending", LOG_GUID)])
def test_vhdx_header(name, log_guid):
    check_golden(name, build_header(log_guid))
    data = golden(name)
    _assert_spec_header(data, log_guid)
    parsed = vheader.Header.unpack(data)
    assert parsed == vheader.Header(HEADER_SEQUENCE, FILE_WRITE_GUID, DATA_WRITE_GUID, log_guid, MiB, MiB, 0, 1)
    assert parsed.log_pending == (log_guid != vheader.NULL_GUID)
    vheader.validate(parsed)
    # A reserved byte is covered by the checksum: one flipped bit makes the header invalid.
    damaged = bytearray(data)
    damaged[2000] ^= 1
    assert vheader.Header.unpack(bytes(damaged)) is None


REGIONS = (
    vregion.RegionEntry(vregion.BAT_GUID, 3 * MiB, MiB, True),
    vregion.RegionEntry(vregion.METADATA_GUID, 2 * MiB, MiB, True),
)


def test_vhdx_region_table():
    check_golden("vhdx_region_table", vregion.RegionTable(REGIONS).pack())
    data = golden("vhdx_region_table")
    # [MS-VHDX] 2.2.3.1 header, then 2.2.3.2 entries of 32 bytes; CRC over the whole 64 KiB table.
    assert len(data) == 64 * 1024
    assert data[0:4] == bytes.fromhex("72656769") == b"regi"
    assert u32(data, 4) == spec_crc(data, 4)
    assert u32(data, 8) == 2 and u32(data, 12) == 0
    # The known regions' GUIDs of the 2.2.3 table, in binary form; both IsRequired.
    assert data[16:32] == ms_guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
    assert (u64(data, 32), u32(data, 40), u32(data, 44)) == (3 * MiB, MiB, 1)
    assert data[48:64] == ms_guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
    assert (u64(data, 64), u32(data, 72), u32(data, 76)) == (2 * MiB, MiB, 1)
    assert not any(data[80:])
    assert vregion.RegionTable.unpack(data).entries == REGIONS


# -- BAT ------------------------------------------------------------------------------------------

BAT_GEOMETRY = dict(virtual_size=5 * GiB, block_size=2 * MiB, logical_sector_size=512, has_parent=True)
# block -> (state, file offset); [MS-VHDX] 2.5.1.1 states, values from the spec's table.
BAT_PAYLOAD = {
    0: (6, 4 * MiB),              # PAYLOAD_BLOCK_FULLY_PRESENT
    1: (7, 6 * MiB),              # PAYLOAD_BLOCK_PARTIALLY_PRESENT
    2: (2, 0),                    # PAYLOAD_BLOCK_ZERO
    3: (3, 8 * MiB),              # PAYLOAD_BLOCK_UNMAPPED keeping a soft anchor
    4: (1, 0),                    # PAYLOAD_BLOCK_UNDEFINED
    5: (5, 0),                    # UNMAPPED as v0.95 numbered it (read, never written by hvbackup)
    2047: (6, 0x123456 * MiB),    # the last block of chunk 0, far out: FileOffsetMB spans three bytes
    2048: (7, 14 * MiB),          # the first block of chunk 1
    2559: (6, 16 * MiB),          # the last block of the disk
}
BAT_BITMAP = {0: (6, 12 * MiB), 1: (6, 13 * MiB)}   # [MS-VHDX] 2.5.1.2 SB_BLOCK_PRESENT


def build_bat() -> bytes:
    table = vbat.Bat(vbat.Geometry(**BAT_GEOMETRY), 3 * MiB)
    for block, (state, offset) in BAT_PAYLOAD.items():
        table.set_payload(block, state, offset)
    for chunk, (state, offset) in BAT_BITMAP.items():
        table.set_bitmap(chunk, state, offset)
    return table.table.view(np.uint8)[:vbat.Bat.page_bytes_needed(table.geometry)].tobytes()


def test_vhdx_bat_entries():
    check_golden("vhdx_bat_differencing", build_bat())
    data = golden("vhdx_bat_differencing")
    # [MS-VHDX] 2.4: chunk ratio = 2^23 x LogicalSectorSize / BlockSize = 2048 here; 2.5: a
    # differencing file has SectorBitmapBlocks x (ChunkRatio + 1) entries; the bitmap entry of a
    # chunk follows its payload entries, so payload block b is entry b + floor(b / 2048).
    ratio = (1 << 23) * 512 // (2 * MiB)
    data_blocks = -(-5 * GiB // (2 * MiB))
    entries = -(-data_blocks // ratio) * (ratio + 1)
    assert (ratio, data_blocks, entries) == (2048, 2560, 4098)
    values = struct.unpack_from(f"<{entries}Q", data)
    expected = {b + b // ratio: v for b, v in BAT_PAYLOAD.items()}
    expected.update({c * (ratio + 1) + ratio: v for c, v in BAT_BITMAP.items()})
    for index, value in enumerate(values):
        state, offset = expected.get(index, (0, 0))
        # 2.5.1: State in bits 0-2, Reserved bits 3-19 zero, FileOffsetMB in bits 20-63.
        assert (value & 7, (value >> 3) & 0x1FFFF, (value >> 20) * MiB) == (state, 0, offset), index
    assert not any(data[entries * 8:])
    # 0x123456 MiB: FileOffsetMB << 20 | FULLY_PRESENT, little-endian.
    assert data[(2047 + 0) * 8:(2047 + 1) * 8] == bytes.fromhex("0600604523010000")

    table = vbat.Bat(vbat.Geometry(**BAT_GEOMETRY), 3 * MiB)
    table.load(0, data)
    for block, (state, offset) in BAT_PAYLOAD.items():
        assert table.payload(block) == vbat.entry(state, offset) == offset // MiB << 20 | state
    for chunk, (state, offset) in BAT_BITMAP.items():
        assert table.bitmap(chunk) == offset // MiB << 20 | state
    table.validate()
    starts, ends, states = table.payload_runs(0, data_blocks)
    assert list(zip(starts.tolist(), ends.tolist(), states.tolist()))[:7] == [
        (0, 1, 6), (1, 2, 7), (2, 3, 2), (3, 4, 3), (4, 5, 1), (5, 6, 5), (6, 2047, 0)]
    # The same entries in a file without a parent: PARTIALLY_PRESENT and SB_BLOCK_PRESENT are not
    # valid there (2.5.1.1, 2.5.1.2).
    dynamic = vbat.Bat(vbat.Geometry(**{**BAT_GEOMETRY, "has_parent": False}), 3 * MiB)
    dynamic.load(0, data[:vbat.Bat.page_bytes_needed(dynamic.geometry)])
    with pytest.raises(DiskFormatError) as caught:
        dynamic.validate()
    assert caught.value.reason == "vhdx.bat.state"


def build_vhdx_bitmap_page() -> bytes:
    bitmaps = SectorBitmaps(lambda offset: bytes(MiB))
    bitmaps.attach(0, 12 * MiB, fresh=True)
    bitmaps.mark_present(0, 12 * MiB, 3, 10)          # sectors 3-12
    bitmaps.mark_present(0, 12 * MiB, 32767, 1)       # the last sector the first 4 KiB page covers
    [(offset, page)] = bitmaps.pages_to_commit()
    assert offset == 12 * MiB
    return page


def test_vhdx_sector_bitmap_bit_order():
    check_golden("vhdx_sector_bitmap_page", build_vhdx_bitmap_page())
    data = golden("vhdx_sector_bitmap_page")
    # [MS-VHDX] 2.4: "Bit 0 (that is, bit 0 of byte 0) is the entry for the first virtual sector";
    # bit 0 is the least significant bit (section 2). Sectors 3-12, and sector 32767.
    assert data[0] == 0b11111000 and data[1] == 0b00011111 and data[4095] == 0b10000000
    assert not any(data[2:4095])
    bitmaps = SectorBitmaps(lambda offset: data.ljust(MiB, b"\0"))
    assert bitmaps.runs(0, 12 * MiB, 0, 32768) == [(False, 0, 3), (True, 3, 10), (False, 13, 32754), (True, 32767, 1)]


# -- log ------------------------------------------------------------------------------------------

def _page(seed: int) -> bytes:
    """A 4 KiB metadata page whose first 8 and last 4 bytes (which move into the descriptor) differ."""
    page = bytearray(4096)
    page[0:8] = bytes(range(seed, seed + 8))
    page[8:16] = b"BAT page"
    page[2048:2056] = struct.pack("<Q", seed * 0x0101010101)
    page[4092:4096] = bytes(range(seed + 100, seed + 104))
    return bytes(page)


LOG_PAGES = [(3 * MiB, _page(1)), (3 * MiB + 4096, _page(50))]
ZERO_RANGE = (2 * MiB + 64 * 1024, 8192)   # (file offset, length) of the zero descriptor


def spec_log_entry(descriptors: list, sequence: int, tail: int, flushed: int, last: int) -> bytes:
    """A log entry written from [MS-VHDX] 2.3.1 alone. ``descriptors``: ("zero", offset, length) or
    ("data", offset, 4 KiB page), in order."""
    data_pages = [d for d in descriptors if d[0] == "data"]
    assert len(descriptors) <= 126
    buf = bytearray(4096 * (1 + len(data_pages)))
    # 2.3.1.1 Entry Header: "loge", Checksum, EntryLength, Tail, SequenceNumber, DescriptorCount,
    # Reserved, LogGuid, FlushedFileOffset, LastFileOffset.
    struct.pack_into("<4sIIIQII16sQQ", buf, 0, b"loge", 0, len(buf), tail, sequence, len(descriptors), 0,
                     ms_guid(str(LOG_GUID)), flushed, last)
    sector = 1
    for i, d in enumerate(descriptors):
        at = 64 + 32 * i
        if d[0] == "zero":
            # 2.3.1.2: "zero", Reserved, ZeroLength, FileOffset, SequenceNumber.
            struct.pack_into("<4sIQQQ", buf, at, b"zero", 0, d[2], d[1], sequence)
        else:
            page = d[2]
            # 2.3.1.3: "desc", TrailingBytes (bytes 4092-4095), LeadingBytes (0-7), FileOffset, Seq.
            struct.pack_into("<4s4s8sQQ", buf, at, b"desc", page[4092:], page[:8], d[1], sequence)
            # 2.3.1.4: "data", SequenceHigh, bytes 8-4091 of the update, SequenceLow.
            s = 4096 * sector
            buf[s:s + 4096] = (b"data" + struct.pack("<I", sequence >> 32) + page[8:4092]
                               + struct.pack("<I", sequence & 0xFFFFFFFF))
            sector += 1
    struct.pack_into("<I", buf, 4, crc32c(bytes(buf)))   # the Checksum field is zero here
    return bytes(buf)


def _parse(entry: bytes) -> vlog.LogEntry | None:
    ring = entry.ljust(MiB, b"\0")
    return vlog.parse_entry(lambda pos, n: ring[pos:pos + n], 0, MiB, LOG_GUID)


def test_vhdx_log_entry_with_data_descriptors():
    built = vlog.build_entry(sequence=LOG_SEQUENCE, tail=0, log_guid=LOG_GUID, pages=LOG_PAGES,
                             flushed_file_offset=8 * MiB, last_file_offset=9 * MiB)
    check_golden("vhdx_log_entry_data", built)
    data = golden("vhdx_log_entry_data")
    # The project's entry is exactly the one the spec's layout gives.
    assert data == spec_log_entry([("data", o, p) for o, p in LOG_PAGES], LOG_SEQUENCE, 0, 8 * MiB, 9 * MiB)
    assert data[0:4] == b"loge" and u32(data, 4) == spec_crc(data, 4) and u32(data, 8) == 3 * 4096
    assert data[64:68] == b"desc" and data[96:100] == b"desc"
    assert data[4096:4100] == b"data" and u32(data, 4100) == 0xA and u32(data, 8188) == 0xB
    entry = _parse(data)
    assert (entry.length, entry.tail, entry.sequence, entry.flushed_file_offset, entry.last_file_offset) == (
        3 * 4096, 0, LOG_SEQUENCE, 8 * MiB, 9 * MiB)
    assert entry.updates == [(o, p, 4096) for o, p in LOG_PAGES]
    # An entry whose tail is itself is a whole active sequence ([MS-VHDX] 2.3.2).
    sequence = find_active_sequence(data.ljust(MiB, b"\0"), LOG_GUID)
    assert [e.sequence for e in sequence] == [LOG_SEQUENCE]


def test_vhdx_log_entry_with_a_zero_descriptor():
    # hvbackup writes no zero descriptors (it logs whole pages); other writers do, and replay must
    # read them. The vector is written from the spec; the project's parser must accept it.
    descriptors = [("zero", *ZERO_RANGE), ("data", *LOG_PAGES[0])]
    check_golden("vhdx_log_entry_zero", spec_log_entry(descriptors, LOG_SEQUENCE, 0, 8 * MiB, 9 * MiB))
    data = golden("vhdx_log_entry_zero")
    assert data[64:68] == b"zero" and u32(data, 68) == 0
    assert (u64(data, 72), u64(data, 80), u64(data, 88)) == (ZERO_RANGE[1], ZERO_RANGE[0], LOG_SEQUENCE)
    entry = _parse(data)
    assert entry.updates == [(ZERO_RANGE[0], None, ZERO_RANGE[1]), (LOG_PAGES[0][0], LOG_PAGES[0][1], 4096)]
    # One byte of the data sector changed: the checksum over the whole entry no longer matches.
    damaged = bytearray(data)
    damaged[4096 + 100] ^= 1
    assert _parse(bytes(damaged)) is None


# -- metadata -------------------------------------------------------------------------------------

MARKER_ENTRY_FLAGS = 0b011   # docs/tracking.md: IsUser = 1, IsVirtualDisk = 1, IsRequired = 0
DYNAMIC_SIZE = 64 * MiB


def _marker_item() -> bytes:
    # docs/tracking.md "Where tracking lives": lineage GUID (binary form), version u32 = 1.
    return ms_guid(str(LINEAGE)) + struct.pack("<I", 1)


def build_dynamic_metadata() -> bytes:
    marker = vmeta.MetadataEntry(MARKER_ITEM, 0, 20, is_user=True, is_virtual_disk=True)
    return vmeta.Metadata(
        file_parameters=vmeta.FileParameters(32 * MiB), virtual_size=DYNAMIC_SIZE, disk_id=DISK_ID,
        logical_sector_size=512, physical_sector_size=4096, other_items=((marker, _marker_item()),),
    ).pack(MiB)


DIFFERENCING_LOCATOR = {"parent_linkage": "{" + str(PARENT_DWG) + "}", "relative_path": "parent.vhdx",
                        "absolute_win32_path": "\\\\?\\C:\\vms\\parent.vhdx"}


def build_differencing_metadata() -> bytes:
    return vmeta.Metadata(
        file_parameters=vmeta.FileParameters(2 * MiB, has_parent=True), virtual_size=5 * GiB, disk_id=DISK_ID,
        logical_sector_size=512, physical_sector_size=4096, parent_locator=ParentLocator(DIFFERENCING_LOCATOR),
    ).pack(MiB)


# [MS-VHDX] 2.6.2 table of known items: GUID, and the flags IsUser / IsVirtualDisk / IsRequired.
KNOWN_ITEMS = {
    "file_parameters": ("CAA16737-FA36-4D43-B3B6-33F0AA44E76B", 0b100),
    "virtual_disk_size": ("2FA54224-CD1B-4876-B211-5DBED83BF4B8", 0b110),
    "virtual_disk_id": ("BECA12AB-B2E6-4523-93EF-C309E000C746", 0b110),   # "page 83 data" before v1.00
    "logical_sector_size": ("8141BF1D-A96F-4709-BA47-F233A8FAAB5F", 0b110),
    "physical_sector_size": ("CDA348C7-445D-4471-9CC9-E9885251C556", 0b110),
    "parent_locator": ("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C", 0b100),
}


def spec_metadata_items(region: bytes) -> dict[bytes, tuple[int, bytes]]:
    """[MS-VHDX] 2.6.1: {binary ItemID: (flags, item bytes)} from the table, checking the table
    header and each entry's rules on the way."""
    assert region[0:8] == bytes.fromhex("617461646174656D")[::-1] == b"metadata"   # 0x617461646174656D LE
    assert u16(region, 8) == 0 and not any(region[12:32])          # Reserved, Reserved2
    count = u16(region, 10)
    items = {}
    for i in range(count):
        at = 32 + 32 * i
        item_id, offset, length, flags, reserved2 = struct.unpack_from("<16sIIII", region, at)
        assert flags >> 3 == 0 and reserved2 == 0                   # Reserved (29 bits), Reserved2
        assert offset >= 64 * 1024 and offset + length <= len(region) and length <= MiB
        items[item_id] = (flags, region[offset:offset + length])
    assert not any(region[32 + 32 * count:64 * 1024])
    return items


def test_vhdx_metadata_region_of_a_dynamic_disk():
    check_golden("vhdx_metadata_dynamic", build_dynamic_metadata())
    data = golden("vhdx_metadata_dynamic")
    items = spec_metadata_items(data)
    expected = {
        "file_parameters": struct.pack("<II", 32 * MiB, 0),           # 2.6.2.1: BlockSize, no flags
        "virtual_disk_size": struct.pack("<Q", DYNAMIC_SIZE),         # 2.6.2.2
        "virtual_disk_id": ms_guid(str(DISK_ID)),                     # 2.6.2.3
        "logical_sector_size": struct.pack("<I", 512),                # 2.6.2.4
        "physical_sector_size": struct.pack("<I", 4096),              # 2.6.2.5
    }
    for name, item in expected.items():
        guid, flags = KNOWN_ITEMS[name]
        assert items.pop(ms_guid(guid)) == (flags, item), name
    # The one other item is hvbackup's change tracking marker (docs/tracking.md).
    assert items == {ms_guid("7f1e3c52-9a4b-4d6e-8c21-5b0f9e4a6d13"): (MARKER_ENTRY_FLAGS, _marker_item())}

    parsed = vmeta.Metadata.read(lambda off, n: data[off:off + n], MiB)
    assert parsed.file_parameters == vmeta.FileParameters(32 * MiB, False, False)
    assert (parsed.virtual_size, parsed.disk_id, parsed.logical_sector_size, parsed.physical_sector_size) == (
        DYNAMIC_SIZE, DISK_ID, 512, 4096)
    assert parsed.parent_locator is None
    [(entry, item)] = parsed.other_items
    assert (entry.item_id, entry.is_user, entry.is_virtual_disk, entry.is_required, item) == (
        MARKER_ITEM, True, True, False, _marker_item())


def test_vhdx_metadata_region_of_a_differencing_disk():
    check_golden("vhdx_metadata_differencing", build_differencing_metadata())
    data = golden("vhdx_metadata_differencing")
    items = spec_metadata_items(data)
    guid, flags = KNOWN_ITEMS["file_parameters"]
    assert items[ms_guid(guid)] == (flags, struct.pack("<II", 2 * MiB, 0b10))   # HasParent (bit 1)
    guid, flags = KNOWN_ITEMS["parent_locator"]
    assert items[ms_guid(guid)][0] == flags
    assert spec_locator(items[ms_guid(guid)][1]) == DIFFERENCING_LOCATOR
    assert len(items) == 6
    parsed = vmeta.Metadata.read(lambda off, n: data[off:off + n], MiB)
    assert parsed.file_parameters.has_parent and parsed.virtual_size == 5 * GiB
    assert parsed.parent_locator.entries == DIFFERENCING_LOCATOR
    assert parsed.parent_locator.linkages == [PARENT_DWG]


def test_vhdx_file_parameters_item():
    check_golden("vhdx_file_parameters", vmeta.FileParameters(32 * MiB, leave_block_allocated=True).pack())
    data = golden("vhdx_file_parameters")
    # [MS-VHDX] 2.6.2.1: BlockSize u32; bit 0 LeaveBlockAllocated, bit 1 HasParent, 30 bits reserved.
    assert data == bytes.fromhex("00000002" "01000000")
    assert vmeta.FileParameters.unpack(data) == vmeta.FileParameters(32 * MiB, True, False)
    with pytest.raises(DiskFormatError) as caught:
        vmeta.FileParameters.unpack(data[:4] + bytes.fromhex("04000000"))
    assert caught.value.reason == "vhdx.metadata.reserved-bits"


ALL_LOCATOR_KEYS = {
    "parent_linkage": "{" + str(PARENT_DWG) + "}",
    "parent_linkage2": "{" + str(PARENT_DWG2) + "}",
    "relative_path": "..\\..\\path2\\sub3\\parent.vhdx",
    "volume_path": "\\\\?\\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\\path2\\sub3\\parent.vhdx",
    "absolute_win32_path": "\\\\?\\d:\\path2\\sub3\\parent.vhdx",
}   # the examples of [MS-VHDX] 2.6.2.6.3


def spec_locator(item: bytes) -> dict[str, str]:
    """[MS-VHDX] 2.6.2.6.1 header (20 bytes) and 2.6.2.6.2 entries (12 bytes), read from the spec."""
    assert item[0:16] == ms_guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")   # 2.6.2.6.3 VHDX locator type
    assert u16(item, 16) == 0                                               # Reserved
    entries = {}
    for i in range(u16(item, 18)):
        key_off, value_off, key_len, value_len = struct.unpack_from("<IIHH", item, 20 + 12 * i)
        assert key_off > 0 and value_off > 0 and key_len > 0 and value_len > 0
        key = item[key_off:key_off + key_len].decode("utf-16-le")
        value = item[value_off:value_off + value_len].decode("utf-16-le")
        assert "\0" not in key + value                 # no NUL inside, none counted at the end
        entries[key] = value
    return entries


def test_vhdx_parent_locator():
    check_golden("vhdx_parent_locator", ParentLocator(ALL_LOCATOR_KEYS).pack())
    data = golden("vhdx_parent_locator")
    assert spec_locator(data) == ALL_LOCATOR_KEYS
    # 2.6.2.6.3: the linkage is a lowercase GUID in braces.
    assert ALL_LOCATOR_KEYS["parent_linkage"] == ALL_LOCATOR_KEYS["parent_linkage"].lower()
    parsed = ParentLocator.unpack(data)
    assert parsed.entries == ALL_LOCATOR_KEYS
    assert parsed.linkages == [PARENT_DWG, PARENT_DWG2]


# -- whole files: vectors assembled, and the tracking marker written by the project --------------

def assemble_vhdx(path: Path) -> None:
    """A 64 MiB dynamic VHDX made only of the vectors (the second header is the first one numbered
    one lower, so the vector is current). The BAT is all zeros: every block NOT_PRESENT."""
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        for offset, data in [(0, golden("vhdx_file_type_identifier")), (64 * 1024, golden("vhdx_header")),
                             (128 * 1024, build_header(sequence=HEADER_SEQUENCE - 1)),
                             (192 * 1024, golden("vhdx_region_table")), (256 * 1024, golden("vhdx_region_table")),
                             (2 * MiB, golden("vhdx_metadata_dynamic"))]:
            f.seek(offset)
            f.write(data)


@pytest.mark.interop
def test_assembled_vhdx_is_read_by_hvbackup_qemu_and_libvhdi(tmp_path):
    path = tmp_path / "golden.vhdx"
    assemble_vhdx(path)
    with VhdxDisk.open(str(path), read_only=True) as disk:
        assert (disk.size, disk.block_size, disk.logical_sector_size, disk.physical_sector_size) == (
            DYNAMIC_SIZE, 32 * MiB, 512, 4096)
        assert disk.disk_id == DISK_ID and disk.data_write_guid == DATA_WRITE_GUID
        assert read_marker(disk) == LINEAGE
        assert disk.read(0, 4096) == bytes(4096)
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "vhdx", str(path)).stdout)
    assert info["virtual-size"] == DYNAMIC_SIZE and info["cluster-size"] == 32 * MiB
    run("qemu-img", "check", "-f", "vhdx", str(path))
    import pyvhdi

    f = pyvhdi.file()
    f.open(str(path))
    try:
        # libvhdi reports the header's DataWriteGuid as the file's identifier.
        assert (f.media_size, f.bytes_per_sector, f.identifier) == (DYNAMIC_SIZE, 512, str(DATA_WRITE_GUID))
    finally:
        f.close()


def test_tracking_marker_written_through_the_project(tmp_path):
    path = str(tmp_path / "tracked.vhdx")
    create_vhdx(path, DYNAMIC_SIZE, block_size=32 * MiB)
    with VhdxDisk.open(path) as disk:
        write_marker(disk, LINEAGE)
        real_id = disk.disk_id
    region = _read_spec_vhdx(Path(path))["metadata"]
    # The whole metadata region create_vhdx and write_marker leave is the vector, but for the
    # random Virtual Disk ID.
    assert region.replace(real_id.bytes_le, DISK_ID.bytes_le) == golden("vhdx_metadata_dynamic")
    count = u16(region, 10)
    marker = next(32 + 32 * i for i in range(count) if region[32 + 32 * i:48 + 32 * i] == ms_guid(str(MARKER_ITEM)))
    offset, length = u32(region, marker + 16), u32(region, marker + 20)
    check_golden("vhdx_tracking_marker", region[marker:marker + 32] + region[offset:offset + length])
    data = golden("vhdx_tracking_marker")
    assert data[0:16] == ms_guid("7f1e3c52-9a4b-4d6e-8c21-5b0f9e4a6d13")
    assert (u32(data, 20), u32(data, 24), u32(data, 28)) == (20, MARKER_ENTRY_FLAGS, 0)
    assert data[32:] == _marker_item()


# -- real peers -----------------------------------------------------------------------------------

def _read_spec_vhdx(path: Path) -> dict:
    """The header section, metadata and BAT of a VHDX file read from the spec's offsets."""
    raw = path.read_bytes()
    out = {"identifier": raw[:64 * 1024], "headers": [raw[o:o + 4096] for o in (64 * 1024, 128 * 1024)],
           "regions": [raw[o:o + 64 * 1024] for o in (192 * 1024, 256 * 1024)], "raw": raw}
    table = out["regions"][0]
    located = {table[16 + 32 * i:32 + 32 * i]: struct.unpack_from("<QII", table, 32 + 32 * i)
               for i in range(u32(table, 8))}
    out["located"] = located
    meta_at, meta_len, _ = located[ms_guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")]
    out["metadata"] = raw[meta_at:meta_at + meta_len]
    return out


@pytest.mark.interop
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_img_vhdx_parses_to_the_spec_fields(tmp_path, subformat):
    path = tmp_path / "qemu.vhdx"
    options = "subformat=dynamic" if subformat == "dynamic" else "subformat=fixed,block_state_zero=off"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", options, str(path), "16M")
    f = _read_spec_vhdx(path)
    creator = vident.FileTypeIdentifier.unpack(f["identifier"]).creator
    assert f["identifier"][:8] == b"vhdxfile" and creator.startswith("QEMU v")
    headers = [vheader.Header.unpack(h) for h in f["headers"]]
    for raw, parsed in zip(f["headers"], headers):
        assert raw[:4] == b"head" and u32(raw, 4) == spec_crc(raw, 4) and not any(raw[80:])
        assert (parsed.version, parsed.log_version, parsed.log_offset, parsed.log_length, parsed.log_pending) == (
            u16(raw, 66), u16(raw, 64), u64(raw, 72), u32(raw, 68), False) == (1, 0, MiB, MiB, False)
        assert parsed.data_write_guid.bytes_le == raw[32:48]
    assert abs(headers[0].sequence_number - headers[1].sequence_number) == 1
    for raw in f["regions"]:
        assert raw[:4] == b"regi" and u32(raw, 4) == spec_crc(raw, 4)
        table = vregion.RegionTable.unpack(raw)
        # The two known regions of 2.2.3, by their binary GUIDs. (qemu 7.2 writes Required = 0 for
        # both, against the spec's table, reference/vhdx-notes.md 1.1; a reader must accept it.)
        assert sorted(raw[16 + 32 * i:32 + 32 * i] for i in range(u32(raw, 8))) == sorted(
            [ms_guid("2DC27766-F623-4200-9D64-115E9BFD4A08"), ms_guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")])
        assert {e.guid for e in table.entries} == {vregion.BAT_GUID, vregion.METADATA_GUID}
    items = spec_metadata_items(f["metadata"])
    # qemu sets each known item's flags as the [MS-VHDX] 2.6.2 table says.
    for name, (guid, flags) in KNOWN_ITEMS.items():
        if name != "parent_locator":
            assert items[ms_guid(guid)][0] == flags, name
    md = vmeta.Metadata.read(lambda off, n: f["metadata"][off:off + n], len(f["metadata"]))
    fixed = subformat == "fixed"
    assert md.file_parameters == vmeta.FileParameters(8 * MiB, leave_block_allocated=fixed)
    assert (md.virtual_size, md.logical_sector_size, md.physical_sector_size) == (16 * MiB, 512, 512)
    assert md.disk_id.bytes_le == items[ms_guid(KNOWN_ITEMS["virtual_disk_id"][0])][1]
    # BAT: two 8 MiB blocks; qemu marks dynamic blocks ZERO (2) and gives fixed ones their place.
    bat_at, bat_len, _ = f["located"][ms_guid("2DC27766-F623-4200-9D64-115E9BFD4A08")]
    geometry = vbat.Geometry(16 * MiB, 8 * MiB, 512, has_parent=False)
    table = vbat.Bat(geometry, bat_at)
    table.load(0, f["raw"][bat_at:bat_at + vbat.Bat.page_bytes_needed(geometry)])
    table.validate()
    states = [table.payload(b) & 7 for b in range(2)]
    offsets = [table.payload(b) >> 20 << 20 for b in range(2)]
    if fixed:
        assert states == [6, 6] and all(o >= MiB for o in offsets) and offsets[1] == offsets[0] + 8 * MiB
    else:
        assert states == [2, 2] and offsets == [0, 0]
    with VhdxDisk.open(str(path), read_only=True) as disk:
        assert disk.size == 16 * MiB and disk.read(0, 4096) == bytes(4096)


WINDOWS_SAMPLE = Path("/work/shared/samples/rsvd.vhds")
WINDOWS_SAMPLE_SHA256 = "b56090e9b1c710f47e11e7fc70532fc7fb8dadd7d6b25edcf659d70962ba145c"


def test_windows_vhd_set_sample_uses_the_vhdx_checksum_rule():
    """The one file Windows made that we have: ``rsvd.vhds``, a VHD Set from Microsoft's protocol
    test suites, kept whole as the vector ``windows_rsvd_vhds`` (it is 17 non-zero rows) so the test
    runs where the shared samples are not mounted. Its format is undocumented
    (reference/rsvd-notes.md section 6), but it borrows [MS-VHDX] structures: an 8-byte signature and
    a UTF-16 creator as in 2.2.1, and two 4 KiB headers at 64 KiB and 128 KiB carrying a CRC-32C
    with the checksum field zeroed as in 2.2.2. hvbackup's checksum routine must reproduce what
    Windows wrote; and hvbackup must not take the file for a VHDX."""
    if REGENERATE and WINDOWS_SAMPLE.exists():
        write_golden("windows_rsvd_vhds", WINDOWS_SAMPLE.read_bytes(), compressed=False)
    data = golden("windows_rsvd_vhds")
    assert hashlib.sha256(data).hexdigest() == WINDOWS_SAMPLE_SHA256
    if WINDOWS_SAMPLE.exists():
        assert WINDOWS_SAMPLE.read_bytes() == data
    assert data[:8] == b"vhdsetv1"
    assert data[8:8 + 512].decode("utf-16-le").split("\0")[0] == "Microsoft Windows 10.0.10011.16384"
    for offset, sequence in [(64 * 1024, 0), (128 * 1024, 1)]:
        copy = data[offset:offset + 4096]
        assert copy[:4] == b"shdr" and u64(copy, 8) == sequence
        assert u32(copy, 0x14) == crc32c_with_zeroed_field(copy, 0x14) == spec_crc(copy, 0x14)
        assert vheader.Header.unpack(copy) is None       # not a VHDX header
    with pytest.raises(DiskFormatError) as caught:
        vident.FileTypeIdentifier.unpack(data)
    assert caught.value.reason == "vhdx.identifier.signature"


# ================================================================================================
# VHD
# ================================================================================================

def build_footer(kind: str) -> bytes:
    size = VHD_FIXED_SIZE if kind == "fixed" else VHD_DYNAMIC_SIZE
    return vhd_footer.Footer(
        disk_type=vhd_footer.TYPE_CODES[kind], current_size=size, original_size=size,
        geometry=geometry_for_size(size), unique_id=VHD_PARENT_ID if kind == "dynamic" else VHD_ID,
        data_offset=vhd_footer.NO_DATA_OFFSET if kind == "fixed" else 512, timestamp=VHD_TIME,
        creator_app=b"hvbk", creator_version=VHD_CREATOR_VERSION,
    ).pack()


@pytest.mark.parametrize("kind", ["fixed", "dynamic", "differencing"])
def test_vhd_footer(kind):
    name = f"vhd_footer_{kind}"
    check_golden(name, build_footer(kind))
    data = golden(name)
    size = VHD_FIXED_SIZE if kind == "fixed" else VHD_DYNAMIC_SIZE
    # VHD spec, "Hard Disk Footer Format": big-endian fields at fixed offsets.
    assert len(data) == 512
    assert data[0:8] == b"conectix"
    assert be32(data, 8) == 2                            # Features: the reserved bit must be set
    assert be32(data, 12) == 0x00010000                  # File Format Version 1.0
    assert be64(data, 16) == (0xFFFFFFFFFFFFFFFF if kind == "fixed" else 512)   # Data Offset
    assert be32(data, 24) == VHD_TIME                    # seconds since 2000-01-01 00:00:00 UTC
    assert data[28:32] == b"hvbk" and be32(data, 32) == VHD_CREATOR_VERSION and data[36:40] == b"Wi2k"
    assert be64(data, 40) == be64(data, 48) == size      # Original Size, Current Size
    geometry = struct.unpack_from(">HBB", data, 56)
    if kind == "fixed":
        # The CHS of the spec's appendix reproduces this size exactly, so it is recorded.
        assert geometry == vhd_spec_chs(size // 512) == (602, 4, 17)
        assert geometry[0] * geometry[1] * geometry[2] * 512 == size
    else:
        assert vhd_spec_chs(size // 512) == (963, 8, 17)   # 963 x 8 x 17 sectors fall short of 64 MiB,
        assert geometry == (65535, 16, 255)                 # so the maximum stands for "use Current Size"
    assert be32(data, 60) == {"fixed": 2, "dynamic": 3, "differencing": 4}[kind]
    assert be32(data, 64) == vhd_spec_checksum(data, 64)
    assert data[68:84] == (VHD_PARENT_ID if kind == "dynamic" else VHD_ID).bytes   # Unique Id
    assert data[84] == 0 and not any(data[85:])         # Saved State; 427 reserved bytes
    parsed = vhd_footer.Footer.unpack(data)
    assert (parsed.type_name, parsed.current_size, parsed.geometry, parsed.timestamp) == (
        kind, size, geometry, VHD_TIME)
    assert parsed.unique_id == (VHD_PARENT_ID if kind == "dynamic" else VHD_ID)
    damaged = bytearray(data)
    damaged[100] ^= 1
    with pytest.raises(DiskFormatError) as caught:
        vhd_footer.Footer.unpack(bytes(damaged))
    assert caught.value.reason == "vhd.footer.checksum"


def test_vhd_geometry_follows_the_spec_appendix():
    for size in (VHD_FIXED_SIZE, 64 * MiB, 127 * GiB, 2040 * GiB, 3 * MiB, 40 * GiB + 512):
        assert standard_geometry(size // 512) == vhd_spec_chs(size // 512), size


def _vhd_locator_data() -> list[tuple[bytes, bytes, int]]:
    """(platform code, UTF-16LE path, file offset) of the differencing disk's two locators: after the
    one-sector BAT, each padded to a sector, as create_vhd lays them out."""
    relative, absolute = VHD_RELATIVE.encode("utf-16-le"), VHD_ABSOLUTE.encode("utf-16-le")
    return [(W2RU, relative, VHD_BLOCK0_AT), (W2KU, absolute, VHD_BLOCK0_AT + 512)]


def build_dynamic_header(differencing: bool) -> bytes:
    header = vhd_header.DynamicHeader(table_offset=VHD_TABLE_OFFSET, max_table_entries=VHD_DYNAMIC_SIZE // VHD_BLOCK,
                                      block_size=VHD_BLOCK)
    if differencing:
        header = vhd_header.DynamicHeader(
            table_offset=VHD_TABLE_OFFSET, max_table_entries=VHD_DYNAMIC_SIZE // VHD_BLOCK, block_size=VHD_BLOCK,
            parent_unique_id=VHD_PARENT_ID, parent_timestamp=VHD_TIME, parent_name="parent.vhd",
            locators=tuple(LocatorEntry.for_data(code, data, at) for code, data, at in _vhd_locator_data()))
    return header.pack()


@pytest.mark.parametrize("differencing", [False, True])
def test_vhd_dynamic_disk_header(differencing):
    name = "vhd_differencing_header" if differencing else "vhd_dynamic_header"
    check_golden(name, build_dynamic_header(differencing))
    data = golden(name)
    # VHD spec, "Dynamic Disk Header Format" (1024 bytes, big-endian).
    assert len(data) == 1024
    assert data[0:8] == b"cxsparse"
    assert be64(data, 8) == 0xFFFFFFFFFFFFFFFF           # Data Offset: unused
    assert be64(data, 16) == VHD_TABLE_OFFSET
    assert be32(data, 24) == 0x00010000                  # Header Version
    assert be32(data, 28) == 32 and be32(data, 32) == VHD_BLOCK
    assert be32(data, 36) == vhd_spec_checksum(data, 36)
    assert data[40:56] == (VHD_PARENT_ID.bytes if differencing else bytes(16))
    assert be32(data, 56) == (VHD_TIME if differencing else 0)
    assert be32(data, 60) == 0                           # Reserved
    name_field = data[64:576]                            # Parent Unicode Name, UTF-16 big-endian
    assert name_field.decode("utf-16-be").rstrip("\0") == ("parent.vhd" if differencing else "")
    locators = [struct.unpack_from(">4sIIIQ", data, 576 + 24 * i) for i in range(8)]   # 8 x 24 bytes
    expected = [(code, -(-len(path) // 512), len(path), 0, at) for code, path, at in _vhd_locator_data()] \
        if differencing else []
    assert locators == expected + [(bytes(4), 0, 0, 0, 0)] * (8 - len(expected))
    assert not any(data[768:])                           # 256 reserved bytes
    parsed = vhd_header.DynamicHeader.unpack(data)
    assert (parsed.table_offset, parsed.max_table_entries, parsed.block_size, parsed.bitmap_size) == (
        VHD_TABLE_OFFSET, 32, VHD_BLOCK, 512)
    assert parsed.parent_name == ("parent.vhd" if differencing else "")
    assert [(e.platform_code, e.data_space, e.data_length, e.data_offset) for e in parsed.locators] == [
        (c, s, n, o) for c, s, n, _r, o in locators]


def build_vhd_bat() -> bytes:
    header = vhd_header.DynamicHeader.unpack(build_dynamic_header(False))
    table = VhdBat(np.full(32, UNALLOCATED, dtype=">u4"), header)
    offset, span = table.assign([0, 5], [VHD_BLOCK0_AT, VHD_BLOCK5_AT])
    assert offset == VHD_TABLE_OFFSET and span == table.entries[:6].tobytes()
    return table.entries.tobytes().ljust(512, b"\xff")   # create_vhd pads the table to a sector with 0xFF


def test_vhd_bat():
    check_golden("vhd_bat", build_vhd_bat())
    data = golden("vhd_bat")
    # VHD spec, "Block Allocation Table": big-endian u32 sector numbers, 0xFFFFFFFF unused.
    entries = struct.unpack(">128I", data)
    assert entries[0] == VHD_BLOCK0_AT // 512 == 4 and entries[5] == VHD_BLOCK5_AT // 512 == 4101
    assert all(e == 0xFFFFFFFF for i, e in enumerate(entries) if i not in (0, 5))
    header = vhd_header.DynamicHeader.unpack(golden("vhd_dynamic_header"))
    table = VhdBat(np.frombuffer(data[:128], dtype=">u4").copy(), header)
    assert table.location(0) == VHD_BLOCK0_AT and table.location(5) == VHD_BLOCK5_AT
    assert [table.location(b) for b in (1, 4, 6, 31)] == [None] * 4


def build_vhd_bitmap(path: Path) -> bytes:
    """A new block's bitmap with sectors 3-12 present, then its last sector marked and written back:
    the two ways the project sets bits, through a real file."""
    path.write_bytes(bytes(512))
    fd = os.open(path, os.O_RDWR)
    try:
        bitmaps = VhdSectorBitmaps(fd, 512)
        os.pwrite(fd, bitmaps.new_block(0, 3, 10, all_present=False), 0)
        bitmaps.mark(0, 4095, 1)
        bitmaps.write_dirty()
    finally:
        os.close(fd)
    return path.read_bytes()


def test_vhd_sector_bitmap_bit_order(tmp_path):
    check_golden("vhd_sector_bitmap", build_vhd_bitmap(tmp_path / "bitmap"))
    data = golden("vhd_sector_bitmap")
    # VHD spec, "Block Allocation Table and Data Blocks": one bit per sector of the block, padded to
    # a sector; the most significant bit of byte 0 is the first sector (reference/vhdx-notes.md 2:
    # libvhdi and qemu read it so) — the opposite of VHDX.
    assert data[0] == 0b00011111 and data[1] == 0b11111000 and data[511] == 0b00000001
    assert not any(data[2:511])
    (tmp_path / "golden").write_bytes(data)
    fd = os.open(tmp_path / "golden", os.O_RDONLY)
    try:
        runs = VhdSectorBitmaps(fd, 512).runs(0, 0, 4096)
    finally:
        os.close(fd)
    assert runs == [(False, 0, 3), (True, 3, 10), (False, 13, 4082), (True, 4095, 1)]


def assemble_vhd(path: Path, kind: str) -> None:
    """A whole VHD made of the vectors. Dynamic: blocks 0 (0x5A) and 5 (0xA5) present, every sector
    bitmap bit set. Differencing: no block, two parent locators. Fixed: zeros, then the footer."""
    footer = golden(f"vhd_footer_{kind}")
    with open(path, "wb") as f:
        if kind == "fixed":
            f.truncate(VHD_FIXED_SIZE)
            f.seek(VHD_FIXED_SIZE)
            f.write(footer)
            return
        f.write(footer)
        f.write(golden("vhd_differencing_header" if kind == "differencing" else "vhd_dynamic_header"))
        if kind == "differencing":
            f.write(b"\xff" * 512)
            for _code, data, at in _vhd_locator_data():
                f.seek(at)
                f.write(data.ljust(512, b"\0"))
        else:
            f.write(golden("vhd_bat"))
            for at, fill in [(VHD_BLOCK0_AT, 0x5A), (VHD_BLOCK5_AT, 0xA5)]:
                f.seek(at)
                f.write(b"\xff" * 512 + bytes([fill]) * VHD_BLOCK)
        f.write(footer)


@pytest.mark.interop
def test_assembled_vhd_is_read_by_hvbackup_qemu_and_libvhdi(tmp_path):
    import pyvhdi

    parent, child, fixed = tmp_path / "parent.vhd", tmp_path / "child.vhd", tmp_path / "fixed.vhd"
    assemble_vhd(parent, "dynamic")
    assemble_vhd(child, "differencing")
    assemble_vhd(fixed, "fixed")
    for path in (parent, child):
        with VhdDisk.open(str(path), read_only=True) as disk:
            assert disk.size == VHD_DYNAMIC_SIZE
            assert disk.read(0, 4096) == b"\x5a" * 4096
            assert disk.read(5 * VHD_BLOCK + VHD_BLOCK - 512, 512) == b"\xa5" * 512
            assert disk.read(VHD_BLOCK, 4096) == bytes(4096)
    with VhdDisk.open(str(fixed), read_only=True) as disk:
        assert disk.size == VHD_FIXED_SIZE
    for path, size in [(parent, VHD_DYNAMIC_SIZE), (fixed, VHD_FIXED_SIZE)]:
        info = json.loads(run("qemu-img", "info", "--output=json", "-f", "vpc", str(path)).stdout)
        assert info["virtual-size"] == size
    out = run("qemu-io", "-f", "vpc", "-c", "read -P 0x5a 0 2M", "-c", "read -P 0 2M 8M",
              "-c", f"read -P 0xa5 {5 * VHD_BLOCK} 2M", str(parent)).stdout
    assert "Pattern verification failed" not in out and out.count("read ") == 3
    files = [pyvhdi.file() for _ in range(2)]
    files[0].open(str(child))
    files[1].open(str(parent))
    try:
        assert files[0].media_size == files[1].media_size == VHD_DYNAMIC_SIZE
        assert files[1].identifier == str(VHD_PARENT_ID) and files[0].parent_identifier == str(VHD_PARENT_ID)
        files[0].set_parent(files[1])
        assert files[0].read_buffer_at_offset(512, 5 * VHD_BLOCK) == b"\xa5" * 512
    finally:
        for f in files:
            f.close()


@pytest.mark.interop
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_img_vhd_parses_to_the_spec_fields(tmp_path, subformat):
    path = tmp_path / "qemu.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={subformat}", str(path), "64M")
    raw = path.read_bytes()
    trailer = raw[-512:]
    # qemu sizes by CHS: 64 MiB rounds up to the geometry 964/8/17 (reference/vhdx-notes.md 2).
    chs = (964, 8, 17)
    assert trailer[:8] == b"conectix" and be32(trailer, 8) == 2 and be32(trailer, 12) == 0x00010000
    assert trailer[28:32] == b"qemu" and trailer[36:40] == b"Wi2k"
    assert be32(trailer, 64) == vhd_spec_checksum(trailer, 64)
    assert struct.unpack_from(">HBB", trailer, 56) == chs
    footer = vhd_footer.Footer.unpack(trailer)
    size = chs[0] * chs[1] * chs[2] * 512
    assert (footer.type_name, footer.current_size, footer.original_size, footer.geometry) == (
        subformat, size, size, chs)
    assert footer.unique_id.bytes == trailer[68:84]
    if subformat == "fixed":
        assert footer.data_offset == 0xFFFFFFFFFFFFFFFF and len(raw) == size + 512
        return
    assert raw[:512] == trailer            # the copy at offset 0
    header = vhd_header.DynamicHeader.unpack(raw[512:1536])
    assert raw[512:520] == b"cxsparse" and be32(raw, 512 + 36) == vhd_spec_checksum(raw[512:1536], 36)
    assert (footer.data_offset, header.table_offset, header.block_size) == (512, 1536, 2 * MiB)
    assert header.max_table_entries * header.block_size >= size
    assert header.parent_unique_id == uuid.UUID(int=0) and header.parent_name == ""
    entries = np.frombuffer(raw[1536:1536 + 4 * header.max_table_entries], dtype=">u4")
    assert (entries == UNALLOCATED).all()
    with VhdDisk.open(str(path), read_only=True) as disk:
        assert disk.size == size


# ================================================================================================
# Change tracking side files (docs/tracking.md)
# ================================================================================================

DENSE_SIZE, DENSE_GRANULARITY = MiB, 64 * 1024          # 16 granules
DENSE_EPOCHS = [1, 2, 1, 2, 1, 2, 1, 2, 0, 0, 3, 3, 4, 1, 2, 4]
DENSE_EARLIER = [EarlierLineage(EARLIER[0], Retirement.CONTINUED, 2),
                 EarlierLineage(EARLIER[1], Retirement.CHANGED_OFFLINE),
                 EarlierLineage(EARLIER[2], Retirement.LOST)]
RUNS_SIZE, RUNS_GRANULARITY = 64 * MiB + 4096, 64 * 1024     # 1025 granules, the last one short
RUN_LIST = [(0, 0), (10, 2), (20, 0), (500, 3), (501, 0), (1024, 1)]   # (first granule, epoch)


def _rct(size, granularity, epochs, last_sealed, earlier) -> RctState:
    changes = ChangeMap(size, granularity)
    changes.epochs[:] = epochs
    return RctState(LINEAGE, last_sealed, DATA_WRITE_GUID, changes, list(earlier))


def _runs_epochs() -> np.ndarray:
    epochs = np.zeros(1025, np.uint32)
    for (start, epoch), (end, _) in zip(RUN_LIST, RUN_LIST[1:] + [(1025, 0)]):
        epochs[start:end] = epoch
    return epochs


def _rct_canonical(data: bytes) -> tuple:
    """The .rct with its payload decompressed and its length and CRC fields left out."""
    n = u32(data, 80)
    at = 88 + 24 * n
    length = u64(data, 72)
    return data[:72], data[80:at], zstandard.ZstdDecompressor().decompress(data[at:at + length])


def spec_rct(data: bytes) -> dict:
    """docs/tracking.md, ".rct": every field at its documented offset."""
    assert data[0:8] == b"HVBKRCT\0" and u32(data, 8) == 1 and u32(data, 84) == 0
    n = u32(data, 80)
    at = 88 + 24 * n
    length = u64(data, 72)
    assert len(data) == at + length + 4
    assert u32(data, len(data) - 4) == crc32c(data[:-4])
    payload = zstandard.ZstdDecompressor().decompress(data[at:at + length])
    return {
        "granularity": u32(data, 12), "lineage": data[16:32], "size": u64(data, 32), "last_sealed": u32(data, 40),
        "encoding": u32(data, 44), "dwg": data[48:64], "runs": u64(data, 64),
        "earlier": [struct.unpack_from("<16sII", data, 88 + 24 * i) for i in range(n)],
        "payload": payload,
    }


def test_rct_dense():
    state = _rct(DENSE_SIZE, DENSE_GRANULARITY, DENSE_EPOCHS, 3, DENSE_EARLIER)
    check_golden("rct_dense", state.pack(), _rct_canonical)
    data = golden("rct_dense")
    fields = spec_rct(data)
    assert {k: fields[k] for k in ("granularity", "lineage", "size", "last_sealed", "encoding", "dwg", "runs")} == {
        "granularity": DENSE_GRANULARITY, "lineage": ms_guid(str(LINEAGE)), "size": DENSE_SIZE, "last_sealed": 3,
        "encoding": 0, "dwg": ms_guid(str(DATA_WRITE_GUID)), "runs": 0}
    # Earlier lineages, oldest first: GUID, reason (1 changed offline, 2 lost, 3 continued), up to.
    assert fields["earlier"] == [(ms_guid(str(EARLIER[0])), 3, 2), (ms_guid(str(EARLIER[1])), 1, 0),
                                 (ms_guid(str(EARLIER[2])), 2, 0)]
    # Dense: one u32 epoch per granule.
    assert fields["payload"] == struct.pack("<16I", *DENSE_EPOCHS)
    parsed = RctState.unpack(data, DENSE_SIZE)
    assert (parsed.lineage, parsed.last_sealed, parsed.data_write_guid, parsed.retired) == (
        LINEAGE, 3, DATA_WRITE_GUID, DENSE_EARLIER)
    assert parsed.changes.epochs.tolist() == DENSE_EPOCHS and parsed.unsealed_changes
    assert DENSE == 0


def test_rct_runs():
    earlier = [EarlierLineage(EARLIER[0], Retirement.CONTINUED, 1)]
    state = _rct(RUNS_SIZE, RUNS_GRANULARITY, _runs_epochs(), 3, earlier)
    check_golden("rct_runs", state.pack(), _rct_canonical)
    data = golden("rct_runs")
    fields = spec_rct(data)
    assert (fields["encoding"], fields["runs"], fields["size"], fields["last_sealed"]) == (
        1, len(RUN_LIST), RUNS_SIZE, 3)
    assert fields["earlier"] == [(ms_guid(str(EARLIER[0])), 3, 1)]
    # Runs: K u32 first granules, then K u32 epochs; 2K is less than the granule count.
    starts, epochs = zip(*RUN_LIST)
    assert fields["payload"] == struct.pack(f"<{len(RUN_LIST)}I{len(RUN_LIST)}I", *starts, *epochs)
    parsed = RctState.unpack(data, RUNS_SIZE)
    assert parsed.changes.epochs.tolist() == _runs_epochs().tolist() and parsed.retired == earlier
    assert not parsed.unsealed_changes and RUNS == 1


MRT_SIZE = 3 * GiB + 512                       # 13 regions of 256 MiB, the last one short
MRT_MARKED = [0, 2, 3, 8, 12]


def test_mrt():
    marked = bytearray(13)
    for region in MRT_MARKED:
        marked[region] = 1
    state = MrtState(LINEAGE, 3, MRT_SIZE, 256 * MiB, DATA_WRITE_GUID, marked)
    check_golden("mrt", state.pack())
    data = golden("mrt")
    # docs/tracking.md, ".mrt".
    assert len(data) == 4096 and data[0:8] == b"HVBKMRT\0"
    assert (u32(data, 8), u32(data, 12), u64(data, 16)) == (1, 4096, 0)
    assert data[24:40] == ms_guid(str(LINEAGE))
    assert (u32(data, 40), u32(data, 44), u64(data, 48)) == (3, 256 * MiB, MRT_SIZE)
    assert data[56:72] == ms_guid(str(DATA_WRITE_GUID))
    assert (u32(data, 72), u32(data, 76)) == (13, 0)
    # Bitmap, least significant bit first: regions 0, 2, 3 -> 0x0D; 8, 12 -> 0x11.
    assert data[80:82] == bytes([0b00001101, 0b00010001])
    assert u32(data, 82) == crc32c(data[:82]) and not any(data[86:])
    parsed = MrtState.unpack(data, MRT_SIZE)
    assert (parsed.lineage, parsed.base, parsed.region, parsed.pending_dwg) == (LINEAGE, 3, 256 * MiB, DATA_WRITE_GUID)
    assert parsed.marked_regions() == MRT_MARKED


def _current_header(raw: bytes) -> bytes:
    """[MS-VHDX] 2.2.2: the valid header with the greater SequenceNumber."""
    valid = [h for h in (raw[64 * 1024:68 * 1024], raw[128 * 1024:132 * 1024])
             if h[:4] == b"head" and u32(h, 4) == spec_crc(h, 4)]
    return max(valid, key=lambda h: u64(h, 8))


def test_side_files_written_by_tracking_are_the_documented_format(tmp_path):
    from hvbackup import tracking

    path = tmp_path / "disk.vhdx"
    create_vhdx(str(path), DYNAMIC_SIZE, block_size=32 * MiB)
    tracking.enable(str(path), granularity=64 * 1024)
    tracking.seal(str(path))
    vhdx = _read_spec_vhdx(path)
    items = spec_metadata_items(vhdx["metadata"])
    flags, marker = items[ms_guid("7f1e3c52-9a4b-4d6e-8c21-5b0f9e4a6d13")]
    assert flags == MARKER_ENTRY_FLAGS and len(marker) == 20 and u32(marker, 16) == 1
    lineage, dwg = marker[:16], _current_header(vhdx["raw"])[32:48]
    rct = (tmp_path / "disk.vhdx.rct").read_bytes()
    fields = spec_rct(rct)
    assert (fields["lineage"], fields["dwg"], fields["granularity"], fields["size"], fields["last_sealed"]) == (
        lineage, dwg, 64 * 1024, DYNAMIC_SIZE, 2)
    # Nothing written: one run of epoch 0 (runs are chosen while 2K is below the granule count).
    assert (fields["encoding"], fields["runs"], fields["payload"], fields["earlier"]) == (1, 1, bytes(8), [])
    mrt = (tmp_path / "disk.vhdx.mrt").read_bytes()
    assert len(mrt) == 4096 and mrt[:8] == b"HVBKMRT\0" and (u32(mrt, 8), u32(mrt, 12), u64(mrt, 16)) == (1, 4096, 0)
    assert mrt[24:40] == lineage and (u32(mrt, 40), u32(mrt, 44), u64(mrt, 48)) == (2, 256 * MiB, DYNAMIC_SIZE)
    assert (u32(mrt, 72), u32(mrt, 76), mrt[80]) == (1, 0, 0)        # one region, not marked
    assert u32(mrt, 81) == crc32c(mrt[:81]) and not any(mrt[85:])
    assert RctState.unpack(rct, DYNAMIC_SIZE).last_sealed == 2
    assert MrtState.unpack(mrt, DYNAMIC_SIZE).base == 2


# ================================================================================================
# The backup repository (docs/repository.md)
# ================================================================================================

def spec_frame(data: bytes, magic: bytes) -> tuple[int, bytes]:
    """docs/repository.md, "The frame": (flags, payload), every rule checked."""
    assert data[0:8] == magic
    version, flags, reserved, length = struct.unpack_from("<HHIQ", data, 8)
    assert (version, reserved) == (1, 0) and flags & ~3 == 0
    assert len(data) == 24 + length + 32
    assert data[24 + length:] == blake3(data[:24 + length]).digest()
    return flags, data[24:24 + length]


def _frame_canonical(data: bytes) -> tuple:
    """A frame with its zstd payload decompressed and the length and checksum left out."""
    return data[:16], zstandard.ZstdDecompressor().decompress(data[24:-32])


def _config_json(repository_id: str, encryption) -> bytes:
    return json.dumps({"format": 1, "id": repository_id, "chunk_size": CHUNK_SIZE, "hash": "blake3",
                       "compression": "zstd", "encryption": encryption}, indent=1).encode()


def _encryption_params() -> dict:
    """docs/repository.md "Keys": the master key wrapped by scrypt(passphrase) with AES-256-GCM, the
    ID and chunk size as associated data."""
    kek = Scrypt(salt=SALT, length=32, n=1 << 15, r=8, p=1).derive(PASSPHRASE.encode())
    binding = f"hvbackup-key:{ENC_REPO_ID}:{CHUNK_SIZE}".encode()
    wrapped = WRAP_NONCE + AESGCM(kek).encrypt(WRAP_NONCE, MASTER, binding)
    return {"cipher": "aes-256-gcm", "kdf": "scrypt", "n": 1 << 15, "r": 8, "p": 1,
            "salt": SALT.hex(), "wrapped_key": wrapped.hex()}


def spec_seal(magic: bytes, flags: int, plaintext: bytes, identity: bytes, nonce: bytes) -> bytes:
    """docs/repository.md "When encrypted": nonce, ciphertext, tag; AD = the 24-byte header (with the
    sealed length) followed by the file's identity."""
    header = struct.pack("<8sHHIQ", magic, 1, flags, 0, len(plaintext) + 28)
    body = header + nonce + AESGCM(MASTER[:32]).encrypt(nonce, plaintext, header + identity)
    return body + blake3(body).digest()


def test_repository_config():
    # Repository.init serialises the config itself (no separate function): the vector is the frame of
    # the same JSON, and the next test checks that init writes exactly it but for the random ID.
    built = envelope.frame(CONFIG_MAGIC, 0, _config_json(REPO_ID, None))
    check_golden("repo_config", built)
    data = golden("repo_config")
    flags, payload = spec_frame(data, b"HVBKCONF")
    assert flags == 0
    assert json.loads(payload) == {"format": 1, "id": REPO_ID, "chunk_size": CHUNK_SIZE, "hash": "blake3",
                                   "compression": "zstd", "encryption": None}


def test_repository_init_writes_the_golden_config(tmp_path):
    repo = Repository.init(str(tmp_path / "r"), chunk_size=CHUNK_SIZE)
    written = (tmp_path / "r" / "config").read_bytes()
    flags, payload = spec_frame(written, b"HVBKCONF")
    expected = golden("repo_config")
    assert written[:24] == expected[:24]
    assert payload.replace(repo.id.encode(), REPO_ID.encode()) == spec_frame(expected, b"HVBKCONF")[1]


def test_repository_config_encrypted(tmp_path):
    check_golden("repo_config_encrypted", envelope.frame(CONFIG_MAGIC, 0, _config_json(ENC_REPO_ID,
                                                                                        _encryption_params())))
    data = golden("repo_config_encrypted")
    _flags, payload = spec_frame(data, b"HVBKCONF")
    encryption = json.loads(payload)["encryption"]
    assert len(encryption["salt"]) == 64 and len(encryption["wrapped_key"]) == 184
    # What init writes is the vector but for its random ID, salt and wrap; the wrap opens by the
    # documented recipe.
    repo = Repository.init(str(tmp_path / "r"), chunk_size=CHUNK_SIZE, passphrase=PASSPHRASE)
    _flags, written = spec_frame((tmp_path / "r" / "config").read_bytes(), b"HVBKCONF")
    config = json.loads(written)
    substituted = (written.decode().replace(repo.id, ENC_REPO_ID)
                   .replace(config["encryption"]["salt"], encryption["salt"])
                   .replace(config["encryption"]["wrapped_key"], encryption["wrapped_key"]))
    assert substituted == payload.decode()
    kek = Scrypt(salt=bytes.fromhex(config["encryption"]["salt"]), length=32, n=1 << 15, r=8, p=1).derive(
        PASSPHRASE.encode())
    wrapped = bytes.fromhex(config["encryption"]["wrapped_key"])
    master = AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], f"hvbackup-key:{repo.id}:{CHUNK_SIZE}".encode())
    assert len(master) == 64


def _names(keys: Keys | None) -> tuple[bytes, bytes]:
    codec = ChunkCodec(CHUNK_SIZE, keys)
    return codec.name(PIECE_A), codec.name(PIECE_T)


def test_chunk_names_are_the_documented_hashes():
    assert _names(None) == (blake3(PIECE_A).digest(), blake3(PIECE_T).digest())
    id_key = MASTER[32:]   # the master key's last 32 bytes
    assert _names(Keys(MASTER)) == (blake3(PIECE_A, key=id_key).digest(), blake3(PIECE_T, key=id_key).digest())


def test_chunk_frames_unencrypted():
    codec = ChunkCodec(CHUNK_SIZE, None)
    name_a, name_t = _names(None)
    check_golden("repo_chunk_plain", codec.encode(name_t, PIECE_T))
    check_golden("repo_chunk_compressed", codec.encode(name_a, PIECE_A), _frame_canonical)
    plain, compressed = golden("repo_chunk_plain"), golden("repo_chunk_compressed")
    # Stored as it is when zstd does not make it smaller: flags 0, the piece itself.
    assert spec_frame(plain, b"HVBKCHNK") == (0, PIECE_T)
    flags, payload = spec_frame(compressed, b"HVBKCHNK")
    assert flags == 2 and len(payload) < len(PIECE_A)
    assert zstandard.frame_content_size(payload) == CHUNK_SIZE     # a declared content size
    assert zstandard.ZstdDecompressor().decompress(payload) == PIECE_A
    assert codec.decode(name_t, plain) == PIECE_T and codec.decode(name_a, compressed) == PIECE_A


@pytest.mark.parametrize("kind", ["plain", "compressed"])
def test_chunk_frames_encrypted(kind):
    keys = Keys(MASTER)
    codec = ChunkCodec(CHUNK_SIZE, keys)
    name_a, name_t = _names(keys)
    piece, name = (PIECE_T, name_t) if kind == "plain" else (PIECE_A, name_a)
    # The nonce is random and cannot be injected, so the vector is sealed by the documented recipe
    # with a fixed nonce around the unencrypted vector's payload; the project must open it.
    plain_flags, plain_payload = spec_frame(golden(f"repo_chunk_{kind}"), b"HVBKCHNK")
    name_vector = f"repo_chunk_{kind}_encrypted"
    check_golden(name_vector, spec_seal(b"HVBKCHNK", plain_flags | 1, plain_payload, name, NONCES[kind]))
    data = golden(name_vector)
    flags, sealed = spec_frame(data, b"HVBKCHNK")
    assert flags == plain_flags | 1 and len(sealed) == len(plain_payload) + 28 and sealed[:12] == NONCES[kind]
    assert codec.decode(name, data) == piece
    # What the project writes has the same layout: the header, a 12-byte nonce, ciphertext and a
    # 16-byte tag that open with the data key and the documented associated data.
    written = codec.encode(name, piece)
    flags, sealed = spec_frame(written, b"HVBKCHNK")
    opened = AESGCM(MASTER[:32]).decrypt(sealed[:12], sealed[12:], written[:24] + name)
    assert flags == plain_flags | 1 and len(sealed) == 12 + len(opened) + 16
    assert (opened if kind == "plain" else zstandard.ZstdDecompressor().decompress(opened)) == piece
    with pytest.raises(InvalidTag):
        AESGCM(MASTER[:32]).decrypt(sealed[:12], sealed[12:], written[:24] + bytes(32))   # another name


def _manifest_doc(repository_id: str, keys: Keys | None, bytes_stored: int) -> manifest.Manifest:
    """A restore point as the writer builds it (writer.py: commit)."""
    name_a, name_t = _names(keys)
    disk0 = ChunkIndex.empty(7).overwritten({1: name_a, 4: name_a, 6: name_t})
    disk1 = ChunkIndex.empty(DISK1_SIZE // CHUNK_SIZE)
    fields = manifest.caller_fields(MANIFEST_FIELDS)
    return manifest.Manifest(
        POINT_ID, repository_id, CHUNK_SIZE, **fields, bytes_read=2 * CHUNK_SIZE + 512, bytes_stored=bytes_stored,
        disks=[manifest.Disk(0, Geometry.from_dict(GEOMETRY0), disk0),
               manifest.Disk(1, Geometry.from_dict({**GEOMETRY0, "virtual_size": DISK1_SIZE}), disk1)])


GEOMETRY0 = {"virtual_size": DISK0_SIZE, "block_size": 32 * MiB, "logical_sector_size": 512,
             "physical_sector_size": 4096}
MANIFEST_FIELDS = {"vm_name": "web", "vm_id": "4f6a1c2e-8b3d-4e5f-9a6b-7c8d9e0f1a2b",
                   "vm_config": {"disks": [{"instance_id": "disk-0"}, {"instance_id": "disk-1"}]},
                   "reference_point": "rp-golden", "rct_ids": ["rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001"],
                   "consistency": 2, "method": "virtdisk", "kind": "full", "notes": [],
                   "started": 1795630132.1, "ended": 1795630140.5}


def _stored_sizes(kind: str) -> int:
    suffix = "_encrypted" if kind == "encrypted" else ""
    return len(golden(f"repo_chunk_compressed{suffix}")) + len(golden(f"repo_chunk_plain{suffix}"))


def test_manifest():
    check_golden("repo_manifest", manifest.encode(_manifest_doc(REPO_ID, None, _stored_sizes("plain")), None),
                 _frame_canonical)
    data = golden("repo_manifest")
    flags, payload = spec_frame(data, b"HVBKMANI")
    assert flags == 2                                    # COMPRESSED always
    doc = json.loads(zstandard.ZstdDecompressor().decompress(payload))
    name_a, name_t = (n.hex() for n in _names(None))
    # The chunk index: names of 64 lower-case hex digits and positive counts of zero pieces.
    assert [d["chunks"] for d in doc["disks"]] == [[1, name_a, 2, name_a, 1, name_t], [65536]]
    assert list(doc) == ["point_id", "repository_id", "chunk_size", *manifest.CALLER_FIELDS, "bytes_read",
                         "bytes_stored", "disks"]
    assert doc["point_id"] == POINT_ID and doc["repository_id"] == REPO_ID and doc["chunk_size"] == CHUNK_SIZE
    decoded = manifest.decode(data, POINT_ID, None, REPO_ID, CHUNK_SIZE)
    assert list(decoded.disks[0].chunks.items()) == [(1, name_a), (4, name_a), (6, name_t)]
    assert decoded.disks[1].chunks.count == 65536 and decoded.disks[1].chunks.data_slots == 0
    assert {k: getattr(decoded, k) for k in MANIFEST_FIELDS} == MANIFEST_FIELDS


def test_manifest_encrypted():
    keys = Keys(MASTER)
    plain = manifest.encode(_manifest_doc(ENC_REPO_ID, keys, _stored_sizes("encrypted")), None)
    _flags, compressed = spec_frame(plain, b"HVBKMANI")
    check_golden("repo_manifest_encrypted",
                 spec_seal(b"HVBKMANI", 3, compressed, POINT_ID.encode(), NONCES["manifest"]), _sealed_canonical)
    data = golden("repo_manifest_encrypted")
    flags, sealed = spec_frame(data, b"HVBKMANI")
    assert flags == 3 and sealed[:12] == NONCES["manifest"]
    decoded = manifest.decode(data, POINT_ID, keys, ENC_REPO_ID, CHUNK_SIZE)
    name_a, name_t = (n.hex() for n in _names(keys))
    assert list(decoded.disks[0].chunks.items()) == [(1, name_a), (4, name_a), (6, name_t)]
    # The project's own encrypted manifest: documented layout, bound to the point ID.
    written = manifest.encode(_manifest_doc(ENC_REPO_ID, keys, 0), keys)
    flags, sealed = spec_frame(written, b"HVBKMANI")
    opened = AESGCM(MASTER[:32]).decrypt(sealed[:12], sealed[12:], written[:24] + POINT_ID.encode())
    assert flags == 3 and json.loads(zstandard.ZstdDecompressor().decompress(opened))["point_id"] == POINT_ID


def _sealed_canonical(data: bytes) -> tuple:
    """An encrypted frame with its (fixed-nonce) payload opened and decompressed."""
    sealed = data[24:-32]
    opened = AESGCM(MASTER[:32]).decrypt(sealed[:12], sealed[12:], data[:24] + POINT_ID.encode())
    return data[:16], zstandard.ZstdDecompressor().decompress(opened)


def assemble_repository(root: Path, encrypted: bool) -> None:
    """A repository made only of the vectors: config, one manifest, two chunk files."""
    suffix = "_encrypted" if encrypted else ""
    root.mkdir()
    (root / "config").write_bytes(golden(f"repo_config{suffix}"))
    (root / "points").mkdir()
    (root / "points" / POINT_ID).write_bytes(golden(f"repo_manifest{suffix}"))
    for name, vector in zip(_names(Keys(MASTER) if encrypted else None), ("compressed", "plain")):
        directory = root / "chunks" / name.hex()[:2]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name.hex()).write_bytes(golden(f"repo_chunk_{vector}{suffix}"))


@pytest.mark.parametrize("encrypted", [False, True])
def test_golden_repository_restores(tmp_path, encrypted):
    root = tmp_path / "repo"
    assemble_repository(root, encrypted)
    repo = Repository.open(str(root), passphrase=PASSPHRASE if encrypted else None)
    assert (repo.id, repo.chunk_size, repo.encrypted) == (ENC_REPO_ID if encrypted else REPO_ID, CHUNK_SIZE, encrypted)
    [point] = repo.points()
    assert point.point_id == POINT_ID and point.vm_name == "web"
    disk0 = b"".join(data for _offset, data in repo.read_disk(POINT_ID, 0))
    zero = bytes(CHUNK_SIZE)
    assert disk0 == zero + PIECE_A + zero + zero + PIECE_A + zero + PIECE_T
    assert list(repo.read_disk(POINT_ID, 1, zeros=False)) == []
    assert repo.verify(read_data=True) == []


def test_writer_writes_the_golden_manifest_and_chunks(tmp_path):
    repo = Repository.init(str(tmp_path / "r"), chunk_size=CHUNK_SIZE)
    with repo.writer() as writer:
        writer.add_disk(0, Geometry.from_dict(GEOMETRY0))
        writer.add_disk(1, Geometry.from_dict({**GEOMETRY0, "virtual_size": DISK1_SIZE}))
        for offset, piece in [(CHUNK_SIZE, PIECE_A), (4 * CHUNK_SIZE, PIECE_A), (6 * CHUNK_SIZE, PIECE_T)]:
            writer.put(0, offset, piece)
        point_id = writer.commit(MANIFEST_FIELDS)
    root = tmp_path / "r"
    for name, vector in zip(_names(None), ("repo_chunk_compressed", "repo_chunk_plain")):
        written = (root / "chunks" / name.hex()[:2] / name.hex()).read_bytes()
        check = _frame_canonical if vector.endswith("compressed") else (lambda b: b)
        assert written == golden(vector) or (
            read_golden(vector)[1].get("zstd") != _zstd_version() and check(written) == check(golden(vector)))
    stored = (root / "points" / point_id).read_bytes()
    text = zstandard.ZstdDecompressor().decompress(spec_frame(stored, b"HVBKMANI")[1]).decode()
    text = text.replace(point_id, POINT_ID).replace(repo.id, REPO_ID)
    expected = zstandard.ZstdDecompressor().decompress(spec_frame(golden("repo_manifest"), b"HVBKMANI")[1]).decode()
    if read_golden("repo_manifest")[1].get("zstd") != _zstd_version():
        # Another zstd library compresses the chunks to other sizes: bytes_stored follows them.
        stored_size = json.loads(text)["bytes_stored"]
        text = text.replace(f'"bytes_stored":{stored_size}', f'"bytes_stored":{json.loads(expected)["bytes_stored"]}')
    assert text == expected


# ------------------------------------------------------------------------------------------------

def test_every_vector_is_used_and_small():
    files = {p.stem for p in GOLDEN.glob("*.hex")}
    assert files == set(DESCRIPTIONS), "a vector without a test, or a test without its vector"
    assert sum(p.stat().st_size for p in GOLDEN.glob("*.hex")) < 200_000
