"""RDB block codecs: byte-exact round trips, checksums, real blocks from the A590 dump."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.errors import CorruptError
from amigafuse.rdb.blocks import (
    BadBlockBlock,
    FileSysHeaderBlock,
    LoadSegBlock,
    PartitionBlock,
    RigidDiskBlock,
    bstr_decode,
    bstr_encode,
    checksum_ok,
    checksum_ok_zeroed_dc,
    compute_checksum,
)
from tests.conftest import shared_image

CODECS = {
    b"RDSK": RigidDiskBlock,
    b"PART": PartitionBlock,
    b"FSHD": FileSysHeaderBlock,
    b"LSEG": LoadSegBlock,
    b"BADB": BadBlockBlock,
}


@pytest.mark.parametrize("ident", list(CODECS))
@given(body=st.binary(min_size=508, max_size=508), big=st.booleans())
def test_round_trip_is_byte_exact(ident: bytes, body: bytes, big: bool) -> None:
    raw = ident + body + (body * 7 if big else b"")  # 512- and 4096-byte blocks
    codec = CODECS[ident]
    rec = codec.unpack(raw)
    assert rec.pack() == raw


@pytest.mark.parametrize("ident", list(CODECS))
@given(body=st.binary(min_size=508, max_size=508))
def test_seal_makes_the_checksum_verify(ident: bytes, body: bytes) -> None:
    summed = 64 if ident in (b"RDSK", b"PART", b"FSHD") else 128
    raw = bytearray(ident + body)
    raw[4:8] = struct.pack(">I", summed)
    rec = CODECS[ident].unpack(bytes(raw))
    sealed = rec.seal().pack()
    assert checksum_ok(sealed)
    # Only the checksum long changed.
    assert sealed[:8] == bytes(raw[:8]) and sealed[12:] == bytes(raw[12:])
    # Any flipped bit inside the summed range breaks it again.
    broken = bytearray(sealed)
    broken[summed * 4 - 1] ^= 0x01
    assert not checksum_ok(bytes(broken))


def test_wrong_id_and_short_block_are_corrupt_errors() -> None:
    with pytest.raises(CorruptError, match="ID"):
        PartitionBlock.unpack(b"RDSK" + bytes(508))
    with pytest.raises(CorruptError, match="shorter"):
        RigidDiskBlock.unpack(b"RDSK" + bytes(100))


def test_checksum_rejects_absurd_summed_longs() -> None:
    raw = bytearray(b"RDSK" + bytes(508))
    raw[4:8] = struct.pack(">I", 129)  # more longs than the block has
    assert not checksum_ok(bytes(raw))
    raw[4:8] = struct.pack(">I", 0)
    assert not checksum_ok(bytes(raw))


def test_linux_second_chance_zeroes_dc_df() -> None:
    raw = bytearray(b"RDSK" + bytes(508))
    raw[4:8] = struct.pack(">I", 64)
    raw[8:12] = struct.pack(">I", compute_checksum(bytes(raw), 64))
    assert checksum_ok(bytes(raw))
    raw[0xDC:0xE0] = b"\x12\x34\x56\x78"
    assert not checksum_ok(bytes(raw))
    assert checksum_ok_zeroed_dc(bytes(raw))


def test_bstr() -> None:
    assert bstr_decode(b"\x03OFS\x00E_ME") == "OFS"
    assert bstr_decode(b"\xffAB") == "AB"  # length byte larger than the field
    assert bstr_encode("DH0", 32) == b"\x03DH0" + bytes(28)
    with pytest.raises(ValueError):
        bstr_encode("x" * 32, 32)


def test_real_a590_blocks_decode_as_amitools_reports() -> None:
    path = shared_image("real/a590_WD93028XA_6parts.hdd.gz")
    data = path.read_bytes()
    rdsk_raw = data[:512]
    assert checksum_ok(rdsk_raw)
    rdsk = RigidDiskBlock.unpack(rdsk_raw)
    assert rdsk.pack() == rdsk_raw
    # rdbtool info: PhysicalDisk 0..781, heads=2 sectors=27; rdb_blks=[0:107]; cyl_blks=54
    assert (rdsk.rdb_Cylinders, rdsk.rdb_Heads, rdsk.rdb_Sectors) == (782, 2, 27)
    assert (rdsk.rdb_RDBBlocksLo, rdsk.rdb_RDBBlocksHi, rdsk.rdb_CylBlocks) == (0, 107, 54)
    assert (rdsk.rdb_LoCylinder, rdsk.rdb_HiCylinder) == (2, 781)
    assert rdsk.rdb_PartitionList == 1 and rdsk.rdb_FileSysHeaderList == 0xFFFFFFFF
    part_raw = data[512:1024]
    assert checksum_ok(part_raw)
    part = PartitionBlock.unpack(part_raw)
    assert part.pack() == part_raw
    assert part.drive_name == "OFS"
    env = part.pb_Environment
    assert (env.de_LowCyl, env.de_HighCyl, env.de_Surfaces, env.de_BlocksPerTrack) == (2, 115, 2, 27)
    assert env.de_DosType == 0x444F5300 and env.de_MaxTransfer == 0xFFFFFF
    assert env.de_Mask == 0x7FFFFFFE and env.boot_pri == 0
    assert part.pb_Flags & 1  # bootable, as rdbtool says
