"""SmartFilesystem on-disk records: one codec (struct + frozen dataclass) per block type.

Field names follow John Hendrikx's SFS sources (``blockstructure.h``, ``objects.h``,
``nodes.h``, ``btreenodes.h``, ``bitmap.h``, ``adminspaces.h``, ``transactions.h``).
Every codec keeps every byte (reserved fields, padding, the unused tail of a block) so
``pack(unpack(b)) == b``.  The codecs are pure: no I/O.

SFS\\2 differs from SFS\\0 in three places (see docs/sfs.md for the evidence):

* ``fsObject``'s file/dir union is 10 bytes instead of 8: files have a 48-bit size
  (a UWORD of high bits before the ULONG), directories a 2-byte pad after
  ``firstdirblock``;
* ``fsExtentBNode.blocks`` is a ULONG (node size 16 instead of 14);
* node-index pointers are ``block << 1`` (plus the full bit) instead of
  ``block << shifts_block32``.

Every block except data blocks starts with ``fsBlockHeader`` (id, checksum, ownblock).
The checksum makes ``1 + sum of all longs == 0`` (mod 2**32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from amigafuse.errors import ChecksumError, CorruptError

_R = TypeVar("_R")


def fast_replace(record: _R, **changes: Any) -> _R:
    """``dataclasses.replace`` for the frozen records without ``__post_init__`` (the
    parsed containers the writer keeps up to date on every change), without its
    generic machinery.  The caller passes only field names of ``record``."""
    cls = type(record)
    if "__post_init__" in cls.__dict__:
        raise TypeError(f"{cls.__name__} derives fields in __post_init__; use dataclasses.replace")
    new = object.__new__(cls)
    values = new.__dict__
    values.update(record.__dict__)
    values.update(changes)
    return new


def make_id(text: str) -> int:
    return int.from_bytes(text.encode("latin-1"), "big")


ROOT_ID_SFS0 = make_id("SFS\0")
ROOT_ID_SFS2 = make_id("SFS\2")
OBJECTCONTAINER_ID = make_id("OBJC")
HASHTABLE_ID = make_id("HTAB")
SOFTLINK_ID = make_id("SLNK")
NODECONTAINER_ID = make_id("NDC ")
BNODECONTAINER_ID = make_id("BNDC")
BITMAP_ID = make_id("BTMP")
ADMINSPACECONTAINER_ID = make_id("ADMC")
TRANSACTIONSTORAGE_ID = make_id("TRST")
TRANSACTIONFAILURE_ID = make_id("TRFA")
TRANSACTIONOK_ID = make_id("TROK")
# Our own journal (not the handler's compressed TRST format; see docs/sfs.md).
JOURNAL_HEADER_ID = make_id("AFJH")
JOURNAL_DATA_ID = make_id("AFJD")  # a journal record listing file data blocks

ROOTBITS_CASESENSITIVE = 0x80
ROOTBITS_RECYCLED = 0x40

OTYPE_HIDDEN = 1
OTYPE_UNDELETABLE = 2
OTYPE_QUICKDIR = 4
OTYPE_RINGLIST = 8
OTYPE_HARDLINK = 32
OTYPE_LINK = 64
OTYPE_DIR = 128

ROOTNODE = 1
RECYCLEDNODE = 2

BLOCKHEADER_SIZE = 12
ROOTINFO_SIZE = 36
OBJECTCONTAINER_HEADER = 24
NODECONTAINER_HEADER = 20
OBJECTNODE_SIZE = 10
BNODECONTAINER_HEADER = 16
ADMINSPACECONTAINER_HEADER = 24
SOFTLINK_HEADER = 24
HASHTABLE_HEADER = 16
STRUCTURE_VERSION_SFS0 = 3
STRUCTURE_VERSION_SFS2 = 4


def block_id_str(value: int) -> str:
    raw = struct.pack(">I", value & 0xFFFFFFFF)
    return raw.decode("latin-1").encode("unicode_escape").decode("ascii")


# --------------------------------------------------------------------------- checksums


def _bias(sfs2: bool) -> int:
    # SFS\0: 1 + sum of longs == 0.  SFS\2 (1.277): 2 + sum of longs == 0.
    return 2 if sfs2 else 1


def checksum_of(block: bytes | bytearray | memoryview, sfs2: bool = False) -> int:
    """The value the checksum field (bytes 4..7) must hold for ``block``."""
    longs = struct.unpack(f">{len(block) // 4}I", block)
    total: int = (sum(longs) - longs[1] + _bias(sfs2)) & 0xFFFFFFFF
    return (-total) & 0xFFFFFFFF


def checksum_ok(block: bytes | bytearray | memoryview, sfs2: bool = False) -> bool:
    longs = struct.unpack(f">{len(block) // 4}I", block)
    total: int = sum(longs) + _bias(sfs2)
    return total & 0xFFFFFFFF == 0


def set_checksum(block: bytearray, sfs2: bool = False) -> None:
    struct.pack_into(">I", block, 4, checksum_of(block, sfs2))


def finish_block(block: bytearray, block_id: int, ownblock: int, sfs2: bool = False) -> bytearray:
    """Write the header's id, ownblock and checksum into ``block`` (in place)."""
    struct.pack_into(">III", block, 0, block_id, 0, ownblock)
    set_checksum(block, sfs2)
    return block


