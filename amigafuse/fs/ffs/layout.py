"""FFS/OFS on-disk records: one codec (struct + frozen dataclass) per block type.

Field names follow "The .ADF (Amiga Disk File) format FAQ" (L. Clévy) and, for the
long-name (LNFS, DOS\\6/7) and dircache (DCFS, DOS\\4/5) records, Olaf Barthel's
"DCFS and LNFS Low Level Data Structures".  Every codec keeps reserved and unused bytes,
so ``pack(unpack(b)) == b`` for any block of the right size; ``unpack`` does not check
checksums or types (callers do, with :func:`verify_checksum`), so damaged blocks can be
decoded for inspection.

Offsets are given for a block of ``B`` bytes (512..32768); tables have ``B/4 - 56``
entries.  This module is pure: no I/O, no trio.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Container, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from amigafuse.amiga.dates import DateStamp
from amigafuse.errors import ChainLoopError, ChecksumError, CorruptError

_T = TypeVar("_T")
_FIELDS: dict[type, frozenset[str]] = {}


def evolve(obj: _T, **changes: Any) -> _T:
    """``dataclasses.replace`` for our frozen codecs, without re-running ``__init__``
    (the write paths call it hundreds of thousands of times).  Unknown names raise."""
    cls = type(obj)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
    bad = changes.keys() - names
    if bad:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(bad)}")
    new = object.__new__(cls)
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


# Primary block types (first long) and secondary types (last long).
T_HEADER = 2
T_DATA = 8
T_LIST = 16
T_DIRCACHE = 33
T_COMMENT = 64
ST_ROOT = 1
ST_USERDIR = 2
ST_SOFTLINK = 3
ST_LINKDIR = 4
ST_FILE = -3
ST_LINKFILE = -4

BM_VALID = 0xFFFFFFFF
BM_INVALID = 0
ROOT_BM_PAGES = 25
OFS_DATA_HEADER_BYTES = 24
MAX_NAME_STD = 30
MAX_COMMENT = 79
MAX_NAME_LNFS = 107
LNFS_NAME_COMMENT_BYTES = 112


def u32(value: int) -> int:
    return value & 0xFFFFFFFF


def s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def table_size(block_size: int) -> int:
    """Entries in a hash table / data-block table of a ``block_size`` block."""
    return block_size // 4 - 56


# --------------------------------------------------------------------------- checksums


def sum_longs(data: bytes | bytearray | memoryview) -> int:
    total: int = sum(struct.unpack(f">{len(data) // 4}L", data))
    return total & 0xFFFFFFFF


def normal_checksum(block: bytes | bytearray, offset: int = 20) -> int:
    """The value that makes the sum of all longs zero with ``offset`` holding it."""
    (current,) = struct.unpack_from(">L", block, offset)
    total: int = sum_longs(block) - current
    return (-total) & 0xFFFFFFFF


def verify_checksum(block: bytes | bytearray, offset: int = 20) -> bool:
    return sum_longs(block) == 0 if offset >= 0 else True


def with_checksum(block: bytes | bytearray, offset: int = 20) -> bytes:
    buf = bytearray(block)
    struct.pack_into(">L", buf, offset, 0)
    struct.pack_into(">L", buf, offset, normal_checksum(buf, offset))
    return bytes(buf)


def boot_checksum(boot: bytes | bytearray) -> int:
    """Boot block checksum over 1024 bytes (add with carry, then invert), field at 4."""
    total = 0
    for index, (value,) in enumerate(struct.iter_unpack(">L", bytes(boot[:1024]))):
        if index == 1:
            continue
        total += value
        if total > 0xFFFFFFFF:
            total = (total & 0xFFFFFFFF) + 1
    return (~total) & 0xFFFFFFFF


# --------------------------------------------------------------------------- names


def _upper_table(intl: bool) -> bytes:
    table = bytearray(range(256))
    for c in range(ord("a"), ord("z") + 1):
        table[c] = c - 32
    if intl:
        for c in range(0xE0, 0xFF):
            if c != 0xF7:
                table[c] = c - 32
    return bytes(table)


UPPER_STD = _upper_table(False)
UPPER_INTL = _upper_table(True)


def upper_name(name: bytes, intl: bool) -> bytes:
    """The name as the handler compares it (ASCII, or INTL Latin-1 upper case)."""
    return name.translate(UPPER_INTL if intl else UPPER_STD)


def hash_name(name: bytes, intl: bool, block_size: int) -> int:
    """Hash-table slot of ``name`` in a directory of a ``block_size`` volume."""
    upper = upper_name(name, intl)
    value = len(name)
    for c in upper:
        value = (value * 13 + c) & 0x7FF
    return value % table_size(block_size)


def bcpl(raw: bytes | bytearray, limit: int) -> bytes:
    """A BCPL string (length byte then chars) from ``raw``, at most ``limit`` chars."""
    if not raw:
        return b""
    n = min(raw[0], limit, len(raw) - 1)
    return bytes(raw[1 : 1 + n])


def make_bcpl(text: bytes, field_bytes: int) -> bytes:
    if len(text) + 1 > field_bytes:
        raise ValueError(f"string of {len(text)} bytes does not fit a {field_bytes}-byte field")
    return (bytes([len(text)]) + text).ljust(field_bytes, b"\0")


# --------------------------------------------------------------------------- boot block


@dataclass(frozen=True)
class BootBlock:
    """The first 1024 bytes of a volume: ``DOS`` + flags, checksum, rootblock, code."""

    disk_type: int
    chksum: int
    rootblock: int
    boot_code: bytes  # 1012 bytes

    SIZE = 1024

    @classmethod
    def unpack(cls, data: bytes) -> BootBlock:
        disk_type, chksum, rootblock = struct.unpack_from(">3L", data)
        return cls(disk_type, chksum, rootblock, bytes(data[12:1024]))

    def pack(self) -> bytes:
        return struct.pack(">3L", self.disk_type, self.chksum, self.rootblock) + self.boot_code

    @classmethod
    def new(cls, dostype: int, rootblock: int = 880) -> BootBlock:
        blank = cls(dostype, 0, rootblock, bytes(1012))
        return replace(blank, chksum=boot_checksum(blank.pack()))


# --------------------------------------------------------------------------- root block


@dataclass(frozen=True)
class RootBlock:
    """The root block (T_HEADER / ST_ROOT) at (Reserved + blocks - 1) / 2."""

    block_size: int
    type: int
    header_key: int
    high_seq: int
    ht_size: int
    first_data: int
    chksum: int
    ht: tuple[int, ...]
    bm_flag: int
    bm_pages: tuple[int, ...]  # 25
    bm_ext: int
    r_days: int
    r_mins: int
    r_ticks: int
    name_area: bytes  # 32: name_len + diskname[30] + unused
    unused1: bytes  # 8 bytes at B-48
    v_days: int
    v_mins: int
    v_ticks: int
    c_days: int
    c_mins: int
    c_ticks: int
    next_hash: int
    parent_dir: int
    extension: int  # DCFS: first dircache block of the root
    sec_type: int

    @classmethod
    def unpack(cls, data: bytes) -> RootBlock:
        bsize = len(data)
        n = table_size(bsize)
        typ, key, high_seq, ht_size, first_data, chksum = struct.unpack_from(">6L", data, 0)
        ht = struct.unpack_from(f">{n}L", data, 24)
        tail = struct.unpack_from(">L25LL3L", data, bsize - 200)
        vd, vm, vt, cd, cm, ct = struct.unpack_from(">6L", data, bsize - 40)
        next_hash, parent_dir, extension, sec_type = struct.unpack_from(">3Ll", data, bsize - 16)
        return cls(
            bsize, typ, key, high_seq, ht_size, first_data, chksum, ht, tail[0],
            tuple(tail[1:26]), tail[26], tail[27], tail[28], tail[29],
            bytes(data[bsize - 80 : bsize - 48]), bytes(data[bsize - 48 : bsize - 40]),
            vd, vm, vt, cd, cm, ct, next_hash, parent_dir, extension, sec_type,
        )  # fmt: skip

    def pack(self) -> bytes:
        out = bytearray(self.block_size)
        struct.pack_into(
            ">6L", out, 0, self.type, self.header_key, self.high_seq, self.ht_size,
            self.first_data, self.chksum,
        )  # fmt: skip
        struct.pack_into(f">{len(self.ht)}L", out, 24, *self.ht)
        struct.pack_into(
            ">L25LL3L", out, self.block_size - 200, self.bm_flag, *self.bm_pages, self.bm_ext,
            self.r_days, self.r_mins, self.r_ticks,
        )  # fmt: skip
        out[self.block_size - 80 : self.block_size - 40] = self.name_area + self.unused1
        struct.pack_into(
            ">6L3Ll", out, self.block_size - 40, self.v_days, self.v_mins, self.v_ticks,
            self.c_days, self.c_mins, self.c_ticks, self.next_hash, self.parent_dir,
            self.extension, self.sec_type,
        )  # fmt: skip
        return bytes(out)

    def packed_with_checksum(self) -> bytes:
        return with_checksum(self.pack())

    @property
    def disk_name(self) -> bytes:
        return bcpl(self.name_area, MAX_NAME_STD)

    @property
    def root_date(self) -> DateStamp:
        return DateStamp(self.r_days, self.r_mins, self.r_ticks)

    @property
    def volume_date(self) -> DateStamp:
        return DateStamp(self.v_days, self.v_mins, self.v_ticks)

    @property
    def creation_date(self) -> DateStamp:
        return DateStamp(self.c_days, self.c_mins, self.c_ticks)


# --------------------------------------------------------------------------- entry blocks


_ENTRY_LAYOUTS: dict[tuple[int, bool], struct.Struct] = {}


def _entry_layout(block_size: int, lnfs: bool) -> struct.Struct:
    """Every field of a header block in one unpack, in disk order (see EntryBlock)."""
    layout = _ENTRY_LAYOUTS.get((block_size, lnfs))
    if layout is None:
        n = table_size(block_size)
        tail = "112sL8s3L" if lnfs else "92s3L32s"  # B-184 .. B-48
        layout = _ENTRY_LAYOUTS[(block_size, lnfs)] = struct.Struct(f">6L{n}LLHHLL{tail}3L20s3Ll")
    return layout


@dataclass(frozen=True)
class EntryBlock:
    """A T_HEADER block other than the root: user directory (ST_USERDIR), file header
    (ST_FILE), hard links (ST_LINKFILE/ST_LINKDIR) and soft links (ST_SOFTLINK).  They
    share one layout; ``table`` is the hash table of a directory, the data-block table of
    a file (stored last-to-first) or, for a soft link, the target path bytes.

    ``lnfs`` selects the DOS\\6/7 tail: ``name_comment`` (112 bytes at B-184: name then
    comment, both BCPL), ``comment_block`` at B-72, 8 reserved bytes, the date at B-60.
    The classic tail has ``comment_area`` (92 bytes at B-184: comm_len, comment[79],
    unused[12]), the date at B-92 and ``name_area`` (32 bytes at B-80).
    """

    block_size: int
    lnfs: bool
    type: int
    header_key: int
    high_seq: int
    data_size: int
    first_data: int
    chksum: int
    table: tuple[int, ...]
    unused1: int
    uid: int
    gid: int
    protect: int
    byte_size: int
    comment_area: bytes  # classic: 92 bytes; LNFS: the 112-byte name+comment field
    comment_block: int  # LNFS only (0 otherwise)
    lnfs_reserved: bytes  # LNFS: 8 bytes at B-68; classic: b""
    days: int
    mins: int
    ticks: int
    name_area: bytes  # classic: 32 bytes at B-80; LNFS: b""
    unused2: int  # B-48
    real_entry: int  # B-44 (hard links: the linked object's header)
    next_link: int  # B-40
    unused3: bytes  # 20 bytes at B-36
    hash_chain: int
    parent: int
    extension: int
    sec_type: int

    @classmethod
    def unpack(cls, data: bytes, lnfs: bool) -> EntryBlock:
        b = len(data)
        n = table_size(b)
        values = _entry_layout(b, lnfs).unpack_from(data)
        table = values[6 : 6 + n]
        f = values[6 + n :]
        obj = object.__new__(cls)  # as evolve(): listing a directory decodes thousands
        if lnfs:
            (unused1, uid, gid, protect, byte_size, comment_area, comment_block, lnfs_reserved, days, mins,
             ticks, unused2, real_entry, next_link, unused3, hash_chain, parent, extension, sec_type) = f
            name_area = b""
        else:
            (unused1, uid, gid, protect, byte_size, comment_area, days, mins, ticks, name_area, unused2,
             real_entry, next_link, unused3, hash_chain, parent, extension, sec_type) = f
            comment_block = 0
            lnfs_reserved = b""
        obj.__dict__.update(
            block_size=b, lnfs=lnfs, type=values[0], header_key=values[1], high_seq=values[2],
            data_size=values[3], first_data=values[4], chksum=values[5], table=table, unused1=unused1,
            uid=uid, gid=gid, protect=protect, byte_size=byte_size, comment_area=comment_area,
            comment_block=comment_block, lnfs_reserved=lnfs_reserved, days=days, mins=mins, ticks=ticks,
            name_area=name_area, unused2=unused2, real_entry=real_entry, next_link=next_link,
            unused3=unused3, hash_chain=hash_chain, parent=parent, extension=extension, sec_type=sec_type,
        )  # fmt: skip
        return obj

    def pack(self) -> bytes:
        b = self.block_size
        out = bytearray(b)
        struct.pack_into(
            ">6L", out, 0, self.type, self.header_key, self.high_seq, self.data_size,
            self.first_data, self.chksum,
        )  # fmt: skip
        struct.pack_into(f">{len(self.table)}L", out, 24, *self.table)
        struct.pack_into(">LHHLL", out, b - 200, self.unused1, self.uid, self.gid, self.protect, self.byte_size)
        if self.lnfs:
            out[b - 184 : b - 72] = self.comment_area
            struct.pack_into(">L", out, b - 72, self.comment_block)
            out[b - 68 : b - 60] = self.lnfs_reserved
            struct.pack_into(">3L", out, b - 60, self.days, self.mins, self.ticks)
        else:
            out[b - 184 : b - 92] = self.comment_area
            struct.pack_into(">3L", out, b - 92, self.days, self.mins, self.ticks)
            out[b - 80 : b - 48] = self.name_area
        struct.pack_into(">3L", out, b - 48, self.unused2, self.real_entry, self.next_link)
        out[b - 36 : b - 16] = self.unused3
        struct.pack_into(">3Ll", out, b - 16, self.hash_chain, self.parent, self.extension, self.sec_type)
        return bytes(out)

    def packed_with_checksum(self) -> bytes:
        return with_checksum(self.pack())

    # ------------------------------------------------------------------ decoded views
    @property
    def name(self) -> bytes:
        if self.lnfs:
            return bcpl(self.comment_area, MAX_NAME_LNFS)
        return bcpl(self.name_area, MAX_NAME_STD)

    @property
    def inline_comment(self) -> bytes:
        """The comment stored in the block itself (LNFS: after the name)."""
        if self.lnfs:
            start = 1 + min(self.comment_area[0], MAX_NAME_LNFS)
            return bcpl(self.comment_area[start:], MAX_COMMENT)
        return bcpl(self.comment_area, MAX_COMMENT)

    @property
    def date(self) -> DateStamp:
        return DateStamp(self.days, self.mins, self.ticks)

    @property
    def softlink_target(self) -> bytes:
        raw = struct.pack(f">{len(self.table)}L", *self.table)
        end = raw.find(b"\0")
        return raw if end < 0 else raw[:end]

    def with_name_comment(self, name: bytes, comment: bytes, comment_block: int = 0) -> EntryBlock:
        """Set name and inline comment (LNFS: with ``comment_block`` when not inline)."""
        if self.lnfs:
            field = bytes([len(name)]) + name + bytes([len(comment)]) + comment
            return evolve(
                self, comment_area=field.ljust(LNFS_NAME_COMMENT_BYTES, b"\0"), comment_block=comment_block
            )
        return evolve(
            self,
            name_area=make_bcpl(name, 32),
            comment_area=make_bcpl(comment, 92),
        )

    def with_date(self, date: DateStamp) -> EntryBlock:
        return evolve(self, days=date.days, mins=date.minutes, ticks=date.ticks)

    @classmethod
    def new(
        cls, block_size: int, lnfs: bool, *, header_key: int, sec_type: int, parent: int,
        name: bytes, date: DateStamp, protect: int = 0,
    ) -> EntryBlock:  # fmt: skip
        """A new header named ``name`` (no comment).  Built as :meth:`unpack` builds
        (``__dict__`` filled at once, no frozen ``__init__``: every create makes one);
        the fields are those the dataclass constructor would set (tested)."""
        if lnfs:
            comment_area = (bytes([len(name)]) + name + b"\0").ljust(LNFS_NAME_COMMENT_BYTES, b"\0")
            name_area, lnfs_reserved = b"", bytes(8)
        else:
            comment_area, name_area, lnfs_reserved = bytes(92), make_bcpl(name, 32), b""
        obj = object.__new__(cls)
        obj.__dict__.update(
            block_size=block_size, lnfs=lnfs, type=T_HEADER, header_key=header_key, high_seq=0,
            data_size=0, first_data=0, chksum=0, table=(0,) * table_size(block_size), unused1=0,
            uid=0, gid=0, protect=protect, byte_size=0, comment_area=comment_area, comment_block=0,
            lnfs_reserved=lnfs_reserved, days=date.days, mins=date.minutes, ticks=date.ticks,
            name_area=name_area, unused2=0, real_entry=0, next_link=0, unused3=bytes(20),
            hash_chain=0, parent=parent, extension=0, sec_type=sec_type,
        )  # fmt: skip
        return obj


def lnfs_comment_fits(name: bytes, comment: bytes) -> bool:
    """Whether an LNFS name and comment fit the shared 112-byte field together."""
    return 2 + len(name) + len(comment) <= LNFS_NAME_COMMENT_BYTES


def softlink_table(target: bytes, block_size: int) -> tuple[int, ...]:
    n = table_size(block_size)
    if len(target) + 1 > n * 4:
        raise ValueError("soft link target too long for one block")
    raw = target.ljust(n * 4, b"\0")
    return struct.unpack(f">{n}L", raw)


# --------------------------------------------------------------------------- runs


MAX_RUN_BLOCKS = 2048  # longest single device request when coalescing data blocks


def runs(blocks: Iterable[int], limit: int = MAX_RUN_BLOCKS) -> list[tuple[int, int]]:
    """Coalesce block numbers into (start, count) runs of consecutive blocks, each at
    most ``limit`` long."""
    seq = blocks if isinstance(blocks, list) else list(blocks)
    found: list[tuple[int, int]] = []
    _runs_into(seq, 0, len(seq), found)
    out: list[tuple[int, int]] = []
    for start, count in found:
        while count > limit:
            out.append((start, limit))
            start += limit
            count -= limit
        out.append((start, count))
    return out


def _runs_into(seq: list[int], lo: int, hi: int, out: list[tuple[int, int]]) -> None:
    """Runs of ``seq[lo:hi]`` appended to ``out`` (merged with its last run when they
    touch).  From each position a candidate run is found by galloping on its end points
    (O(log n) steps), then checked whole against a range in C; a candidate that fails
    the check (blocks out of order inside it) is walked block by block.  A long file
    costs O(runs * log n) Python steps and one C comparison per block."""
    i = lo
    while i < hi:
        first = seq[i]
        # gallop: grow the span while its last block is where a run would put it
        good = i + 1  # seq[i:good] passes the end-point test
        step = 1
        while good < hi:
            probe = min(i + step * 2, hi)
            if seq[probe - 1] - first != probe - 1 - i:
                break
            good = probe
            step *= 2
        else:
            probe = hi
        # binary search between good (passes) and probe (fails, or hi)
        bad = probe if good < hi else hi
        while bad - good > 1:
            mid = (good + bad) // 2
            if seq[mid - 1] - first == mid - 1 - i:
                good = mid
            else:
                bad = mid
        end = good
        if end - i >= 3 and seq[i:end] != list(range(first, first + end - i)):
            end = i + 1  # out of order inside: walk it
            while end < hi and seq[end] == seq[end - 1] + 1:
                end += 1
        if out and out[-1][0] + out[-1][1] == first:
            out[-1] = (out[-1][0], out[-1][1] + end - i)
        else:
            out.append((first, end - i))
        i = end


EXT_RESERVED_BYTES = 188  # between the table and the tail of a T_LIST block (any size)
_RUN_CONSTANTS: dict[int, tuple[int, int]] = {}
_EXT_LAYOUTS: dict[int, struct.Struct] = {}


def _run_constants(count: int) -> tuple[int, int]:
    """(G, H) shifted past the reserved area: G = sum of 2**(32j), H = sum of
    j * 2**(32j) for j < count, both times 2**(8 * EXT_RESERVED_BYTES).  A T_LIST block
    whose table ends in ``count`` longs v+count-1 .. v+1, v (as FFS stores data blocks
    v..v+count-1), with zeros before them and in the reserved area, reads from the
    table's start to the tail as the big-endian integer v*G + H."""
    consts = _RUN_CONSTANTS.get(count)
    if consts is None:
        shift = 8 * EXT_RESERVED_BYTES
        g = int.from_bytes(b"\0\0\0\1" * count, "big") << shift
        h = int.from_bytes(struct.pack(f">{count}L", *range(count - 1, -1, -1)), "big") << shift
        consts = (g, h)
        if len(_RUN_CONSTANTS) < 16:  # full tables of the few block sizes in use
            _RUN_CONSTANTS[count] = consts
    return consts


