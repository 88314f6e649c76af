"""SCSI command descriptor blocks and their responses (pure: no I/O, no trio).

Builders return the CDB bytes; parsers take the data-in bytes a device returned and give
frozen dataclasses.  Field names follow SPC-4/SBC-3.  Every parser distrusts the device:
short or inconsistent data raises :class:`~amigafuse.errors.HardwareError` naming the
command and the bad value (a device that answers garbage is a broken device).

Response dataclasses that tests and fakes need to produce also have ``pack()``, with
``parse(pack(x)) == x``.

Invariants of the builders (our own, so ``ValueError`` rather than a device error):
LBAs and block counts are non-negative and fit the chosen CDB; READ/WRITE move at least
one block (a transfer length of 0 means "nothing" in the 10/16-byte CDBs, which is never
what a caller wants).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from amigafuse.errors import HardwareError

# ----------------------------------------------------------------------------- opcodes

TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
SYNCHRONIZE_CACHE_10 = 0x35
READ_16 = 0x88
WRITE_16 = 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10
REPORT_LUNS = 0xA0

OPCODE_NAMES: dict[int, str] = {
    TEST_UNIT_READY: "TEST UNIT READY",
    REQUEST_SENSE: "REQUEST SENSE",
    INQUIRY: "INQUIRY",
    MODE_SENSE_6: "MODE SENSE(6)",
    READ_CAPACITY_10: "READ CAPACITY(10)",
    READ_10: "READ(10)",
    WRITE_10: "WRITE(10)",
    SYNCHRONIZE_CACHE_10: "SYNCHRONIZE CACHE(10)",
    READ_16: "READ(16)",
    WRITE_16: "WRITE(16)",
    SYNCHRONIZE_CACHE_16: "SYNCHRONIZE CACHE(16)",
    SERVICE_ACTION_IN_16: "READ CAPACITY(16)",
    REPORT_LUNS: "REPORT LUNS",
}

# Peripheral device types (SPC-4 table 49) we name; 0 is the one we drive.
TYPE_DIRECT_ACCESS = 0x00
TYPE_NO_DEVICE = 0x1F
# Peripheral qualifier 0: a device of that type is connected to this LUN.
QUALIFIER_CONNECTED = 0

# VPD pages
VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL = 0x80
VPD_DEVICE_IDENTIFICATION = 0x83

MAX_LBA_10 = 0xFFFFFFFF
MAX_COUNT_10 = 0xFFFF
MAX_COUNT_16 = 0xFFFFFFFF
MAX_LBA_16 = (1 << 64) - 1


def command_name(cdb: bytes | bytearray | memoryview) -> str:
    """A human name for a CDB's operation (``"READ(10)"``), for error messages."""
    if not cdb:
        return "empty CDB"
    op = cdb[0]
    if op == SERVICE_ACTION_IN_16 and len(cdb) > 1 and cdb[1] & 0x1F != SAI_READ_CAPACITY_16:
        return f"SERVICE ACTION IN(16)/{cdb[1] & 0x1F:#04x}"
    return OPCODE_NAMES.get(op, f"opcode {op:#04x}")


def _malformed(command: str, what: str) -> HardwareError:
    return HardwareError(
        f"the device returned malformed {command} data ({what}); the disk or its emulation "
        "is broken"
    )


def _check_u(value: int, bits: int, name: str) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name} {value} does not fit in {bits} bits")


# ----------------------------------------------------------------------------- simple CDBs


def test_unit_ready() -> bytes:
    """TEST UNIT READY (6)."""
    return bytes(6)


def request_sense(allocation_length: int = 252, *, descriptor: bool = False) -> bytes:
    """REQUEST SENSE (6); ``descriptor`` asks for descriptor-format sense."""
    _check_u(allocation_length, 8, "allocation length")
    return bytes([REQUEST_SENSE, 1 if descriptor else 0, 0, 0, allocation_length, 0])


def inquiry(page_code: int | None = None, allocation_length: int = 255) -> bytes:
    """INQUIRY (6): standard data when ``page_code`` is None, else that VPD page (EVPD=1)."""
    _check_u(allocation_length, 16, "allocation length")
    if page_code is None:
        return struct.pack(">BBBHB", INQUIRY, 0, 0, allocation_length, 0)
    _check_u(page_code, 8, "page code")
    return struct.pack(">BBBHB", INQUIRY, 1, page_code, allocation_length, 0)


def read_capacity_10() -> bytes:
    """READ CAPACITY (10), PMI=0 (capacity of the whole unit)."""
    return bytes([READ_CAPACITY_10]) + bytes(9)


