"""Read side of the SFS engine: block access through a cache with a pending-write
overlay, the object-node tree, object containers, directories, and extent B-trees.

Every pointer read from disk is range-checked against the volume; every chain walk is
bounded (by the volume's block count) and loop-checked; damage raises CorruptError
naming the block and field.  :class:`SfsReader` holds no locks: the volume serialises
callers (reads of committed state may interleave; see ``volume.py``).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple

from amigafuse.blockdev.window import FsBlockIO
from amigafuse.errors import AmigaFuseError, ChainLoopError, CorruptError, NotFound
from amigafuse.fs.sfs import codec
from amigafuse.fs.sfs.codec import (
    AdminSpaceContainer,
    BNodeContainer,
    ExtentBNode,
    NodeContainer,
    ObjectContainer,
    ObjectNode,
    RootBlock,
    RootInfo,
    SfsObject,
)

_BNODE_KEY = attrgetter("key")
MAX_TREE_DEPTH = 16
CACHE_LIMIT = 8192  # clean metadata blocks kept in memory


class NodeRef(NamedTuple):
    """A node container on a path through the object-node tree."""

    block: int
    nodenumber: int
    nodes: int


@dataclass(frozen=True)
class Located:
    """An object and where it lives: the ObjectContainer block and its byte offset."""

    obj: SfsObject
    container: int
    offset: int


class _LocMemo(NamedTuple):
    source: ObjectContainer  # the parsed container the result was read from
    container: int
    loc: Located


class SfsReader:
    """Block-level read access to one SFS volume (see module docstring)."""

    def __init__(self, io: FsBlockIO, root: RootBlock) -> None:
        self.io = io
        self.root = root
        self.block_size = io.fs_block_size
        self.sfs2 = root.sfs2
        self.case_sensitive = root.case_sensitive
        self.total_blocks = root.totalblocks
        self.shift = codec.node_shift(self.block_size, self.sfs2)
        self.cache: dict[int, bytes] = {}
        # Blocks changed by the transaction being built; reads see them first.
        self.pending: dict[int, bytearray] = {}
        self.extent_cache: dict[int, list[tuple[int, int]]] = {}
        self.overlay_data: dict[int, bytes] = {}
        # Parsed containers; every change of a block's bytes drops its entry.
        self.parsed: dict[int, ObjectContainer | BNodeContainer | NodeContainer | AdminSpaceContainer] = {}
        # Path to the leaf container of each range of object nodes; the writer drops
        # the memo whenever it changes the tree's shape (new level, new container).
        self.leaf_refs: dict[int, list[NodeRef]] = {}
        # Object node -> where ``locate`` found it (see ``locate``).
        self.loc_memo: dict[int, _LocMemo] = {}
        # Directory node -> {name key -> object node}, for directories scanned whole.
        self.dir_index: dict[int, dict[bytes, int]] = {}

    # ------------------------------------------------------------------ blocks
    def check_pointer(self, block: int, where: int, field: str) -> int:
        if not 0 < block < self.total_blocks:
            raise CorruptError(f"pointer to block {block} lies outside the volume", block=where, field=field)
        return block

    async def raw(self, block: int) -> bytes:
        """A block's current contents (pending overlay, cache, then the device)."""
        pend = self.pending.get(block)
        if pend is not None:
            return bytes(pend)
        data = self.cache.get(block)
        if data is None:
            data = await self.io.read(block, 1)
            if len(self.cache) >= CACHE_LIMIT:
                self.cache.clear()
                self.parsed.clear()
            self.cache[block] = data
        return data

    async def block(self, block: int, expect_id: int) -> bytes:
        data = await self.raw(block)
        codec.check_block(data, block, expect_id, self.sfs2, checksum=block not in self.pending)
        return data

    # ------------------------------------------------------------------ root info
    async def root_info(self) -> RootInfo:
        data = await self.block(self.root.rootobjectcontainer, codec.OBJECTCONTAINER_ID)
        return RootInfo.unpack(data[self.block_size - codec.ROOTINFO_SIZE :])

    # ------------------------------------------------------------------ object nodes
    async def node_path(self, node: int) -> list[NodeRef]:
        """The node containers from the root down to the leaf holding ``node``."""
        if node <= 0:
            raise NotFound(f"object node {node} does not exist")
        leaf_count = codec.leaf_node_count(self.block_size)
        memo = self.leaf_refs.get((node - 1) // leaf_count)
        if memo is not None and memo[-1].nodenumber <= node < memo[-1].nodenumber + leaf_count:
            return memo
        block = self.root.objectnoderoot
        path: list[NodeRef] = []
        index_count = codec.index_node_count(self.block_size)
        for _ in range(MAX_TREE_DEPTH):
            data = await self.block(block, codec.NODECONTAINER_ID)
            nodenumber, nodes = struct.unpack_from(">II", data, 12)
            path.append(NodeRef(block, nodenumber, nodes))
            if nodes == 1:
                if not 0 <= node - nodenumber < leaf_count:
                    raise NotFound(f"object node {node} does not exist")
                self.leaf_refs[(node - 1) // leaf_count] = path
                return path
            if nodes == 0:
                raise CorruptError("node index container covers 0 nodes", block=block, field="nodes")
            index = (node - nodenumber) // nodes
            if not 0 <= index < index_count or node < nodenumber:
                raise NotFound(f"object node {node} does not exist")
            entry = struct.unpack_from(">I", data, codec.NODECONTAINER_HEADER + 4 * index)[0]
            if entry == 0:
                raise NotFound(f"object node {node} does not exist")
            block = self.check_pointer(entry >> self.shift, block, f"node[{index}]")
        raise ChainLoopError("object node tree is deeper than 16 levels", block=block, field="nodes")

    async def object_node(self, node: int) -> ObjectNode:
        ref = (await self.node_path(node))[-1]
        on = (await self.ncontainer(ref.block)).objectnodes[node - ref.nodenumber]
        if on.data == 0:
            raise NotFound(f"object node {node} is not in use")
        return on

    # ------------------------------------------------------------------ objects
    async def container(self, block: int) -> ObjectContainer:
        hit = self.parsed.get(block)
        if isinstance(hit, ObjectContainer):
            return hit
        data = await self.block(block, codec.OBJECTCONTAINER_ID)
        oc = ObjectContainer.unpack(data, self.sfs2)
        self.parsed[block] = oc
        return oc

    async def bcontainer(self, block: int) -> BNodeContainer:
        hit = self.parsed.get(block)
        if isinstance(hit, BNodeContainer):
            return hit
        bc = BNodeContainer.unpack(await self.block(block, codec.BNODECONTAINER_ID), block)
        self.parsed[block] = bc
        return bc

    async def ncontainer(self, block: int) -> NodeContainer:
        hit = self.parsed.get(block)
        if isinstance(hit, NodeContainer):
            return hit
        nc = NodeContainer.unpack(await self.block(block, codec.NODECONTAINER_ID))
        span = len(nc.objectnodes) if nc.nodes == 1 else len(nc.node) * nc.nodes
        if nc.nodenumber + span > 0xFFFFFFFF:  # node numbers are 32-bit longs
            raise CorruptError(
                f"node container numbers nodes past 2^32 (from {nc.nodenumber})",
                block=block, field="nodenumber",
            )  # fmt: skip
        self.parsed[block] = nc
        return nc

    async def locate(self, node: int) -> Located:
        """The object with node number ``node``.  NotFound / CorruptError.

        Memo: a result stays valid while its container's parsed form is the same
        object (every change of a container's bytes replaces or drops that entry, and
        an object leaving a container changes the container)."""
        hit = self.loc_memo.get(node)
        if hit is not None and self.parsed.get(hit.container) is hit.source:
            return hit.loc
        on = await self.object_node(node)
        cblock = self.check_pointer(on.data, node, "objectnode.data")
        oc = await self.container(cblock)
        offset = codec.OBJECTCONTAINER_HEADER
        for obj in oc.objects:
            if obj.objectnode == node:
                loc = Located(obj, cblock, offset)
                if len(self.loc_memo) >= CACHE_LIMIT:
                    self.loc_memo.clear()
                self.loc_memo[node] = _LocMemo(oc, cblock, loc)
                return loc
            offset += obj.packed_size
        raise CorruptError(f"object node {node} points to a container without it", block=cblock, field="objectnode")

    async def dir_containers(self, dir_obj: SfsObject) -> list[tuple[int, ObjectContainer]]:
        """The ObjectContainers of a directory, in chain order (bounded, loop-checked)."""
        out: list[tuple[int, ObjectContainer]] = []
        seen: set[int] = set()
        block = dir_obj.firstdirblock
        prev = 0
        while block:
            self.check_pointer(block, prev or dir_obj.objectnode, "next")
            if block in seen or len(seen) > self.total_blocks:
                raise ChainLoopError("directory container chain loops", block=block, field="next")
            seen.add(block)
            oc = await self.container(block)
            if oc.parent != dir_obj.objectnode:
                raise CorruptError(
                    f"container belongs to node {oc.parent}, not directory {dir_obj.objectnode}",
                    block=block,
                    field="parent",
                )
            out.append((block, oc))
            prev, block = block, oc.next
        return out

    async def dir_entries(self, dir_obj: SfsObject) -> list[Located]:
        out = []
        for block, oc in await self.dir_containers(dir_obj):
            offset = codec.OBJECTCONTAINER_HEADER
            for obj in oc.objects:
                out.append(Located(obj, block, offset))
                offset += obj.packed_size
        return out

    def name_key(self, name: bytes) -> bytes:
        return name if self.case_sensitive else name.translate(codec.UPPER_TABLE)

    def index_dir(self, dir_node: int, entries: list[Located]) -> None:
        """Remember a directory's names (built from a full scan; writers keep it)."""
        self.dir_index[dir_node] = {self.name_key(loc.obj.name): loc.obj.objectnode for loc in entries}

    async def find_in_dir(self, dir_obj: SfsObject, name: bytes) -> Located | None:
        """The entry ``name`` of a directory: from the in-memory name index when the
        directory has been scanned, else through its hash table (or a scan when it
        has none)."""
        index = self.dir_index.get(dir_obj.objectnode)
        if index is not None:
            node = index.get(self.name_key(name))
            return None if node is None else await self.locate(node)
        if dir_obj.hashtable == 0:
            for loc in await self.dir_entries(dir_obj):
                if codec.names_equal(loc.obj.name, name, self.case_sensitive):
                    return loc
            return None
        hblock = self.check_pointer(dir_obj.hashtable, dir_obj.objectnode, "hashtable")
        ht = codec.HashTable.unpack(await self.block(hblock, codec.HASHTABLE_ID))
        h16 = codec.name_hash(name, self.case_sensitive)
        node = ht.hashentry[h16 % len(ht.hashentry)]
        seen: set[int] = set()
        while node:
            if node in seen or len(seen) > self.total_blocks * 64:
                raise ChainLoopError("hash chain loops", block=hblock, field="hashentry")
            seen.add(node)
            on = await self.object_node(node)
            if on.hash16 == h16:
                loc = await self.locate(node)
                if codec.names_equal(loc.obj.name, name, self.case_sensitive):
                    return loc
            node = on.next
        return None

    # ------------------------------------------------------------------ extents
    async def extent_path(self, key: int) -> list[tuple[int, BNodeContainer, int]]:
        """B-tree path to ``key``: (block, container, index of the entry taken)."""
        block = self.root.extentbnoderoot
        path: list[tuple[int, BNodeContainer, int]] = []
        for _ in range(MAX_TREE_DEPTH):
            bc = await self.bcontainer(block)
            if bc.isleaf:
                index = -1
                lo, hi = 0, len(bc.extents) - 1
                while lo <= hi:
                    mid = (lo + hi) // 2
                    k = bc.extents[mid].key
                    if k == key:
                        index = mid
                        break
                    if k < key:
                        lo = mid + 1
                    else:
                        hi = mid - 1
                if index < 0:
                    # Insert position (for writers): first entry with a larger key.
                    index = lo
                path.append((block, bc, index))
                return path
            if not bc.index:
                raise CorruptError("empty B-tree index container", block=block, field="nodecount")
            # The last entry whose key is <= key, else the first (keys are sorted).
            index = max(0, bisect_right(bc.index, key, key=_BNODE_KEY) - 1)
            path.append((block, bc, index))
            block = self.check_pointer(bc.index[index].data, block, f"bnode[{index}].data")
        raise ChainLoopError("extent B-tree is deeper than 16 levels", block=block, field="bnode")

    async def extent(self, key: int) -> ExtentBNode:
        block, bc, index = (await self.extent_path(key))[-1]
        if index >= len(bc.extents) or bc.extents[index].key != key:
            raise CorruptError(f"extent starting at block {key} is missing from the B-tree", block=block, field="key")
        return bc.extents[index]

    async def file_extents(self, obj: SfsObject) -> list[tuple[int, int]]:
        """(first block, block count) of every extent of a file, in file order."""
        cached = self.extent_cache.get(obj.objectnode)
        if cached is not None:
            return cached
        out: list[tuple[int, int]] = []
        key = obj.data
        prev = 0x80000000 | obj.objectnode
        seen: set[int] = set()
        while key:
            self.check_pointer(key, obj.objectnode, "extent key")
            if key in seen:
                raise ChainLoopError("file extent chain loops", block=key, field="next")
            seen.add(key)
            ext = await self.extent(key)
            if ext.prev != prev:
                raise CorruptError(
                    f"extent's prev is {ext.prev:#x}, expected {prev:#x}", block=key, field="prev"
                )
            if ext.blocks == 0 or key + ext.blocks > self.total_blocks:
                raise CorruptError(f"extent of {ext.blocks} blocks", block=key, field="blocks")
            out.append((key, ext.blocks))
            prev, key = key, ext.next
        self.extent_cache[obj.objectnode] = out
        return out

    async def read_data(self, obj: SfsObject, offset: int, length: int) -> bytes:
        """File bytes; contiguous runs are read with one device request each."""
        runs, skip, nbytes = await self.data_runs(obj, offset, length)
        parts = []
        for disk, n in runs:
            parts.append(await self.read_file_blocks(disk, n))
        raw = b"".join(parts)
        return raw[skip : skip + nbytes]

    async def data_runs(self, obj: SfsObject, offset: int, length: int) -> tuple[list[tuple[int, int]], int, int]:
        """Where a read's bytes are: (runs of (disk block, count) in file order, merged
        when contiguous; bytes to skip at the start of the first run; bytes wanted).
        Walks the file's extents (metadata reads: call it holding the volume lock).
        Raises CorruptError when the extents are shorter than the file."""
        size = obj.size
        if offset >= size or length <= 0:
            return [], 0, 0
        end = min(size, offset + length)
        bs = self.block_size
        first_fb = offset // bs
        last_fb = (end - 1) // bs
        extents = await self.file_extents(obj)
        if sum(n for _, n in extents) * bs < size:
            raise CorruptError(
                f"file of {size} bytes has only {sum(n for _, n in extents)} blocks",
                block=obj.data,
                field="size",
            )
        runs: list[tuple[int, int]] = []  # (disk block, count), merged when contiguous
        fb = 0
        for start, count in extents:
            lo = max(fb, first_fb)
            hi = min(fb + count - 1, last_fb)
            if lo <= hi:
                disk = start + (lo - fb)
                n = hi - lo + 1
                if runs and runs[-1][0] + runs[-1][1] == disk:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n)
                else:
                    runs.append((disk, n))
            fb += count
            if fb > last_fb:
                break
        return runs, offset - first_fb * bs, end - offset

    async def read_file_blocks(self, disk: int, count: int) -> bytes:
        """Data blocks as the device holds them, with ``overlay_data`` (a journal
        applied in memory on a read-only volume) on top."""
        raw = await self.io.read(disk, count)
        if not self.overlay_data:
            return raw
        bs = self.block_size
        out = bytearray(raw)
        for i in range(count):
            pend = self.overlay_data.get(disk + i)
            if pend is not None:
                out[i * bs : (i + 1) * bs] = pend
        return bytes(out)

    async def softlink_target(self, obj: SfsObject) -> bytes:
        block = self.check_pointer(obj.data, obj.objectnode, "softlink data")
        data = await self.block(block, codec.SOFTLINK_ID)
        return codec.SoftLink.unpack(data).target


def validate_root(root: RootBlock, device_blocks: int) -> None:
    """CorruptError unless the root's size and pointers make sense for the device."""
    if not 8 <= root.totalblocks <= device_blocks:
        raise CorruptError(
            f"the SFS root claims {root.totalblocks} blocks; the partition has {device_blocks}",
            block=0,
            field="totalblocks",
        )
    for name in ("bitmapbase", "adminspacecontainer", "rootobjectcontainer", "extentbnoderoot", "objectnoderoot"):
        value = getattr(root, name)
        if not 0 < value < root.totalblocks - 1:
            raise CorruptError(f"root pointer {name} = {value} lies outside the volume", block=0, field=name)
    if root.rootobjectcontainer + 2 >= root.totalblocks - 1:
        raise CorruptError("the transaction block lies outside the volume", block=0, field="rootobjectcontainer")


async def read_root(io: FsBlockIO) -> tuple[RootBlock, list[str]]:
    """The valid root block with the higher sequence number; notes about the other.

    The second root is looked for at the block the first one names as the last
    (``totalblocks - 1``: the partition may be larger than the filesystem), else at
    the partition's last block.  Raises CorruptError when neither is an SFS root."""
    notes: list[str] = []
    candidates: list[RootBlock] = []
    problems: list[str] = []

    async def probe(where: int) -> RootBlock | None:
        try:
            data = await io.read(where, 1)
        except AmigaFuseError as exc:  # device errors on one copy: try the other
            problems.append(f"block {where}: {exc}")
            return None
        block_id, _, own = struct.unpack_from(">III", data, 0)
        if block_id not in (codec.ROOT_ID_SFS0, codec.ROOT_ID_SFS2):
            problems.append(f"block {where}: no SFS root id")
            return None
        if not codec.checksum_ok(data, block_id == codec.ROOT_ID_SFS2):
            problems.append(f"block {where}: root checksum wrong")
            return None
        if own != where:
            problems.append(f"block {where}: root ownblock {own}")
            return None
        return RootBlock.unpack(data)

    first = await probe(0)
    if first is not None:
        candidates.append(first)
    last = io.block_count - 1
    if first is not None and 0 < first.totalblocks <= io.block_count:
        last = first.totalblocks - 1
    second = await probe(last) if last > 0 else None
    if second is not None:
        candidates.append(second)
    if not candidates:
        raise CorruptError(
            "no valid SFS root block at the start or end of the partition ("
            + "; ".join(problems)
            + "): not an SFS volume, or the partition table's geometry is wrong",
            block=0,
            field="root",
        )
    if len(candidates) == 1:
        notes.append(f"only one valid root block ({'; '.join(problems)})")
    best = max(candidates, key=lambda r: r.sequencenumber)
    return best, notes