def _ext_layout(block_size: int) -> struct.Struct:
    """The longs the read path needs from a T_LIST block, in one unpack: the six header
    longs, table[n-1] (data block 0 of this table), parent, extension, sec_type."""
    layout = _EXT_LAYOUTS.get(block_size)
    if layout is None:
        n = table_size(block_size)
        layout = _EXT_LAYOUTS[block_size] = struct.Struct(f">6L{4 * (n - 1)}xL{EXT_RESERVED_BYTES}x3L")
    return layout


def scan_ext_chain(
    raw: bytes, raw_first: int, block_size: int, ext: int, found: list[tuple[int, int]],
    seen: set[int], max_chain: int, skip: Container[int],
) -> tuple[int, int, int]:  # fmt: skip
    """Follow a file's extension-block chain from block ``ext`` through the blocks held
    in ``raw`` (volume blocks ``raw_first, raw_first+1, ...``), appending the data runs
    of each table, in file order, to ``found`` as ``(first block, count)`` (merged with
    the last run when they touch).  Stops at the end of the chain, or before a block
    that ``raw`` does not hold or that is in ``skip`` (the caller's cache: it takes
    that block from there).  Returns ``(next block to visit or 0, data blocks listed,
    the last block visited or 0)``.

    Each block is checked as the read path's ``_ext`` does: checksum (ChecksumError),
    type T_LIST, its own number in header_key and high_seq within the table
    (CorruptError); a block seen before, or more than ``max_chain`` blocks in ``seen``
    (which collects the chain across calls), raises ChainLoopError.

    Gives what ``FileExtBlock.unpack_summed`` and :func:`runs` of the reversed tables
    give (tested against them), without a Python int per long: a block whose table
    lists consecutive blocks and whose unused longs are zero (what writers produce for
    unfragmented files) is recognised with one big-integer comparison (see
    :func:`_run_constants`) and its checksum summed in closed form.  Other blocks are
    unpacked long by long.  Pure, no I/O."""
    n = table_size(block_size)
    held = len(raw) // block_size
    layout = _ext_layout(block_size).unpack_from
    full_g, full_h = _run_constants(n)
    listed = last = 0
    run_start, run_count = found.pop() if found else (0, 0)
    from_bytes = int.from_bytes
    while ext:
        index = ext - raw_first
        if not 0 <= index < held or ext in skip:
            break
        if ext in seen or len(seen) > max_chain:
            raise ChainLoopError("extension chain loops", block=ext, field="extension")
        seen.add(ext)
        offset = index * block_size
        typ, key, high_seq, data_size, first_data, chksum, first, parent, nxt, sec_type = layout(raw, offset)
        total = typ + key + high_seq + data_size + first_data + chksum + parent + nxt + sec_type
        body = from_bytes(raw[offset + 24 : offset + block_size - 12], "big")  # table + reserved
        if high_seq == n:
            g, h = full_g, full_h
        elif 0 < high_seq < n:
            g, h = _run_constants(high_seq)
        else:
            g = h = 0
        if high_seq <= n and first + high_seq <= 1 << 32 and body == (first * g + h if high_seq else 0):
            total += high_seq * first + high_seq * (high_seq - 1) // 2
            chunk = [(first, high_seq)] if high_seq else []
        else:
            longs = struct.unpack_from(f">{block_size // 4}L", raw, offset)
            total = sum(longs)
            hs = min(high_seq, n)
            chunk = runs(longs[5 + n : 5 + n - hs : -1], limit=1 << 62) if hs else []
        if total & 0xFFFFFFFF:
            raise ChecksumError("block checksum does not verify", block=ext, field="chksum")
        if typ != T_LIST or key != ext or high_seq > n:
            raise CorruptError("bad file extension block", block=ext, field="type/header_key/high_seq")
        for start, count in chunk:
            if run_start + run_count == start and run_count:
                run_count += count
            else:
                if run_count:
                    found.append((run_start, run_count))
                run_start, run_count = start, count
        listed += high_seq
        last = ext
        ext = nxt
    if run_count:
        found.append((run_start, run_count))
    return ext, listed, last


