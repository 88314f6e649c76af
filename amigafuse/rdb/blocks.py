"""Codecs for the Rigid Disk Block records: RDSK, PART (with its DosEnvec), FSHD, LSEG, BADB.

One ``struct`` + frozen dataclass per record; fields are named exactly as in the
AmigaOS ``devices/hardblocks.h`` and ``dos/filehandler.h`` documents (``rdb_...``,
``pb_...``, ``fhb_...``, ``lsb_...``, ``bbb_...``, ``de_...``).  Every ``LONG`` is kept as
the unsigned 32-bit value on disk; signed readings (``de_BootPri``...) are helpers.

Invariants:

* ``X.unpack(b).pack() == b`` for every block ``b`` of at least the record's size whose
  first four bytes are the record's ID: reserved longs and the bytes past the record
  (``tail``: the rest of a 512-byte or larger block) are kept as they were.
* ``unpack`` checks only the length and the ID.  Checksums are checked with
  :func:`checksum_ok` (the scanner decides what a bad checksum means); :meth:`seal`
  returns a copy whose ``*_ChkSum`` makes the block verify.
* The checksum covers ``SummedLongs`` longs from the start of the block and their sum
  (mod 2**32) is zero.

Pure code: no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Self

from amigafuse.errors import CorruptError

IDNAME_RIGIDDISK = b"RDSK"
IDNAME_PARTITION = b"PART"
IDNAME_FILESYSHEADER = b"FSHD"
IDNAME_LOADSEG = b"LSEG"
IDNAME_BADBLOCK = b"BADB"

END_OF_CHAIN = 0xFFFFFFFF  # "no block": ends every RDB chain

# rdb_Flags
RDBFF_LAST = 0x01
RDBFF_LASTLUN = 0x02
RDBFF_LASTTID = 0x04
RDBFF_NORESELECT = 0x08
RDBFF_DISKID = 0x10
RDBFF_CTRLRID = 0x20
RDBFF_SYNCH = 0x40

# pb_Flags
PBFF_BOOTABLE = 0x01
PBFF_NOMOUNT = 0x02

# fhb_PatchFlags bits: which DeviceNode fields the FSHD supplies (bit 0 = dn_Type ...).
FHB_PATCH_SEGLIST = 0x080
FHB_PATCH_GLOBALVEC = 0x100

RDB_LOCATION_LIMIT = 16  # the RDSK lies in one of blocks 0..15

_U32 = struct.Struct(">I")


def to_signed(value: int) -> int:
    """A LONG read as unsigned -> its signed value."""
    return value - (1 << 32) if value & 0x80000000 else value


def to_unsigned(value: int) -> int:
    return value & 0xFFFFFFFF


def block_sum(data: bytes | bytearray | memoryview, summed_longs: int) -> int:
    """Sum (mod 2**32) of the first ``summed_longs`` big-endian longs of ``data``."""
    longs: tuple[int, ...] = struct.unpack_from(f">{summed_longs}I", data)
    return sum(longs) & 0xFFFFFFFF


def summed_longs_valid(data: bytes | bytearray | memoryview, summed_longs: int, minimum: int) -> bool:
    """True when ``summed_longs`` covers at least the record header and fits in ``data``."""
    return minimum <= summed_longs <= len(data) // 4


def checksum_ok(data: bytes | bytearray | memoryview) -> bool:
    """True when the block's SummedLongs (long 1) is sane and the covered longs sum to 0."""
    if len(data) < 12:
        return False
    summed: int = _U32.unpack_from(data, 4)[0]
    if not summed_longs_valid(data, summed, 3):
        return False
    return block_sum(data, summed) == 0


def checksum_ok_zeroed_dc(data: bytes | bytearray | memoryview) -> bool:
    """Linux's second chance for an RDSK: the checksum with bytes 0xDC..0xDF zeroed.

    (Some tools reuse those bytes, rdb_DriveInitName's second long, without fixing the
    checksum.)"""
    if len(data) < 0xE0:
        return False
    copy = bytearray(data)
    copy[0xDC:0xE0] = b"\0\0\0\0"
    return checksum_ok(copy)


def compute_checksum(data: bytes | bytearray | memoryview, summed_longs: int) -> int:
    """The value for long 2 (the ChkSum) that makes ``summed_longs`` longs sum to 0."""
    stored: int = _U32.unpack_from(data, 8)[0]
    rest = (block_sum(data, summed_longs) - stored) & 0xFFFFFFFF
    return (-rest) & 0xFFFFFFFF


def _need(data: bytes | bytearray | memoryview, size: int, ident: bytes, what: str) -> bytes:
    raw = bytes(data)
    if len(raw) < size:
        raise CorruptError(f"{what} block is {len(raw)} bytes, shorter than its {size}-byte record")
    if raw[:4] != ident:
        raise CorruptError(
            f"not a {what} block: ID is {raw[:4]!r}, expected {ident!r}", field=f"{ident.decode()} ID"
        )
    return raw