def read_capacity_16(allocation_length: int = 32) -> bytes:
    """READ CAPACITY (16) (SERVICE ACTION IN(16), service action 0x10)."""
    _check_u(allocation_length, 32, "allocation length")
    return struct.pack(
        ">BBQIBB", SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 0, allocation_length, 0, 0
    )


def report_luns(allocation_length: int = 8 + 8 * 256, select_report: int = 0) -> bytes:
    """REPORT LUNS (12)."""
    _check_u(allocation_length, 32, "allocation length")
    _check_u(select_report, 8, "select report")
    return struct.pack(
        ">BBBBBBIBB", REPORT_LUNS, 0, select_report, 0, 0, 0, allocation_length, 0, 0
    )


def mode_sense_6(
    page_code: int = 0x3F, allocation_length: int = 192, *, disable_block_descriptors: bool = True
) -> bytes:
    """MODE SENSE (6), current values; page 0x3F = all pages."""
    _check_u(page_code, 6, "page code")
    _check_u(allocation_length, 8, "allocation length")
    return bytes(
        [MODE_SENSE_6, 0x08 if disable_block_descriptors else 0, page_code, 0, allocation_length, 0]
    )


# ----------------------------------------------------------------------------- READ / WRITE


@dataclass(frozen=True)
class ReadWrite:
    """A decoded READ/WRITE (10)/(16) CDB (what :func:`parse_read_write` returns)."""

    write: bool
    lba: int
    count: int
    fua: bool
    cdb_length: int


def needs_16(lba: int, count: int) -> bool:
    """True when ``[lba, lba+count)`` cannot be expressed by a 10-byte READ/WRITE."""
    return lba > MAX_LBA_10 or count > MAX_COUNT_10 or lba + count - 1 > MAX_LBA_10


def _read_write(opcode10: int, opcode16: int, lba: int, count: int, fua: bool) -> bytes:
    if count < 1 or count > MAX_COUNT_16:
        raise ValueError(f"block count {count} outside 1..{MAX_COUNT_16}")
    if lba < 0 or lba + count - 1 > MAX_LBA_16:
        raise ValueError(f"blocks {lba}..{lba + count - 1} outside the 64-bit LBA space")
    flags = 0x08 if fua else 0
    if needs_16(lba, count):
        return struct.pack(">BBQIBB", opcode16, flags, lba, count, 0, 0)
    return struct.pack(">BBIBHB", opcode10, flags, lba, 0, count, 0)


def read(lba: int, count: int, *, fua: bool = False) -> bytes:
    """READ(10), or READ(16) when the LBA or count does not fit the 10-byte form."""
    return _read_write(READ_10, READ_16, lba, count, fua)


def write(lba: int, count: int, *, fua: bool = False) -> bytes:
    """WRITE(10), or WRITE(16) when the LBA or count does not fit the 10-byte form."""
    return _read_write(WRITE_10, WRITE_16, lba, count, fua)


def parse_read_write(cdb: bytes | bytearray | memoryview) -> ReadWrite:
    """Decode a READ/WRITE (10)/(16) CDB.  Raises ValueError for any other CDB."""
    b = bytes(cdb)
    if len(b) == 10 and b[0] in (READ_10, WRITE_10):
        _, flags, lba, _, count, _ = struct.unpack(">BBIBHB", b)
        return ReadWrite(b[0] == WRITE_10, lba, count, bool(flags & 0x08), 10)
    if len(b) == 16 and b[0] in (READ_16, WRITE_16):
        _, flags, lba, count, _, _ = struct.unpack(">BBQIBB", b)
        return ReadWrite(b[0] == WRITE_16, lba, count, bool(flags & 0x08), 16)
    raise ValueError(f"not a READ/WRITE(10/16) CDB: {b.hex()}")


def synchronize_cache(lba: int = 0, count: int = 0, *, immed: bool = False) -> bytes:
    """SYNCHRONIZE CACHE(10), or (16) past the 10-byte limits.  ``count`` 0 = to the end."""
    if lba < 0 or count < 0 or count > MAX_COUNT_16 or lba > MAX_LBA_16:
        raise ValueError(f"invalid SYNCHRONIZE CACHE range lba={lba} count={count}")
    flags = 0x02 if immed else 0
    if lba > MAX_LBA_10 or count > MAX_COUNT_10:
        return struct.pack(">BBQIBB", SYNCHRONIZE_CACHE_16, flags, lba, count, 0, 0)
    return struct.pack(">BBIBHB", SYNCHRONIZE_CACHE_10, flags, lba, 0, count, 0)