# --------------------------------------------------------------------------- file extension


@dataclass(frozen=True)
class FileExtBlock:
    """T_LIST / ST_FILE: more data-block pointers of a file (table stored last-to-first)."""

    block_size: int
    type: int
    header_key: int
    high_seq: int
    data_size: int
    first_data: int
    chksum: int
    table: tuple[int, ...]
    unused: bytes  # B-200 .. B-12 (info and hash_chain unused)
    parent: int  # the file header
    extension: int  # next extension block or 0
    sec_type: int

    @classmethod
    def unpack(cls, data: bytes) -> FileExtBlock:
        return cls.unpack_summed(data)[0]

    @classmethod
    def unpack_summed(cls, data: bytes) -> tuple[FileExtBlock, int]:
        """The block and the sum of its longs (0 when the checksum verifies), from one
        unpack of the whole block: a 64 MiB file has ~1,800 of these to read."""
        b = len(data)
        n = table_size(b)
        longs = struct.unpack(f">{b // 4}L", data)
        typ, key, high_seq, data_size, first_data, chksum = longs[:6]
        sec_type = longs[-1] - (1 << 32) if longs[-1] & 0x80000000 else longs[-1]
        block = cls(
            b, typ, key, high_seq, data_size, first_data, chksum, longs[6 : 6 + n],
            bytes(data[b - 200 : b - 12]), longs[-3], longs[-2], sec_type,
        )  # fmt: skip
        return block, sum(longs) & 0xFFFFFFFF

    @classmethod
    def unpack_run(cls, data: bytes | bytearray | memoryview, block_size: int) -> list[tuple[FileExtBlock, int] | None]:
        """Each ``block_size`` block of ``data`` (consecutive blocks read in one request)
        as ``(block, sum of its longs mod 2**32)`` like :meth:`unpack_summed`, or None
        where the block's type long is not T_LIST (a data block, say: not decoded).

        One ``struct.unpack`` for the whole run and objects built without re-running
        ``__init__`` (as :func:`evolve` does): a 64 MiB file has ~1,800 of these blocks,
        and this is what reading it cold costs.  Raises ValueError if ``len(data)`` is not
        a multiple of ``block_size``."""
        if len(data) % block_size:
            raise ValueError(f"{len(data)} bytes is not whole {block_size}-byte blocks")
        per = block_size // 4
        n = table_size(block_size)
        longs = struct.unpack(f">{len(data) // 4}L", data)
        raw = bytes(data)
        out: list[tuple[FileExtBlock, int] | None] = []
        new = object.__new__
        for base in range(0, len(longs), per):
            if longs[base] != T_LIST:
                out.append(None)
                continue
            end = base + per
            sec = longs[end - 1]
            obj = new(cls)
            offset = base * 4
            obj.__dict__.update(
                block_size=block_size, type=T_LIST, header_key=longs[base + 1], high_seq=longs[base + 2],
                data_size=longs[base + 3], first_data=longs[base + 4], chksum=longs[base + 5],
                table=longs[base + 6 : base + 6 + n], unused=raw[offset + block_size - 200 : offset + block_size - 12],
                parent=longs[end - 3], extension=longs[end - 2],
                sec_type=sec - (1 << 32) if sec & 0x80000000 else sec,
            )  # fmt: skip
            out.append((obj, sum(longs[base:end]) & 0xFFFFFFFF))
        return out

    def pack(self) -> bytes:
        b = self.block_size
        out = bytearray(b)
        struct.pack_into(
            ">6L", out, 0, self.type, self.header_key, self.high_seq, self.data_size,
            self.first_data, self.chksum,
        )  # fmt: skip
        struct.pack_into(f">{len(self.table)}L", out, 24, *self.table)
        out[b - 200 : b - 12] = self.unused
        struct.pack_into(">2Ll", out, b - 12, self.parent, self.extension, self.sec_type)
        return bytes(out)

    def packed_with_checksum(self) -> bytes:
        return with_checksum(self.pack())

    @classmethod
    def new(cls, block_size: int, header_key: int, parent: int) -> FileExtBlock:
        return cls(
            block_size, T_LIST, header_key, 0, 0, 0, 0, (0,) * table_size(block_size),
            bytes(188), parent, 0, ST_FILE,
        )  # fmt: skip