def bstr_decode(raw: bytes) -> str:
    """A BCPL string field: length byte then characters (bounded by the field)."""
    if not raw:
        return ""
    n = min(raw[0], len(raw) - 1)
    return raw[1 : 1 + n].decode("latin-1")


def bstr_encode(text: str, field_bytes: int) -> bytes:
    enc = text.encode("latin-1")
    if len(enc) > field_bytes - 1:
        raise ValueError(f"name {text!r} is longer than {field_bytes - 1} characters")
    return (bytes([len(enc)]) + enc).ljust(field_bytes, b"\0")


def cstr_decode(raw: bytes) -> str:
    """A fixed text field (vendor/product), NUL-terminated or space-padded."""
    return raw.split(b"\0", 1)[0].decode("latin-1").strip()


# --------------------------------------------------------------------------- RDSK


_RDSK = struct.Struct(">4s9I6I5I3I3I5I8I8s16s4s8s16s4s40s")
assert _RDSK.size == 256


@dataclass(frozen=True)
class RigidDiskBlock:
    """``struct RigidDiskBlock`` (hardblocks.h): the RDSK block, 64 summed longs."""

    rdb_ID: bytes
    rdb_SummedLongs: int
    rdb_ChkSum: int
    rdb_HostID: int
    rdb_BlockBytes: int
    rdb_Flags: int
    rdb_BadBlockList: int
    rdb_PartitionList: int
    rdb_FileSysHeaderList: int
    rdb_DriveInit: int
    rdb_Reserved1: tuple[int, ...]  # 6 longs, 0xFFFFFFFF
    rdb_Cylinders: int
    rdb_Sectors: int
    rdb_Heads: int
    rdb_Interleave: int
    rdb_Park: int
    rdb_Reserved2: tuple[int, ...]  # 3
    rdb_WritePreComp: int
    rdb_ReducedWrite: int
    rdb_StepRate: int
    rdb_Reserved3: tuple[int, ...]  # 5
    rdb_RDBBlocksLo: int
    rdb_RDBBlocksHi: int
    rdb_LoCylinder: int
    rdb_HiCylinder: int
    rdb_CylBlocks: int
    rdb_AutoParkSeconds: int
    rdb_HighRDSKBlock: int
    rdb_Reserved4: int
    rdb_DiskVendor: bytes  # 8
    rdb_DiskProduct: bytes  # 16
    rdb_DiskRevision: bytes  # 4
    rdb_ControllerVendor: bytes  # 8
    rdb_ControllerProduct: bytes  # 16
    rdb_ControllerRevision: bytes  # 4
    rdb_DriveInitName: bytes  # 40 (rdb_Reserved5[10] in older headers)
    tail: bytes = b""  # bytes of the block past the 256-byte record

    RECORD_SIZE: ClassVar[int] = 256
    SUMMED_LONGS: ClassVar[int] = 64

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        raw = _need(data, cls.RECORD_SIZE, IDNAME_RIGIDDISK, "RDSK")
        v = _RDSK.unpack_from(raw)
        args: list[Any] = [
            v[0], *v[1:10], tuple(v[10:16]), *v[16:21], tuple(v[21:24]), *v[24:27],
            tuple(v[27:32]), *v[32:40], *v[40:47], raw[cls.RECORD_SIZE:],
        ]  # fmt: skip
        return cls(*args)

    def pack(self) -> bytes:
        return (
            _RDSK.pack(
                self.rdb_ID, self.rdb_SummedLongs, self.rdb_ChkSum, self.rdb_HostID,
                self.rdb_BlockBytes, self.rdb_Flags, self.rdb_BadBlockList,
                self.rdb_PartitionList, self.rdb_FileSysHeaderList, self.rdb_DriveInit,
                *self.rdb_Reserved1, self.rdb_Cylinders, self.rdb_Sectors, self.rdb_Heads,
                self.rdb_Interleave, self.rdb_Park, *self.rdb_Reserved2,
                self.rdb_WritePreComp, self.rdb_ReducedWrite, self.rdb_StepRate,
                *self.rdb_Reserved3, self.rdb_RDBBlocksLo, self.rdb_RDBBlocksHi,
                self.rdb_LoCylinder, self.rdb_HiCylinder, self.rdb_CylBlocks,
                self.rdb_AutoParkSeconds, self.rdb_HighRDSKBlock, self.rdb_Reserved4,
                self.rdb_DiskVendor, self.rdb_DiskProduct, self.rdb_DiskRevision,
                self.rdb_ControllerVendor, self.rdb_ControllerProduct,
                self.rdb_ControllerRevision, self.rdb_DriveInitName,
            )
            + self.tail
        )

    def seal(self) -> Self:
        """A copy with rdb_ChkSum computed over rdb_SummedLongs longs."""
        return replace(self, rdb_ChkSum=compute_checksum(self.pack(), self.rdb_SummedLongs))