def check_block(data: bytes, block: int, expect_id: int, sfs2: bool = False, *, checksum: bool = True) -> None:
    """Raise unless ``data`` is a block of type ``expect_id`` stored at ``block``
    (``checksum=False``: blocks being built in memory, checksummed at commit)."""
    block_id, _, ownblock = struct.unpack_from(">III", data, 0)
    if block_id != expect_id:
        raise CorruptError(
            f"expected a {block_id_str(expect_id)} block, found id {block_id_str(block_id)!r}",
            block=block,
            field="id",
        )
    if checksum and not checksum_ok(data, sfs2):
        raise ChecksumError(f"{block_id_str(expect_id)} block checksum is wrong", block=block, field="checksum")
    if ownblock != block:
        raise CorruptError(
            f"{block_id_str(expect_id)} block claims to be block {ownblock}", block=block, field="ownblock"
        )


@dataclass(frozen=True)
class BlockHeader:
    id: int
    checksum: int
    ownblock: int

    FORMAT = ">III"

    @classmethod
    def unpack(cls, data: bytes) -> BlockHeader:
        return cls(*struct.unpack_from(cls.FORMAT, data, 0))

    def pack(self) -> bytes:
        return struct.pack(self.FORMAT, self.id, self.checksum, self.ownblock)


# --------------------------------------------------------------------------- root block


@dataclass(frozen=True)
class RootBlock:
    """``fsRootBlock`` (at block 0 and at the last block of the partition)."""

    id: int
    checksum: int
    ownblock: int
    version: int
    sequencenumber: int
    datecreated: int
    bits: int
    pad1: int
    pad2: int
    reserved1: bytes
    firstbyteh: int
    firstbyte: int
    lastbyteh: int
    lastbyte: int
    totalblocks: int
    blocksize: int
    reserved2: bytes
    reserved3: bytes
    bitmapbase: int
    adminspacecontainer: int
    rootobjectcontainer: int
    extentbnoderoot: int
    objectnoderoot: int
    reserved4: bytes
    tail: bytes

    FORMAT = ">IIIHHIBBH8sIIIIII8s32sIIIII12s"
    SIZE = struct.calcsize(FORMAT)  # 128

    @classmethod
    def unpack(cls, data: bytes) -> RootBlock:
        v = struct.unpack_from(cls.FORMAT, data, 0)
        return cls(
            v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12],
            v[13], v[14], v[15], v[16], v[17], v[18], v[19], v[20], v[21], v[22], v[23],
            bytes(data[cls.SIZE :]),
        )  # fmt: skip

    def pack(self) -> bytes:
        return (
            struct.pack(
                self.FORMAT,
                self.id, self.checksum, self.ownblock, self.version, self.sequencenumber,
                self.datecreated, self.bits, self.pad1, self.pad2, self.reserved1,
                self.firstbyteh, self.firstbyte, self.lastbyteh, self.lastbyte,
                self.totalblocks, self.blocksize, self.reserved2, self.reserved3,
                self.bitmapbase, self.adminspacecontainer, self.rootobjectcontainer,
                self.extentbnoderoot, self.objectnoderoot, self.reserved4,
            )
            + self.tail
        )  # fmt: skip

    @property
    def sfs2(self) -> bool:
        return self.id == ROOT_ID_SFS2

    @property
    def case_sensitive(self) -> bool:
        return bool(self.bits & ROOTBITS_CASESENSITIVE)

    @property
    def recycled(self) -> bool:
        return bool(self.bits & ROOTBITS_RECYCLED)