# --------------------------------------------------------------------------- OFS data


@dataclass(frozen=True)
class OfsDataBlock:
    """T_DATA: an OFS data block, 24-byte header then ``B - 24`` bytes of data."""

    type: int
    header_key: int  # the file header
    seq_num: int  # 1-based
    data_size: int
    next_data: int
    chksum: int
    data: bytes

    @classmethod
    def unpack(cls, data: bytes) -> OfsDataBlock:
        typ, key, seq_num, data_size, next_data, chksum = struct.unpack_from(">6L", data, 0)
        return cls(typ, key, seq_num, data_size, next_data, chksum, bytes(data[24:]))

    def pack(self) -> bytes:
        return (
            struct.pack(
                ">6L", self.type, self.header_key, self.seq_num, self.data_size,
                self.next_data, self.chksum,
            )
            + self.data
        )  # fmt: skip

    def packed_with_checksum(self) -> bytes:
        return with_checksum(self.pack())


def first_bad_ofs_block(raw: bytes | bytearray | memoryview, block_size: int, header_key: int) -> int:
    """Index of the first block of ``raw`` (OFS data blocks read in one request) that is
    not a T_DATA block of file ``header_key`` with a good checksum, or -1 when all are.
    The same verdict as :class:`OfsDataBlock` plus :func:`verify_checksum` per block
    (tested against them), from one array of the whole run.  Pure."""
    per = block_size // 4
    longs = array("I", raw)  # C integers, not a Python int per long (a MiB at a time)
    if sys.byteorder == "little":
        longs.byteswap()
    for index, base in enumerate(range(0, len(longs), per)):
        if longs[base] != T_DATA or longs[base + 1] != header_key or sum(longs[base : base + per]) & 0xFFFFFFFF:
            return index
    return -1