# ----------------------------------------------------------------------------- INQUIRY


def _ascii(field: bytes) -> str:
    """An INQUIRY ASCII field: printable ASCII, trailing spaces/NULs stripped."""
    text = "".join(chr(c) if 0x20 <= c < 0x7F else "?" for c in field.rstrip(b" \0"))
    return text.strip()


@dataclass(frozen=True)
class StandardInquiry:
    """Standard INQUIRY data (SPC-4 6.4.2): the first 36 bytes, which every device returns."""

    peripheral_qualifier: int
    peripheral_device_type: int
    flags1: int  # byte 1: RMB (bit 7), LU_CONG
    version: int
    response_data_format: int
    additional_length: int
    flags5: int  # byte 5: SCCS, ACC, TPGS, 3PC, PROTECT
    flags6: int  # byte 6: ENCSERV, VS, MULTIP, ADDR16
    flags7: int  # byte 7: WBUS16, SYNC, CMDQUE, VS
    vendor_identification: bytes  # 8 bytes
    product_identification: bytes  # 16 bytes
    product_revision_level: bytes  # 4 bytes
    byte3_flags: int = 0  # NORMACA, HISUP (bits 5, 4)

    LENGTH = 36

    @property
    def removable(self) -> bool:
        return bool(self.flags1 & 0x80)

    @property
    def vendor(self) -> str:
        return _ascii(self.vendor_identification)

    @property
    def product(self) -> str:
        return _ascii(self.product_identification)

    @property
    def revision(self) -> str:
        return _ascii(self.product_revision_level)

    @property
    def is_connected_disk(self) -> bool:
        """A direct-access block device is connected at this LUN."""
        return (
            self.peripheral_qualifier == QUALIFIER_CONNECTED
            and self.peripheral_device_type == TYPE_DIRECT_ACCESS
        )

    def pack(self) -> bytes:
        return struct.pack(
            ">BBBBBBBB8s16s4s",
            (self.peripheral_qualifier << 5) | self.peripheral_device_type,
            self.flags1,
            self.version,
            self.byte3_flags | self.response_data_format,
            self.additional_length,
            self.flags5,
            self.flags6,
            self.flags7,
            self.vendor_identification,
            self.product_identification,
            self.product_revision_level,
        )


def parse_standard_inquiry(data: bytes | bytearray | memoryview) -> StandardInquiry:
    """Parse standard INQUIRY data.  Needs at least the 36 mandatory bytes."""
    b = bytes(data)
    if len(b) < StandardInquiry.LENGTH:
        # Type and qualifier are in byte 0; some devices send only 5 bytes for "no LUN".
        if len(b) >= 1 and (b[0] >> 5) != QUALIFIER_CONNECTED:
            b = b.ljust(StandardInquiry.LENGTH, b"\0")
        else:
            raise _malformed("INQUIRY", f"{len(b)} bytes, at least 36 expected")
    (b0, b1, version, b3, add_len, f5, f6, f7, vendor, product, rev) = struct.unpack(
        ">BBBBBBBB8s16s4s", b[:36]
    )
    return StandardInquiry(
        peripheral_qualifier=b0 >> 5,
        peripheral_device_type=b0 & 0x1F,
        flags1=b1,
        version=version,
        response_data_format=b3 & 0x0F,
        additional_length=add_len,
        flags5=f5,
        flags6=f6,
        flags7=f7,
        vendor_identification=vendor,
        product_identification=product,
        product_revision_level=rev,
        byte3_flags=b3 & 0xF0,
    )


def _vpd_payload(data: bytes | bytearray | memoryview, page_code: int) -> bytes:
    """Check a VPD page header and return its payload (bounded by PAGE LENGTH)."""
    b = bytes(data)
    name = f"INQUIRY VPD page {page_code:#04x}"
    if len(b) < 4:
        raise _malformed(name, f"{len(b)} bytes, header needs 4")
    if b[1] != page_code:
        raise _malformed(name, f"page code {b[1]:#04x} returned")
    page_length = struct.unpack_from(">H", b, 2)[0]
    if 4 + page_length > len(b):
        raise _malformed(name, f"page length {page_length} exceeds the {len(b) - 4} bytes received")
    return b[4 : 4 + page_length]