@dataclass(frozen=True)
class RootInfo:
    """``fsRootInfo``: the last 36 bytes of the root ObjectContainer."""

    deletedblocks: int
    deletedfiles: int
    freeblocks: int
    datecreated: int
    lastallocatedblock: int
    lastallocatedadminspace: int
    lastallocatedextentnode: int
    lastallocatedobjectnode: int
    rovingpointer: int

    FORMAT = ">9I"

    @classmethod
    def unpack(cls, data: bytes) -> RootInfo:
        return cls(*struct.unpack(cls.FORMAT, data))

    def pack(self) -> bytes:
        return struct.pack(
            self.FORMAT, self.deletedblocks, self.deletedfiles, self.freeblocks,
            self.datecreated, self.lastallocatedblock, self.lastallocatedadminspace,
            self.lastallocatedextentnode, self.lastallocatedobjectnode, self.rovingpointer,
        )  # fmt: skip


# --------------------------------------------------------------------------- objects


def object_fixed_size(sfs2: bool) -> int:
    """Bytes of ``fsObject`` before the name (25 or 27)."""
    return 27 if sfs2 else 25


def object_sizeof(sfs2: bool) -> int:
    """``sizeof(struct fsObject)`` as the m68k compiler pads it (26 or 28)."""
    return 28 if sfs2 else 26


@dataclass(frozen=True)
class SfsObject:
    """``fsObject``.  ``data``/``size`` are the union: for files the first data block
    and the byte size; for directories ``data`` is the hash table block and
    ``firstdirblock`` the first ObjectContainer.  In SFS\\2 ``size`` holds all six
    bytes of the union's second half (48-bit file size; for directories
    ``firstdirblock << 16 | pad``)."""

    owneruid: int
    ownergid: int
    objectnode: int
    protection: int
    data: int
    size: int
    datemodified: int
    bits: int
    name: bytes
    comment: bytes
    sfs2: bool = False
    pad: bytes = field(default=b"", compare=False)  # the odd-length filler byte
    packed_size: int = field(init=False, compare=False, repr=False)  # bytes it takes, padded

    def __post_init__(self) -> None:
        n = (25 if not self.sfs2 else 27) + len(self.name) + len(self.comment) + 2
        object.__setattr__(self, "packed_size", n + (n & 1))

    def evolve(self, **changes: Any) -> SfsObject:
        """A copy with ``changes`` applied (``dataclasses.replace`` without its generic
        machinery: the hot path of every write).  TypeError for an unknown field."""
        if not changes.keys() <= _SFSOBJECT_FIELDS:
            raise TypeError(f"SfsObject has no field(s) {sorted(changes.keys() - _SFSOBJECT_FIELDS)}")
        new = object.__new__(SfsObject)
        values = new.__dict__
        values.update(self.__dict__)
        values.update(changes)
        n = (25 if not new.sfs2 else 27) + len(new.name) + len(new.comment) + 2
        values["packed_size"] = n + (n & 1)
        return new

    @classmethod
    def unpack_from(cls, block: bytes, offset: int, sfs2: bool, block_no: int = 0) -> SfsObject:
        """Decode the object at ``offset``; raises CorruptError if its strings overrun."""
        if sfs2:
            uid, gid, node, prot, data, sizeh, sizel, date, bits = struct.unpack_from(
                ">HHIIIHIIB", block, offset
            )
            size = (sizeh << 32) | sizel
        else:
            uid, gid, node, prot, data, size, date, bits = struct.unpack_from(">HHIIIIIB", block, offset)
        pos = offset + object_fixed_size(sfs2)
        end_name = block.find(b"\0", pos)
        end_comment = block.find(b"\0", end_name + 1) if end_name >= 0 else -1
        if end_name < 0 or end_comment < 0:
            raise CorruptError("object name or comment runs past the block end", block=block_no, field="name")
        name = bytes(block[pos:end_name])
        comment = bytes(block[end_name + 1 : end_comment])
        nxt = end_comment + 1
        pad = bytes(block[nxt : nxt + 1]) if nxt & 1 else b""
        return cls(uid, gid, node, prot, data, size, date, bits, name, comment, sfs2, pad)

    def pack(self) -> bytes:
        if self.sfs2:
            head = struct.pack(
                ">HHIIIHIIB", self.owneruid, self.ownergid, self.objectnode, self.protection,
                self.data, (self.size >> 32) & 0xFFFF, self.size & 0xFFFFFFFF,
                self.datemodified, self.bits,
            )  # fmt: skip
        else:
            head = struct.pack(
                ">HHIIIIIB", self.owneruid, self.ownergid, self.objectnode, self.protection,
                self.data, self.size, self.datemodified, self.bits,
            )  # fmt: skip
        body = head + self.name + b"\0" + self.comment + b"\0"
        if len(body) & 1:
            body += self.pad or b"\0"
        return body

    @property
    def is_dir(self) -> bool:
        return bool(self.bits & OTYPE_DIR)

    @property
    def is_softlink(self) -> bool:
        return bool(self.bits & OTYPE_LINK) and not self.bits & OTYPE_HARDLINK

    @property
    def is_hardlink(self) -> bool:
        return bool(self.bits & OTYPE_HARDLINK)

    @property
    def hashtable(self) -> int:
        return self.data

    @property
    def firstdirblock(self) -> int:
        return self.size >> 16 if self.sfs2 else self.size

    @staticmethod
    def dir_size_field(firstdirblock: int, sfs2: bool) -> int:
        return firstdirblock << 16 if sfs2 else firstdirblock