# --------------------------------------------------------------------------- bitmaps


@dataclass(frozen=True)
class BitmapBlock:
    """A bitmap block: checksum at 0, then ``B/4 - 1`` longs; a set bit is a free block."""

    chksum: int
    map: bytes  # raw big-endian longs

    @classmethod
    def unpack(cls, data: bytes) -> BitmapBlock:
        return cls(struct.unpack_from(">L", data)[0], bytes(data[4:]))

    def pack(self) -> bytes:
        return struct.pack(">L", self.chksum) + self.map

    @classmethod
    def with_map(cls, map_bytes: bytes) -> BitmapBlock:
        return cls((-sum_longs(map_bytes)) & 0xFFFFFFFF, map_bytes)


@dataclass(frozen=True)
class BitmapExtBlock:
    """A bitmap extension block: ``B/4 - 1`` bitmap block pointers, then the next one."""

    bm_pages: tuple[int, ...]
    bm_ext: int

    @classmethod
    def unpack(cls, data: bytes) -> BitmapExtBlock:
        n = len(data) // 4
        longs = struct.unpack(f">{n}L", data)
        return cls(tuple(longs[:-1]), longs[-1])

    def pack(self) -> bytes:
        return struct.pack(f">{len(self.bm_pages) + 1}L", *self.bm_pages, self.bm_ext)