def parse_vpd_supported_pages(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """VPD page 0x00: the list of supported page codes."""
    return tuple(_vpd_payload(data, VPD_SUPPORTED_PAGES))


def parse_vpd_unit_serial(data: bytes | bytearray | memoryview) -> str:
    """VPD page 0x80: the unit serial number (ASCII, trimmed)."""
    return _ascii(_vpd_payload(data, VPD_UNIT_SERIAL))


def pack_vpd_page(page_code: int, payload: bytes, peripheral: int = 0) -> bytes:
    """A VPD page with header (for fakes and tests)."""
    return struct.pack(">BBH", peripheral, page_code, len(payload)) + payload


# Designator types (SPC-4 table 459) and code sets
DESIGNATOR_VENDOR_SPECIFIC = 0
DESIGNATOR_T10_VENDOR_ID = 1
DESIGNATOR_EUI64 = 2
DESIGNATOR_NAA = 3
CODE_SET_BINARY = 1
CODE_SET_ASCII = 2
CODE_SET_UTF8 = 3


@dataclass(frozen=True)
class Designator:
    """One designation descriptor of VPD page 0x83."""

    protocol_identifier: int
    code_set: int
    piv: bool
    association: int
    designator_type: int
    designator: bytes

    @property
    def text(self) -> str:
        """The designator as text: ASCII/UTF-8 designators as is, binary ones as hex."""
        if self.code_set in (CODE_SET_ASCII, CODE_SET_UTF8):
            return _ascii(self.designator)
        return self.designator.hex()

    def pack(self) -> bytes:
        return (
            bytes(
                [
                    (self.protocol_identifier << 4) | self.code_set,
                    (0x80 if self.piv else 0) | (self.association << 4) | self.designator_type,
                    0,
                    len(self.designator),
                ]
            )
            + self.designator
        )


def parse_vpd_device_identification(data: bytes | bytearray | memoryview) -> tuple[Designator, ...]:
    """VPD page 0x83: the designation descriptors, each bounded by the page length."""
    payload = _vpd_payload(data, VPD_DEVICE_IDENTIFICATION)
    out: list[Designator] = []
    offset = 0
    while offset < len(payload):
        if offset + 4 > len(payload):
            raise _malformed("INQUIRY VPD page 0x83", f"truncated descriptor at offset {offset}")
        b0, b1, _, length = payload[offset : offset + 4]
        end = offset + 4 + length
        if end > len(payload):
            raise _malformed(
                "INQUIRY VPD page 0x83", f"descriptor at offset {offset} claims {length} bytes"
            )
        out.append(
            Designator(
                protocol_identifier=b0 >> 4,
                code_set=b0 & 0x0F,
                piv=bool(b1 & 0x80),
                association=(b1 >> 4) & 0x03,
                designator_type=b1 & 0x0F,
                designator=payload[offset + 4 : end],
            )
        )
        offset = end
    return tuple(out)


# ----------------------------------------------------------------------------- READ CAPACITY


@dataclass(frozen=True)
class Capacity:
    """READ CAPACITY (10) or (16) data, reduced to what both carry plus the (16) extras.

    ``last_lba`` is the address of the last logical block (count - 1).
    """

    last_lba: int
    block_length: int
    protection_enabled: bool = False
    protection_type: int = 0
    logical_blocks_per_physical_exponent: int = 0
    lbpme: bool = False
    lbprz: bool = False
    lowest_aligned_lba: int = 0

    @property
    def block_count(self) -> int:
        return self.last_lba + 1

    def pack10(self) -> bytes:
        return struct.pack(">II", min(self.last_lba, MAX_LBA_10), self.block_length)

    def pack16(self) -> bytes:
        b12 = (self.protection_type << 1) | (1 if self.protection_enabled else 0)
        b14 = (
            (0x80 if self.lbpme else 0)
            | (0x40 if self.lbprz else 0)
            | ((self.lowest_aligned_lba >> 8) & 0x3F)
        )
        return struct.pack(
            ">QIBBBB16x",
            self.last_lba,
            self.block_length,
            b12,
            self.logical_blocks_per_physical_exponent,
            b14,
            self.lowest_aligned_lba & 0xFF,
        )


def _check_block_length(command: str, block_length: int) -> None:
    # SBC allows other sizes in theory; a block device layer needs a power of two we can
    # address, and anything outside 512..64 KiB is a broken or hostile device here.
    if block_length < 512 or block_length > 65536 or block_length & (block_length - 1):
        raise _malformed(command, f"logical block length {block_length}")


def parse_read_capacity_10(data: bytes | bytearray | memoryview) -> Capacity:
    """READ CAPACITY (10) data.  ``last_lba == 0xFFFFFFFF`` means: ask READ CAPACITY (16)."""
    b = bytes(data)
    if len(b) < 8:
        raise _malformed("READ CAPACITY(10)", f"{len(b)} bytes, 8 expected")
    last_lba, block_length = struct.unpack_from(">II", b)
    _check_block_length("READ CAPACITY(10)", block_length)
    return Capacity(last_lba=last_lba, block_length=block_length)


def parse_read_capacity_16(data: bytes | bytearray | memoryview) -> Capacity:
    """READ CAPACITY (16) data (the first 16 bytes are needed; the rest is reserved)."""
    b = bytes(data)
    if len(b) < 16:
        raise _malformed("READ CAPACITY(16)", f"{len(b)} bytes, at least 16 expected")
    last_lba, block_length, b12, b13, b14, b15 = struct.unpack_from(">QIBBBB", b)
    _check_block_length("READ CAPACITY(16)", block_length)
    if last_lba == MAX_LBA_16:
        raise _malformed("READ CAPACITY(16)", f"last LBA {last_lba:#x}")
    return Capacity(
        last_lba=last_lba,
        block_length=block_length,
        protection_enabled=bool(b12 & 1),
        protection_type=(b12 >> 1) & 0x07,
        logical_blocks_per_physical_exponent=b13 & 0x0F,
        lbpme=bool(b14 & 0x80),
        lbprz=bool(b14 & 0x40),
        lowest_aligned_lba=((b14 & 0x3F) << 8) | b15,
    )


# ----------------------------------------------------------------------------- REPORT LUNS


def decode_lun(entry: bytes) -> int:
    """An 8-byte SAM LUN (peripheral or flat addressing, single level) → LUN number."""
    method = entry[0] >> 6
    if method == 0:  # peripheral device addressing: bus 0, LUN in byte 1
        if entry[0] & 0x3F:
            raise _malformed("REPORT LUNS", f"LUN {entry.hex()} uses a bus identifier")
        lun = entry[1]
    elif method == 1:  # flat space addressing
        lun = ((entry[0] & 0x3F) << 8) | entry[1]
    else:
        raise _malformed("REPORT LUNS", f"unsupported LUN addressing in {entry.hex()}")
    if any(entry[2:]):
        raise _malformed("REPORT LUNS", f"hierarchical LUN {entry.hex()}")
    return lun


def encode_lun(lun: int) -> bytes:
    """LUN number → 8-byte SAM LUN (peripheral below 256, flat space above)."""
    _check_u(lun, 14, "LUN")
    if lun < 256:
        return bytes([0, lun]) + bytes(6)
    return bytes([0x40 | (lun >> 8), lun & 0xFF]) + bytes(6)


def parse_report_luns(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """REPORT LUNS data → the LUN numbers (only as many as were transferred)."""
    b = bytes(data)
    if len(b) < 8:
        raise _malformed("REPORT LUNS", f"{len(b)} bytes, header needs 8")
    list_length = struct.unpack_from(">I", b)[0]
    if list_length % 8:
        raise _malformed("REPORT LUNS", f"LUN list length {list_length} is not a multiple of 8")
    available = min(list_length, len(b) - 8) // 8
    return tuple(decode_lun(b[8 + 8 * i : 16 + 8 * i]) for i in range(available))


def pack_report_luns(luns: tuple[int, ...]) -> bytes:
    return struct.pack(">I4x", 8 * len(luns)) + b"".join(encode_lun(n) for n in luns)


# ----------------------------------------------------------------------------- MODE SENSE


@dataclass(frozen=True)
class ModeParameterHeader6:
    """The 4-byte MODE SENSE(6) header; for direct-access devices bit 7 of the
    device-specific parameter is WP (write protect), bit 4 DPOFUA."""

    mode_data_length: int
    medium_type: int
    device_specific_parameter: int
    block_descriptor_length: int

    @property
    def write_protect(self) -> bool:
        return bool(self.device_specific_parameter & 0x80)

    @property
    def dpofua(self) -> bool:
        return bool(self.device_specific_parameter & 0x10)

    def pack(self) -> bytes:
        return bytes(
            [
                self.mode_data_length,
                self.medium_type,
                self.device_specific_parameter,
                self.block_descriptor_length,
            ]
        )


def parse_mode_sense_6(data: bytes | bytearray | memoryview) -> ModeParameterHeader6:
    b = bytes(data)
    if len(b) < 4:
        raise _malformed("MODE SENSE(6)", f"{len(b)} bytes, header needs 4")
    return ModeParameterHeader6(b[0], b[1], b[2], b[3])