_SFSOBJECT_FIELDS = frozenset(f.name for f in fields(SfsObject) if f.init)


@dataclass(frozen=True)
class ObjectContainer:
    """``fsObjectContainer``: objects of one directory; ``tail`` is every byte after them."""

    id: int
    checksum: int
    ownblock: int
    parent: int
    next: int
    previous: int
    objects: tuple[SfsObject, ...]
    tail: bytes
    sfs2: bool = False
    used: int = field(default=0, compare=False)  # bytes taken by the header and objects

    @classmethod
    def unpack(cls, data: bytes, sfs2: bool) -> ObjectContainer:
        block_id, checksum, own, parent, nxt, prev = struct.unpack_from(">IIIIII", data, 0)
        objects = []
        offset = OBJECTCONTAINER_HEADER
        limit = len(data) - object_sizeof(sfs2) - 2
        name_at = object_fixed_size(sfs2)
        while offset < limit and data[offset + name_at] != 0:
            obj = SfsObject.unpack_from(data, offset, sfs2, own)
            objects.append(obj)
            offset += obj.packed_size
        return cls(block_id, checksum, own, parent, nxt, prev, tuple(objects), bytes(data[offset:]), sfs2, offset)

    def pack(self) -> bytes:
        head = struct.pack(">IIIIII", self.id, self.checksum, self.ownblock, self.parent, self.next, self.previous)
        return head + b"".join(o.pack() for o in self.objects) + self.tail


def objects_used_bytes(objects: tuple[SfsObject, ...] | list[SfsObject]) -> int:
    return OBJECTCONTAINER_HEADER + sum(o.packed_size for o in objects)


def build_object_container(
    block_size: int, ownblock: int, parent: int, nxt: int, previous: int, objects: list[SfsObject],
    trailer: bytes = b"",
    sfs2: bool = False,
) -> bytearray:
    """A finished (checksummed) OBJC block.  ``trailer`` goes at the very end (root info)."""
    body = struct.pack(">IIIIII", OBJECTCONTAINER_ID, 0, ownblock, parent, nxt, previous)
    body += b"".join(o.pack() for o in objects)
    if len(body) + len(trailer) > block_size:
        raise ValueError("objects do not fit in the container")
    buf = bytearray(block_size)
    buf[: len(body)] = body
    if trailer:
        buf[block_size - len(trailer) :] = trailer
    return finish_block(buf, OBJECTCONTAINER_ID, ownblock, sfs2)


# --------------------------------------------------------------------------- hash table


@dataclass(frozen=True)
class HashTable:
    id: int
    checksum: int
    ownblock: int
    parent: int
    hashentry: tuple[int, ...]

    @classmethod
    def unpack(cls, data: bytes) -> HashTable:
        n = (len(data) - HASHTABLE_HEADER) // 4
        values = struct.unpack_from(f">IIII{n}I", data, 0)
        return cls(values[0], values[1], values[2], values[3], tuple(values[4:]))

    def pack(self) -> bytes:
        return struct.pack(
            f">IIII{len(self.hashentry)}I", self.id, self.checksum, self.ownblock, self.parent, *self.hashentry
        )