# --------------------------------------------------------------------------- dircache


@dataclass(frozen=True)
class DirCacheRecord:
    """One object in a dircache block (DCFS)."""

    header: int
    size: int
    protect: int
    uid: int
    gid: int
    days: int
    mins: int
    ticks: int
    type: int  # secondary type, signed byte
    name: bytes
    comment: bytes

    FIXED = 24

    @property
    def packed_size(self) -> int:
        n = self.FIXED + len(self.name) + 1 + len(self.comment)
        return n + (n & 1)

    def pack(self) -> bytes:
        raw = (
            struct.pack(
                ">3L5HbB", self.header, self.size, self.protect, self.uid, self.gid,
                self.days, self.mins, self.ticks, self.type, len(self.name),
            )
            + self.name + bytes([len(self.comment)]) + self.comment
        )  # fmt: skip
        return raw + b"\0" * (len(raw) & 1)

    @classmethod
    def unpack_from(cls, data: bytes, offset: int) -> tuple[DirCacheRecord, int]:
        """The record at ``offset`` and the offset after it.  Raises ValueError if it overruns."""
        if offset + cls.FIXED > len(data):
            raise ValueError("dircache record overruns its block")
        header, size, protect, uid, gid, days, mins, ticks, typ, nlen = struct.unpack_from(
            ">3L5HbB", data, offset
        )
        pos = offset + cls.FIXED
        if pos + nlen + 1 > len(data):
            raise ValueError("dircache record name overruns its block")
        name = bytes(data[pos : pos + nlen])
        clen = data[pos + nlen]
        cstart = pos + nlen + 1
        if cstart + clen > len(data):
            raise ValueError("dircache record comment overruns its block")
        comment = bytes(data[cstart : cstart + clen])
        end = cstart + clen
        end += end & 1
        return cls(header, size, protect, uid, gid, days, mins, ticks, typ, name, comment), end