# --------------------------------------------------------------------------- DosEnvec


_ENVEC = struct.Struct(">20I")


@dataclass(frozen=True)
class DosEnvec:
    """``struct DosEnvec`` (filehandler.h), 20 longs.  Sizes are in de_SizeBlock-long units."""

    de_TableSize: int
    de_SizeBlock: int
    de_SecOrg: int
    de_Surfaces: int
    de_SectorPerBlock: int
    de_BlocksPerTrack: int
    de_Reserved: int
    de_PreAlloc: int
    de_Interleave: int
    de_LowCyl: int
    de_HighCyl: int
    de_NumBuffers: int
    de_BufMemType: int
    de_MaxTransfer: int
    de_Mask: int
    de_BootPri: int
    de_DosType: int
    de_Baud: int
    de_Control: int
    de_BootBlocks: int

    @classmethod
    def from_longs(cls, longs: tuple[int, ...]) -> Self:
        return cls(*longs)

    def longs(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def boot_pri(self) -> int:
        """de_BootPri as the signed value it is (-128..127 in practice)."""
        return to_signed(self.de_BootPri)


# --------------------------------------------------------------------------- PART


_PART = struct.Struct(">4s5I2II32s15I20I12I")
assert _PART.size == 256


@dataclass(frozen=True)
class PartitionBlock:
    """``struct PartitionBlock`` (hardblocks.h): one PART block, 64 summed longs."""

    pb_ID: bytes
    pb_SummedLongs: int
    pb_ChkSum: int
    pb_HostID: int
    pb_Next: int
    pb_Flags: int
    pb_Reserved1: tuple[int, ...]  # 2
    pb_DevFlags: int
    pb_DriveName: bytes  # 32: BSTR
    pb_Reserved2: tuple[int, ...]  # 15
    pb_Environment: DosEnvec
    pb_EReserved: tuple[int, ...]  # 12
    tail: bytes = b""

    RECORD_SIZE: ClassVar[int] = 256
    SUMMED_LONGS: ClassVar[int] = 64

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        raw = _need(data, cls.RECORD_SIZE, IDNAME_PARTITION, "PART")
        v = _PART.unpack_from(raw)
        return cls(
            v[0], v[1], v[2], v[3], v[4], v[5], tuple(v[6:8]), v[8], v[9],
            tuple(v[10:25]), DosEnvec.from_longs(tuple(v[25:45])), tuple(v[45:57]),
            tail=raw[cls.RECORD_SIZE:],
        )  # fmt: skip

    def pack(self) -> bytes:
        return (
            _PART.pack(
                self.pb_ID, self.pb_SummedLongs, self.pb_ChkSum, self.pb_HostID, self.pb_Next,
                self.pb_Flags, *self.pb_Reserved1, self.pb_DevFlags, self.pb_DriveName,
                *self.pb_Reserved2, *self.pb_Environment.longs(), *self.pb_EReserved,
            )
            + self.tail
        )

    def seal(self) -> Self:
        return replace(self, pb_ChkSum=compute_checksum(self.pack(), self.pb_SummedLongs))

    @property
    def drive_name(self) -> str:
        return bstr_decode(self.pb_DriveName)


# --------------------------------------------------------------------------- FSHD


_FSHD = struct.Struct(">4s5I2I3I9I23I21I")
assert _FSHD.size == 256


@dataclass(frozen=True)
class FileSysHeaderBlock:
    """``struct FileSysHeaderBlock`` (hardblocks.h): a filesystem handler stored in the RDB."""

    fhb_ID: bytes
    fhb_SummedLongs: int
    fhb_ChkSum: int
    fhb_HostID: int
    fhb_Next: int
    fhb_Flags: int
    fhb_Reserved1: tuple[int, ...]  # 2
    fhb_DosType: int
    fhb_Version: int  # major << 16 | minor
    fhb_PatchFlags: int
    fhb_Type: int
    fhb_Task: int
    fhb_Lock: int
    fhb_Handler: int
    fhb_StackSize: int
    fhb_Priority: int
    fhb_Startup: int
    fhb_SegListBlocks: int  # first LSEG block
    fhb_GlobalVec: int
    fhb_Reserved2: tuple[int, ...]  # 23
    fhb_Reserved3: tuple[int, ...]  # 21
    tail: bytes = b""

    RECORD_SIZE: ClassVar[int] = 256
    SUMMED_LONGS: ClassVar[int] = 64

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        raw = _need(data, cls.RECORD_SIZE, IDNAME_FILESYSHEADER, "FSHD")
        v = _FSHD.unpack_from(raw)
        args: list[Any] = [
            v[0], *v[1:6], tuple(v[6:8]), *v[8:20], tuple(v[20:43]), tuple(v[43:64]),
            raw[cls.RECORD_SIZE:],
        ]  # fmt: skip
        return cls(*args)

    def pack(self) -> bytes:
        return (
            _FSHD.pack(
                self.fhb_ID, self.fhb_SummedLongs, self.fhb_ChkSum, self.fhb_HostID,
                self.fhb_Next, self.fhb_Flags, *self.fhb_Reserved1, self.fhb_DosType,
                self.fhb_Version, self.fhb_PatchFlags, self.fhb_Type, self.fhb_Task,
                self.fhb_Lock, self.fhb_Handler, self.fhb_StackSize, self.fhb_Priority,
                self.fhb_Startup, self.fhb_SegListBlocks, self.fhb_GlobalVec,
                *self.fhb_Reserved2, *self.fhb_Reserved3,
            )
            + self.tail
        )

    def seal(self) -> Self:
        return replace(self, fhb_ChkSum=compute_checksum(self.pack(), self.fhb_SummedLongs))

    @property
    def version_text(self) -> str:
        return f"{self.fhb_Version >> 16}.{self.fhb_Version & 0xFFFF}"


# --------------------------------------------------------------------------- LSEG


_LSEG_HEAD = struct.Struct(">4s4I")


@dataclass(frozen=True)
class LoadSegBlock:
    """``struct LoadSegBlock``: one block of a handler's load file.

    ``lsb_LoadData`` is the data the checksum covers (``lsb_SummedLongs - 5`` longs, as
    far as the block reaches); ``tail`` the rest of the block."""

    lsb_ID: bytes
    lsb_SummedLongs: int
    lsb_ChkSum: int
    lsb_HostID: int
    lsb_Next: int
    lsb_LoadData: bytes
    tail: bytes = b""

    RECORD_SIZE: ClassVar[int] = 20

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        raw = _need(data, cls.RECORD_SIZE, IDNAME_LOADSEG, "LSEG")
        ident, summed, chk, host, nxt = _LSEG_HEAD.unpack_from(raw)
        end = max(cls.RECORD_SIZE, min(len(raw), summed * 4))
        return cls(ident, summed, chk, host, nxt, raw[cls.RECORD_SIZE : end], raw[end:])

    def pack(self) -> bytes:
        return (
            _LSEG_HEAD.pack(
                self.lsb_ID, self.lsb_SummedLongs, self.lsb_ChkSum, self.lsb_HostID, self.lsb_Next
            )
            + self.lsb_LoadData
            + self.tail
        )

    def seal(self) -> Self:
        return replace(self, lsb_ChkSum=compute_checksum(self.pack(), self.lsb_SummedLongs))


# --------------------------------------------------------------------------- BADB


_BADB_HEAD = struct.Struct(">4s5I")


@dataclass(frozen=True)
class BadBlockBlock:
    """``struct BadBlockBlock``: pairs (bbe_BadBlock, bbe_GoodBlock) of remapped blocks."""

    bbb_ID: bytes
    bbb_SummedLongs: int
    bbb_ChkSum: int
    bbb_HostID: int
    bbb_Next: int
    bbb_Reserved: int
    bbb_BlockPairs: tuple[tuple[int, int], ...]
    tail: bytes = b""

    RECORD_SIZE: ClassVar[int] = 24

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Self:
        raw = _need(data, cls.RECORD_SIZE, IDNAME_BADBLOCK, "BADB")
        ident, summed, chk, host, nxt, res = _BADB_HEAD.unpack_from(raw)
        end = max(cls.RECORD_SIZE, min(len(raw), summed * 4))
        npairs = (end - cls.RECORD_SIZE) // 8
        flat = struct.unpack_from(f">{npairs * 2}I", raw, cls.RECORD_SIZE)
        pairs = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
        return cls(ident, summed, chk, host, nxt, res, pairs, raw[cls.RECORD_SIZE + npairs * 8 :])

    def pack(self) -> bytes:
        flat = [x for pair in self.bbb_BlockPairs for x in pair]
        return (
            _BADB_HEAD.pack(
                self.bbb_ID, self.bbb_SummedLongs, self.bbb_ChkSum, self.bbb_HostID,
                self.bbb_Next, self.bbb_Reserved,
            )
            + struct.pack(f">{len(flat)}I", *flat)
            + self.tail
        )

    def seal(self) -> Self:
        return replace(self, bbb_ChkSum=compute_checksum(self.pack(), self.bbb_SummedLongs))


__all__ = [
    "END_OF_CHAIN",
    "BadBlockBlock",
    "DosEnvec",
    "FileSysHeaderBlock",
    "LoadSegBlock",
    "PartitionBlock",
    "RigidDiskBlock",
    "checksum_ok",
    "checksum_ok_zeroed_dc",
]