def hash_chains(block_size: int) -> int:
    return (block_size - HASHTABLE_HEADER) // 4


def upperchar(c: int) -> int:
    if (224 <= c <= 254 and c != 247) or (0x61 <= c <= 0x7A):
        return c - 32
    return c


UPPER_TABLE = bytes(upperchar(c) for c in range(256))


def name_hash(name: bytes, case_sensitive: bool) -> int:
    """The handler's 16-bit name hash (FFS international hash)."""
    value = len(name) & 0xFFFF
    for c in name if case_sensitive else name.translate(UPPER_TABLE):
        value = (value * 13 + c) & 0xFFFF
    return value


def names_equal(a: bytes, b: bytes, case_sensitive: bool) -> bool:
    if case_sensitive:
        return a == b
    return len(a) == len(b) and all(upperchar(x) == upperchar(y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- soft links


@dataclass(frozen=True)
class SoftLink:
    id: int
    checksum: int
    ownblock: int
    parent: int
    next: int
    previous: int
    string: bytes  # every byte after the header, the NUL-terminated target first

    @classmethod
    def unpack(cls, data: bytes) -> SoftLink:
        v = struct.unpack_from(">IIIIII", data, 0)
        return cls(v[0], v[1], v[2], v[3], v[4], v[5], bytes(data[SOFTLINK_HEADER:]))

    def pack(self) -> bytes:
        return (
            struct.pack(">IIIIII", self.id, self.checksum, self.ownblock, self.parent, self.next, self.previous)
            + self.string
        )

    @property
    def target(self) -> bytes:
        end = self.string.find(b"\0")
        return self.string if end < 0 else self.string[:end]


# --------------------------------------------------------------------------- node containers


@dataclass(frozen=True)
class ObjectNode:
    """``fsObjectNode``: where object ``n`` lives, and the hash chain link."""

    data: int
    next: int
    hash16: int

    FORMAT = ">IIH"


@dataclass(frozen=True)
class NodeContainer:
    """``fsNodeContainer``.  ``nodes == 1``: a leaf of ObjectNodes (``objectnodes``);
    otherwise an index whose ``node`` entries are shifted block pointers (bit 0 = full)."""

    id: int
    checksum: int
    ownblock: int
    nodenumber: int
    nodes: int
    node: tuple[int, ...]
    objectnodes: tuple[ObjectNode, ...]
    tail: bytes

    @classmethod
    def unpack(cls, data: bytes) -> NodeContainer:
        block_id, checksum, own, nodenumber, nodes = struct.unpack_from(">IIIII", data, 0)
        body = len(data) - NODECONTAINER_HEADER
        if nodes == 1:
            count = body // OBJECTNODE_SIZE
            ons = tuple(
                ObjectNode(*struct.unpack_from(ObjectNode.FORMAT, data, NODECONTAINER_HEADER + i * OBJECTNODE_SIZE))
                for i in range(count)
            )
            tail = bytes(data[NODECONTAINER_HEADER + count * OBJECTNODE_SIZE :])
            return cls(block_id, checksum, own, nodenumber, nodes, (), ons, tail)
        count = body // 4
        entries = struct.unpack_from(f">{count}I", data, NODECONTAINER_HEADER)
        return cls(block_id, checksum, own, nodenumber, nodes, tuple(entries), (), b"")

    def pack(self) -> bytes:
        head = struct.pack(">IIIII", self.id, self.checksum, self.ownblock, self.nodenumber, self.nodes)
        if self.nodes == 1:
            return (
                head
                + b"".join(struct.pack(ObjectNode.FORMAT, n.data, n.next, n.hash16) for n in self.objectnodes)
                + self.tail
            )
        return head + struct.pack(f">{len(self.node)}I", *self.node)


def leaf_node_count(block_size: int) -> int:
    return (block_size - NODECONTAINER_HEADER) // OBJECTNODE_SIZE


def index_node_count(block_size: int) -> int:
    return (block_size - NODECONTAINER_HEADER) // 4


def node_shift(block_size: int, sfs2: bool) -> int:
    """Shift of the block numbers stored in node-index containers."""
    if sfs2:
        return 1
    return (block_size // 32).bit_length() - 1


# --------------------------------------------------------------------------- extent B-tree


@dataclass(frozen=True)
class BNode:
    key: int
    data: int


@dataclass(frozen=True)
class ExtentBNode:
    """``fsExtentBNode``: ``blocks`` blocks from ``key``; ``next``/``prev`` are the keys of
    the neighbouring extents of the file (``prev`` of the first has bit 31 set and holds
    the object node number)."""

    key: int
    next: int
    prev: int
    blocks: int


def extent_node_size(sfs2: bool) -> int:
    return 16 if sfs2 else 14


@dataclass(frozen=True)
class BNodeContainer:
    """``fsBNodeContainer``: ``nodecount`` entries (index ``BNode`` or leaf ``ExtentBNode``)."""

    id: int
    checksum: int
    ownblock: int
    nodecount: int
    isleaf: int
    nodesize: int
    index: tuple[BNode, ...]
    extents: tuple[ExtentBNode, ...]
    tail: bytes

    @classmethod
    def unpack(cls, data: bytes, block_no: int = 0) -> BNodeContainer:
        block_id, checksum, own, count, isleaf, nodesize = struct.unpack_from(">IIIHBB", data, 0)
        valid = nodesize in (14, 16) if isleaf else nodesize == 8
        if not valid or BNODECONTAINER_HEADER + count * nodesize > len(data):
            raise CorruptError(
                f"B-tree container has {count} nodes of {nodesize} bytes", block=block_no, field="nodecount"
            )
        index: list[BNode] = []
        extents: list[ExtentBNode] = []
        for i in range(count):
            off = BNODECONTAINER_HEADER + i * nodesize
            if not isleaf:
                index.append(BNode(*struct.unpack_from(">II", data, off)))
            elif nodesize == 16:
                extents.append(ExtentBNode(*struct.unpack_from(">IIII", data, off)))
            else:
                extents.append(ExtentBNode(*struct.unpack_from(">IIIH", data, off)))
        tail = bytes(data[BNODECONTAINER_HEADER + count * nodesize :])
        return cls(block_id, checksum, own, count, isleaf, nodesize, tuple(index), tuple(extents), tail)

    def pack(self) -> bytes:
        head = struct.pack(">IIIHBB", self.id, self.checksum, self.ownblock, self.nodecount, self.isleaf, self.nodesize)
        if not self.isleaf:
            body = b"".join(struct.pack(">II", n.key, n.data) for n in self.index)
        elif self.nodesize == 16:
            body = b"".join(struct.pack(">IIII", e.key, e.next, e.prev, e.blocks) for e in self.extents)
        else:
            body = b"".join(struct.pack(">IIIH", e.key, e.next, e.prev, e.blocks) for e in self.extents)
        return head + body + self.tail


def bnode_capacity(block_size: int, nodesize: int) -> int:
    return (block_size - BNODECONTAINER_HEADER) // nodesize


def build_bnode_container(
    block_size: int, ownblock: int, isleaf: bool, sfs2: bool, index: list[BNode], extents: list[ExtentBNode]
) -> bytearray:
    nodesize = extent_node_size(sfs2) if isleaf else 8
    buf = bytearray(block_size)
    count = len(extents) if isleaf else len(index)
    struct.pack_into(">HBB", buf, 12, count, 1 if isleaf else 0, nodesize)
    off = BNODECONTAINER_HEADER
    if isleaf:
        for e in extents:
            if sfs2:
                struct.pack_into(">IIII", buf, off, e.key, e.next, e.prev, e.blocks)
            else:
                struct.pack_into(">IIIH", buf, off, e.key, e.next, e.prev, e.blocks)
            off += nodesize
    else:
        for n in index:
            struct.pack_into(">II", buf, off, n.key, n.data)
            off += nodesize
    return finish_block(buf, BNODECONTAINER_ID, ownblock, sfs2)


# --------------------------------------------------------------------------- bitmap, admin space


@dataclass(frozen=True)
class Bitmap:
    """``fsBitmap``: a set bit means the block is free; bit 31 of the first long is the
    first block this bitmap block covers."""

    id: int
    checksum: int
    ownblock: int
    bitmap: bytes

    @classmethod
    def unpack(cls, data: bytes) -> Bitmap:
        v = struct.unpack_from(">III", data, 0)
        return cls(v[0], v[1], v[2], bytes(data[BLOCKHEADER_SIZE:]))

    def pack(self) -> bytes:
        return struct.pack(">III", self.id, self.checksum, self.ownblock) + self.bitmap


def blocks_per_bitmap(block_size: int) -> int:
    return (block_size - BLOCKHEADER_SIZE) * 8


@dataclass(frozen=True)
class AdminSpace:
    space: int
    bits: int  # set bit = used; bit 31 = the first of the 32 blocks


@dataclass(frozen=True)
class AdminSpaceContainer:
    id: int
    checksum: int
    ownblock: int
    next: int
    previous: int
    bits: int
    pad1: int
    pad2: int
    adminspace: tuple[AdminSpace, ...]
    tail: bytes

    @classmethod
    def unpack(cls, data: bytes) -> AdminSpaceContainer:
        values = struct.unpack_from(">IIIIIBBH", data, 0)
        count = (len(data) - ADMINSPACECONTAINER_HEADER) // 8
        spaces = tuple(
            AdminSpace(*struct.unpack_from(">II", data, ADMINSPACECONTAINER_HEADER + 8 * i)) for i in range(count)
        )
        tail = bytes(data[ADMINSPACECONTAINER_HEADER + 8 * count :])
        v = values
        return cls(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], spaces, tail)

    def pack(self) -> bytes:
        head = struct.pack(
            ">IIIIIBBH", self.id, self.checksum, self.ownblock, self.next, self.previous,
            self.bits, self.pad1, self.pad2,
        )  # fmt: skip
        return head + b"".join(struct.pack(">II", a.space, a.bits) for a in self.adminspace) + self.tail


def adminspaces_per_container(block_size: int) -> int:
    return (block_size - ADMINSPACECONTAINER_HEADER) // 8


# --------------------------------------------------------------------------- transactions


@dataclass(frozen=True)
class TransactionFailure:
    """``fsTransactionFailure`` (id TRFA; TROK when no transaction is pending)."""

    id: int
    checksum: int
    ownblock: int
    firsttransaction: int
    tail: bytes

    @classmethod
    def unpack(cls, data: bytes) -> TransactionFailure:
        v = struct.unpack_from(">IIII", data, 0)
        return cls(v[0], v[1], v[2], v[3], bytes(data[16:]))

    def pack(self) -> bytes:
        return struct.pack(">IIII", self.id, self.checksum, self.ownblock, self.firsttransaction) + self.tail


@dataclass(frozen=True)
class TransactionStorage:
    """``fsTransactionStorage`` (id TRST): one block of a transaction's record stream,
    ``data`` from byte 16 to the block end, ``next`` the following block (0 = last)."""

    id: int
    checksum: int
    ownblock: int
    next: int
    data: bytes

    @classmethod
    def unpack(cls, data: bytes) -> TransactionStorage:
        v = struct.unpack_from(">IIII", data, 0)
        return cls(v[0], v[1], v[2], v[3], bytes(data[16:]))

    def pack(self) -> bytes:
        return struct.pack(">IIII", self.id, self.checksum, self.ownblock, self.next) + self.data


@dataclass(frozen=True)
class JournalHeader:
    """Our journal's commit record (id AFJH), stored where the handler keeps TROK/TRFA
    (root ObjectContainer + 2), further records chained through ``next`` (0 = last).

    ``sequence`` identifies the commit; ``pairs`` are (target block, copy block): the
    copy holds the target's new contents (a complete, checksummed SFS block)."""

    id: int
    checksum: int
    ownblock: int
    sequence: int
    count: int
    next: int
    pairs: tuple[tuple[int, int], ...]
    tail: bytes

    @classmethod
    def unpack(cls, data: bytes, block_no: int = 0) -> JournalHeader:
        block_id, checksum, own, seq, count, nxt = struct.unpack_from(">IIIIII", data, 0)
        if 24 + 8 * count > len(data):
            raise CorruptError(f"journal record lists {count} blocks", block=block_no, field="count")
        flat = struct.unpack_from(f">{2 * count}I", data, 24)
        pairs = tuple((flat[2 * i], flat[2 * i + 1]) for i in range(count))
        return cls(block_id, checksum, own, seq, count, nxt, pairs, bytes(data[24 + 8 * count :]))

    def pack(self) -> bytes:
        flat = [v for pair in self.pairs for v in pair]
        raw = struct.pack(
            f">IIIIII{len(flat)}I", self.id, self.checksum, self.ownblock, self.sequence,
            self.count, self.next, *flat,
        )  # fmt: skip
        return raw + self.tail


def journal_capacity(block_size: int) -> int:
    """(target, copy) pairs one journal record holds."""
    return (block_size - 24) // 8