@dataclass(frozen=True)
class DirCacheBlock:
    """T_DIRCACHE (33): records of one directory's objects; chained by ``next_dirc``."""

    type: int
    header_key: int
    parent: int
    records_nb: int
    next_dirc: int
    chksum: int
    records: bytes  # B - 24 bytes: the packed records, then whatever follows

    @classmethod
    def unpack(cls, data: bytes) -> DirCacheBlock:
        typ, key, parent, records_nb, next_dirc, chksum = struct.unpack_from(">6L", data, 0)
        return cls(typ, key, parent, records_nb, next_dirc, chksum, bytes(data[24:]))

    def pack(self) -> bytes:
        return (
            struct.pack(
                ">6L", self.type, self.header_key, self.parent, self.records_nb,
                self.next_dirc, self.chksum,
            )
            + self.records
        )  # fmt: skip

    def packed_with_checksum(self) -> bytes:
        return with_checksum(self.pack())

    def decode_records(self) -> list[DirCacheRecord]:
        """The ``records_nb`` records.  Raises ValueError if they overrun the block."""
        out = []
        offset = 0
        for _ in range(self.records_nb):
            rec, offset = DirCacheRecord.unpack_from(self.records, offset)
            out.append(rec)
        return out

    @classmethod
    def build(
        cls, block_size: int, header_key: int, parent: int, next_dirc: int,
        records: list[DirCacheRecord],
    ) -> DirCacheBlock:  # fmt: skip
        raw = b"".join(r.pack() for r in records)
        if len(raw) > block_size - 24:
            raise ValueError("dircache records do not fit the block")
        return cls(T_DIRCACHE, header_key, parent, len(records), next_dirc, 0, raw.ljust(block_size - 24, b"\0"))


