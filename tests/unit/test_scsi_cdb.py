"""CDB builders and response parsers (amigafuse.driver.scsi.cdb)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.driver.scsi import cdb
from amigafuse.errors import HardwareError

lbas = st.integers(min_value=0, max_value=(1 << 64) - 1)
counts = st.integers(min_value=1, max_value=0xFFFFFFFF)


@given(lbas, counts, st.booleans(), st.booleans())
def test_read_write_round_trip(lba: int, count: int, is_write: bool, fua: bool) -> None:
    if lba + count - 1 > cdb.MAX_LBA_16:
        with pytest.raises(ValueError):
            (cdb.write if is_write else cdb.read)(lba, count, fua=fua)
        return
    raw = (cdb.write if is_write else cdb.read)(lba, count, fua=fua)
    decoded = cdb.parse_read_write(raw)
    assert decoded == cdb.ReadWrite(is_write, lba, count, fua, len(raw))
    # The 16-byte form only when the 10-byte one cannot say it.
    fits10 = lba + count - 1 <= 0xFFFFFFFF and count <= 0xFFFF
    assert len(raw) == (10 if fits10 else 16)


def test_read10_layout() -> None:
    assert cdb.read(0x01020304, 0x0506) == bytes.fromhex("28 00 01020304 00 0506 00")
    assert cdb.write(7, 1, fua=True) == bytes.fromhex("2a 08 00000007 00 0001 00")


def test_read16_past_2tib_boundary() -> None:
    # The last block addressable by READ(10) and the first that is not.
    assert len(cdb.read(0xFFFFFFFF, 1)) == 10
    raw = cdb.read(0x100000000, 8)
    assert raw == bytes.fromhex("88 00 0000000100000000 00000008 00 00")
    # A run that starts below 2^32 but ends above it needs the 16-byte form too.
    assert len(cdb.read(0xFFFFFFFF, 2)) == 16
    assert cdb.write(5, 0x10000)[0] == cdb.WRITE_16


@pytest.mark.parametrize("lba,count", [(0, 0), (-1, 1), (0, 1 << 32), ((1 << 64) - 1, 2)])
def test_read_write_reject_invalid(lba: int, count: int) -> None:
    with pytest.raises(ValueError):
        cdb.read(lba, count)


def test_parse_read_write_rejects_other_cdbs() -> None:
    with pytest.raises(ValueError):
        cdb.parse_read_write(cdb.test_unit_ready())


def test_fixed_cdbs() -> None:
    assert cdb.test_unit_ready() == bytes(6)
    assert cdb.inquiry() == bytes.fromhex("12 00 00 00ff 00")
    assert cdb.inquiry(0x83, 0x200) == bytes.fromhex("12 01 83 0200 00")
    assert cdb.read_capacity_10() == bytes.fromhex("25") + bytes(9)
    assert cdb.read_capacity_16() == bytes.fromhex("9e 10 0000000000000000 00000020 00 00")
    assert cdb.request_sense(96) == bytes.fromhex("03 00 00 00 60 00")
    assert cdb.request_sense(descriptor=True)[1] == 1
    assert cdb.mode_sense_6() == bytes.fromhex("1a 08 3f 00 c0 00")
    assert cdb.report_luns(16) == bytes.fromhex("a0 00 00 000000 00000010 00 00")
    assert cdb.synchronize_cache() == bytes.fromhex("35 00 00000000 00 0000 00")
    assert cdb.synchronize_cache(1 << 33, 4, immed=True) == bytes.fromhex(
        "91 02 0000000200000000 00000004 00 00"
    )
    with pytest.raises(ValueError):
        cdb.inquiry(allocation_length=1 << 16)


def test_command_names() -> None:
    assert cdb.command_name(cdb.read(1 << 40, 1)) == "READ(16)"
    assert cdb.command_name(cdb.read_capacity_16()) == "READ CAPACITY(16)"
    assert cdb.command_name(b"\xee") == "opcode 0xee"
    assert cdb.command_name(b"") == "empty CDB"


QEMU_INQUIRY = bytes.fromhex("00 00 05 12 1f 00 00 12") + b"QEMU    QEMU HARDDISK   2.5+"


def test_standard_inquiry_qemu() -> None:
    inq = cdb.parse_standard_inquiry(QEMU_INQUIRY)
    assert inq.is_connected_disk
    assert (inq.vendor, inq.product, inq.revision) == ("QEMU", "QEMU HARDDISK", "2.5+")
    assert inq.version == 5 and inq.response_data_format == 2
    assert inq.pack() == QEMU_INQUIRY


@given(st.binary(min_size=36, max_size=36))
def test_standard_inquiry_round_trip(raw: bytes) -> None:
    assert cdb.parse_standard_inquiry(raw).pack() == raw


def test_standard_inquiry_short_and_absent() -> None:
    with pytest.raises(HardwareError, match="INQUIRY"):
        cdb.parse_standard_inquiry(QEMU_INQUIRY[:20])
    # "No device at this LUN" (qualifier 3, type 0x1f) may come short; it is not a disk.
    absent = cdb.parse_standard_inquiry(bytes([0x7F, 0, 5, 2, 0]))
    assert not absent.is_connected_disk
    cdrom = cdb.parse_standard_inquiry(bytes([0x05]) + QEMU_INQUIRY[1:])
    assert not cdrom.is_connected_disk


def test_vpd_pages() -> None:
    assert cdb.parse_vpd_supported_pages(cdb.pack_vpd_page(0, bytes([0, 0x80, 0x83]))) == (
        0,
        0x80,
        0x83,
    )
    assert cdb.parse_vpd_unit_serial(cdb.pack_vpd_page(0x80, b"  SER123  \0")) == "SER123"
    with pytest.raises(HardwareError, match="page code"):
        cdb.parse_vpd_unit_serial(cdb.pack_vpd_page(0x83, b"x"))
    with pytest.raises(HardwareError, match="exceeds"):
        cdb.parse_vpd_unit_serial(bytes([0, 0x80, 0, 50]) + b"short")


designators = st.builds(
    cdb.Designator,
    protocol_identifier=st.integers(0, 15),
    code_set=st.integers(0, 15),
    piv=st.booleans(),
    association=st.integers(0, 3),
    designator_type=st.integers(0, 15),
    designator=st.binary(max_size=40),
)


@given(st.lists(designators, max_size=5))
def test_device_identification_round_trip(descs: list[cdb.Designator]) -> None:
    page = cdb.pack_vpd_page(0x83, b"".join(d.pack() for d in descs))
    assert cdb.parse_vpd_device_identification(page) == tuple(descs)


def test_device_identification_text_and_bounds() -> None:
    ascii_d = cdb.Designator(0, cdb.CODE_SET_ASCII, False, 0, 0, b"drive-scsi0-0-0-0")
    naa = cdb.Designator(
        0, cdb.CODE_SET_BINARY, False, 0, cdb.DESIGNATOR_NAA, bytes.fromhex("5000c50015ea71ac")
    )
    assert ascii_d.text == "drive-scsi0-0-0-0"
    assert naa.text == "5000c50015ea71ac"
    # A descriptor that claims more bytes than the page holds.
    bad = cdb.pack_vpd_page(0x83, bytes([2, 0, 0, 30]) + b"abc")
    with pytest.raises(HardwareError, match="claims 30 bytes"):
        cdb.parse_vpd_device_identification(bad)
    with pytest.raises(HardwareError, match="truncated"):
        cdb.parse_vpd_device_identification(cdb.pack_vpd_page(0x83, b"\x02\x00"))


def test_read_capacity_10() -> None:
    cap = cdb.parse_read_capacity_10(struct.pack(">II", 2047, 512))
    assert cap.block_count == 2048 and cap.block_length == 512
    assert cap.pack10() == struct.pack(">II", 2047, 512)
    # Saturated: the device is too big for (10).
    assert cdb.parse_read_capacity_10(struct.pack(">II", 0xFFFFFFFF, 512)).last_lba == 0xFFFFFFFF
    for bad_size in (0, 511, 520, 1 << 17):
        with pytest.raises(HardwareError, match="block length"):
            cdb.parse_read_capacity_10(struct.pack(">II", 10, bad_size))
    with pytest.raises(HardwareError, match="8 expected"):
        cdb.parse_read_capacity_10(b"\0" * 7)


capacities = st.builds(
    cdb.Capacity,
    last_lba=st.integers(0, (1 << 64) - 2),
    block_length=st.sampled_from([512, 1024, 2048, 4096, 65536]),
    protection_enabled=st.booleans(),
    protection_type=st.integers(0, 7),
    logical_blocks_per_physical_exponent=st.integers(0, 15),
    lbpme=st.booleans(),
    lbprz=st.booleans(),
    lowest_aligned_lba=st.integers(0, 0x3FFF),
)


@given(capacities)
def test_read_capacity_16_round_trip(cap: cdb.Capacity) -> None:
    raw = cap.pack16()
    assert len(raw) == 32
    assert cdb.parse_read_capacity_16(raw) == cap


def test_read_capacity_16_3tib() -> None:
    three_tib_blocks = (3 << 40) // 512
    raw = struct.pack(">QI", three_tib_blocks - 1, 512) + bytes(20)
    cap = cdb.parse_read_capacity_16(raw)
    assert cap.block_count == three_tib_blocks and cap.block_count > 1 << 32
    with pytest.raises(HardwareError, match="16 expected"):
        cdb.parse_read_capacity_16(raw[:15])


@given(st.lists(st.integers(0, 0x3FFF), max_size=20))
def test_report_luns_round_trip(luns: list[int]) -> None:
    assert cdb.parse_report_luns(cdb.pack_report_luns(tuple(luns))) == tuple(luns)


def test_report_luns_truncated_and_bad() -> None:
    raw = cdb.pack_report_luns((0, 1, 2))
    # Only as many LUNs as were transferred.
    assert cdb.parse_report_luns(raw[:16]) == (0,)
    with pytest.raises(HardwareError, match="multiple of 8"):
        cdb.parse_report_luns(struct.pack(">I4x", 9) + bytes(8))
    with pytest.raises(HardwareError, match="hierarchical"):
        cdb.parse_report_luns(struct.pack(">I4x", 8) + bytes([0, 1, 0, 2, 0, 0, 0, 0]))
    with pytest.raises(HardwareError, match="addressing"):
        cdb.parse_report_luns(struct.pack(">I4x", 8) + bytes([0xC0, 1, 0, 0, 0, 0, 0, 0]))


def test_mode_sense_header() -> None:
    hdr = cdb.parse_mode_sense_6(bytes([0x23, 0, 0x90, 0]) + bytes(8))
    assert hdr.write_protect and hdr.dpofua
    assert hdr.pack() == bytes([0x23, 0, 0x90, 0])
    assert not cdb.parse_mode_sense_6(bytes([3, 0, 0x10, 0])).write_protect
    with pytest.raises(HardwareError):
        cdb.parse_mode_sense_6(b"\0\0")