# --------------------------------------------------------------------------- comment block


@dataclass(frozen=True)
class CommentBlock:
    """T_COMMENT (64), LNFS: a comment too long to share the name field."""

    type: int
    header_key: int
    owner: int  # the header block whose comment this is
    unused: bytes  # 8 bytes at 12
    chksum: int
    comment_area: bytes  # B - 24 bytes: BCPL comment then padding

    @classmethod
    def unpack(cls, data: bytes) -> CommentBlock:
        typ, key, owner = struct.unpack_from(">3L", data, 0)
        (chk,) = struct.unpack_from(">L", data, 20)
        return cls(typ, key, owner, bytes(data[12:20]), chk, bytes(data[24:]))

    def pack(self) -> bytes:
        return (
            struct.pack(">3L", self.type, self.header_key, self.owner) + self.unused
            + struct.pack(">L", self.chksum) + self.comment_area
        )  # fmt: skip

    def packed_with_checksum(self) -> bytes:
        return with_checksum(self.pack())

    @property
    def comment(self) -> bytes:
        return bcpl(self.comment_area, MAX_COMMENT)

    @classmethod
    def new(cls, block_size: int, header_key: int, owner: int, comment: bytes) -> CommentBlock:
        return cls(T_COMMENT, header_key, owner, bytes(8), 0, make_bcpl(comment, block_size - 24))


def dostype_flags(dostype: int) -> tuple[bool, bool, bool, bool]:
    """(ffs, intl, dircache, lnfs) for DOS\\0..7."""
    n = dostype & 0xFF
    ffs = bool(n & 1)
    dircache = n in (4, 5)
    lnfs = n in (6, 7)
    intl = n >= 2
    return ffs, intl, dircache, lnfs
