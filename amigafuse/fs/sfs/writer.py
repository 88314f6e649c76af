"""Write side of the SFS engine: admin space, the object-node tree, object
containers, hash chains, the extent B+-tree, file block allocation, and the commit.

Model
    Metadata changes go into ``pending`` (block -> new contents); data blocks are
    written to the device directly, but only ever into blocks that are free in the
    committed state (blocks freed by the open transaction are *held* until it
    commits); new contents of data blocks the committed state uses wait in
    ``pending_data``.  Each Volume operation runs between ``begin()`` and ``end()``; on
    any exception ``rollback()`` restores ``pending``, the bitmap and the caches, so an
    operation happens entirely or not at all.

Commit (``commit()``), in the handler's own transaction format and order (SFS 1.84
``flushtransaction``; see docs/sfs.md), crash-safe at every step:
    1. bitmap blocks and the root info are brought up to date in ``pending``; every
       pending block gets its checksum;
    2. one record per changed block (metadata compressed against its on-disk
       original, or OI_EMPTY when it has none at hand; overwritten file data as
       OI_EMPTY records) is stored in a TRST chain in blocks that are free in both the
       committed and the new state; flush (this also makes the data written directly
       durable);
    3. TRFA (``firsttransaction`` = the chain's first block) at root OC + 2; flush;
    4. the blocks are written in place, in ascending block order; flush;
    5. TROK at root OC + 2; flush (before the chain's blocks, free, can be reused).
    A crash before 3 leaves the old state; after 3 both the real handler (at its next
    mount) and ``replay_transaction`` here rebuild every block from the chain.

Invariant: ``originals[b]`` (blocks changed since the last commit) is block b's
contents on the device, read before its first change; ``cache`` entries equal the
device's contents (they come from reads and from commits), so a record compressed
against either replays to the new block on the device.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping
from dataclasses import replace

from amigafuse.amiga.dates import AMIGA_EPOCH_UNIX
from amigafuse.errors import ChainLoopError, CorruptError, NoSpace
from amigafuse.fs.sfs import codec, transactions
from amigafuse.fs.sfs.alloc import FreeMap
from amigafuse.fs.sfs.codec import (
    AdminSpace,
    AdminSpaceContainer,
    BNode,
    BNodeContainer,
    ExtentBNode,
    NodeContainer,
    ObjectContainer,
    ObjectNode,
    SfsObject,
)
from amigafuse.fs.sfs.reader import MAX_TREE_DEPTH, Located, NodeRef, SfsReader

ADMIN_SPACE_BLOCKS = 32
PENDING_LIMIT = 2048  # commit when a transaction grows past this many metadata blocks
PENDING_DATA_BYTES = 1 << 20  # ... or holds this many bytes of overwritten file data
CHAIN_RESERVE = 16  # blocks kept free for transaction records (fewer on tiny volumes)


def now_seconds() -> int:
    return max(0, int(time.time()) - AMIGA_EPOCH_UNIX)


def runs_of(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted blocks grouped into (start, count) runs."""
    out: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


class SfsWriter(SfsReader):
    """Mutations of one SFS volume (see module docstring)."""

    def __init__(self, io: object, root: codec.RootBlock, freemap: FreeMap) -> None:
        super().__init__(io, root)  # type: ignore[arg-type]
        self.freemap = freemap
        self.undo: dict[int, bytes | None] | None = None
        # New contents of data blocks the committed state uses (journaled at commit),
        # blocks allocated since the last commit (written directly), and the undo log
        # of ``pending_data`` for the running operation.
        self.pending_data: dict[int, bytes] = {}
        self.fresh: set[int] = set()
        self.undo_data: dict[int, bytes | None] = {}
        # Directory -> object size: every container but the first lacks room for
        # objects this large (spares the handler's whole-chain scan; dropped whenever
        # a container of the directory gains room).
        self.full_for: dict[int, int] = {}
        self.max_extent = 0xFFFF
        self.tr_block = root.rootobjectcontainer + 2
        self.unrecorded_commits = 0
        # The root info's deletedfiles as last written by ``adjust_deleted`` (None:
        # not known; the Volume then reads the root info).
        self.deleted_files: int | None = None
        self._record_bound = transactions.record_size(self.block_size + self.block_size // 4)
        self._chain_area = self.block_size - transactions.TRANSACTIONSTORAGE_HEADER
        freemap.reserve = min(CHAIN_RESERVE, max(3, root.totalblocks // 128))
        # On-disk contents of blocks changed since the last commit (the bases their
        # transaction records are compressed against; see the module invariant).
        self.originals: dict[int, bytes] = {}
        # Object nodes freed since the volume was opened (by operations that were not
        # rolled back), and those freed by the running operation: the Volume never
        # lets a freed node's number name another object (see volume.py, "Identity").
        self.removed_nodes: set[int] = set()
        self.op_removed: list[int] = []
        self.data_hint = root.bitmapbase + (root.totalblocks + codec.blocks_per_bitmap(self.block_size) - 1) // codec.blocks_per_bitmap(self.block_size)

    # ------------------------------------------------------------------ operations
    def begin(self) -> None:
        self.undo = {}
        self.undo_data = {}
        self.op_removed = []
        self.freemap.begin()

    def rollback(self) -> None:
        undo, self.undo = self.undo or {}, None
        for block, old in undo.items():
            if old is None:
                self.pending.pop(block, None)
            else:
                self.pending[block] = bytearray(old)
        for block, olddata in self.undo_data.items():
            if olddata is None:
                self.pending_data.pop(block, None)
            else:
                self.pending_data[block] = olddata
        self.undo_data = {}
        self.op_removed = []
        self.freemap.rollback()
        self.extent_cache.clear()
        self.parsed.clear()
        self.leaf_refs.clear()
        self.dir_index.clear()
        self.full_for.clear()

    def end(self) -> None:
        self.undo = None
        self.undo_data = {}
        self.removed_nodes.update(self.op_removed)
        self.op_removed = []
        self.freemap.end()

    def needs_commit(self) -> bool:
        # Small volumes commit sooner, so the journal copies always find room.
        limit = max(64, min(PENDING_LIMIT, self.total_blocks // 16))
        return len(self.pending) > limit or len(self.pending_data) * self.block_size > PENDING_DATA_BYTES

    async def write_data(self, disk: int, data: bytes | bytearray) -> None:
        """Write file data at ``disk``: blocks allocated by this transaction go to the
        device now; blocks the committed state uses wait for the commit (journaled)."""
        bs = self.block_size
        count = len(data) // bs
        if self.fresh.issuperset(range(disk, disk + count)):
            await self.io.write(disk, data)
            return
        start = 0
        while start < count:
            if disk + start in self.fresh:
                end = start
                while end < count and disk + end in self.fresh:
                    end += 1
                await self.io.write(disk + start, data[start * bs : end * bs])
                start = end
                continue
            b = disk + start
            if b not in self.undo_data:
                self.undo_data[b] = self.pending_data.get(b)
            self.pending_data[b] = bytes(data[start * bs : (start + 1) * bs])
            start += 1

    async def read_file_blocks(self, disk: int, count: int) -> bytes:
        raw = await self.io.read(disk, count)
        if not self.pending_data:
            return raw
        bs = self.block_size
        out = None
        for i in range(count):
            pend = self.pending_data.get(disk + i)
            if pend is not None:
                if out is None:
                    out = bytearray(raw)
                out[i * bs : (i + 1) * bs] = pend
        return raw if out is None else bytes(out)

    def _record(self, block: int) -> None:
        self.parsed.pop(block, None)
        if self.undo is not None and block not in self.undo:
            old = self.pending.get(block)
            self.undo[block] = bytes(old) if old is not None else None

    async def modify(self, block: int, expect_id: int) -> bytearray:
        """The pending (writable) copy of an existing block, checked first."""
        buf = self.pending.get(block)
        if buf is not None:
            # Changed since the last commit: checked when it was first read (or built
            # here); only its type is confirmed (a wrong pointer must not pass).
            if struct.unpack_from(">I", buf, 0)[0] != expect_id:
                codec.check_block(bytes(buf), block, expect_id, self.sfs2, checksum=False)
            self._record(block)
            return buf
        data = await self.block(block, expect_id)
        self._record(block)
        buf = self.pending.get(block)
        if buf is None:
            self.originals.setdefault(block, data)
            buf = bytearray(data)
            self.pending[block] = buf
        return buf

    def put(self, block: int, data: bytearray) -> None:
        """Replace a block's contents in the transaction (header already filled in)."""
        if len(data) != self.block_size:
            raise AssertionError("block of the wrong size")
        self._record(block)
        self.pending[block] = data

    def finish(self, data: bytearray, block_id: int, block: int) -> bytearray:
        return codec.finish_block(data, block_id, block, self.sfs2)

    # ------------------------------------------------------------------ admin space
    async def _admin_containers(self) -> list[tuple[int, AdminSpaceContainer]]:
        out = []
        block = self.root.adminspacecontainer
        seen: set[int] = set()
        while block:
            if block in seen or len(seen) > self.total_blocks:
                raise ChainLoopError("admin space container chain loops", block=block, field="next")
            seen.add(block)
            self.check_pointer(block, self.root.adminspacecontainer, "adminspacecontainer.next")
            hit = self.parsed.get(block)
            if isinstance(hit, AdminSpaceContainer):
                asc = hit
            else:
                asc = AdminSpaceContainer.unpack(await self.block(block, codec.ADMINSPACECONTAINER_ID))
                self.parsed[block] = asc
            out.append((block, asc))
            block = asc.next
        return out

    async def _set_admin_entry(self, block: int, index: int, space: int, bits: int) -> None:
        old = self.parsed.get(block)
        buf = await self.modify(block, codec.ADMINSPACECONTAINER_ID)
        struct.pack_into(">II", buf, codec.ADMINSPACECONTAINER_HEADER + 8 * index, space, bits)
        if isinstance(old, AdminSpaceContainer):  # keep the parsed form (checksum at commit)
            spaces = list(old.adminspace)
            spaces[index] = AdminSpace(space, bits)
            self.parsed[block] = replace(old, checksum=0, adminspace=tuple(spaces))

    async def alloc_admin(self) -> int:
        """One metadata block from the admin spaces (a new space of 32 blocks when all
        are full).  The block's pending contents are zeroed.  NoSpace."""
        containers = await self._admin_containers()
        for block, asc in containers:
            for i, a in enumerate(asc.adminspace):
                if a.space and a.bits != 0xFFFFFFFF:
                    bit = next(k for k in range(32) if not a.bits & (0x80000000 >> k))
                    new = a.space + bit
                    self.check_pointer(new, block, f"adminspace[{i}]")
                    await self._set_admin_entry(block, i, a.space, a.bits | (0x80000000 >> bit))
                    self.put(new, bytearray(self.block_size))
                    return new
        start = self.freemap.find_run(ADMIN_SPACE_BLOCKS, 0)
        if start < 0 or self.freemap.usable_count() - ADMIN_SPACE_BLOCKS < self.freemap.reserve:
            raise NoSpace("the SFS volume has no room for more metadata (admin space)")
        self.freemap.mark_used(start, ADMIN_SPACE_BLOCKS)
        for block, asc in containers:
            for i, a in enumerate(asc.adminspace):
                if a.space == 0:
                    await self._set_admin_entry(block, i, start, 0x80000000)
                    self.put(start, bytearray(self.block_size))
                    return start
        # Every container is full: the new space's first block becomes a new container.
        last_block, last = containers[-1]
        buf = bytearray(self.block_size)
        struct.pack_into(">IIBBH", buf, 12, 0, last_block, last.bits, 0, 0)
        struct.pack_into(">II", buf, codec.ADMINSPACECONTAINER_HEADER, start, 0xC0000000)
        self.put(start, self.finish(buf, codec.ADMINSPACECONTAINER_ID, start))
        lbuf = await self.modify(last_block, codec.ADMINSPACECONTAINER_ID)
        struct.pack_into(">I", lbuf, 12, start)
        self.put(start + 1, bytearray(self.block_size))
        return start + 1

    async def free_admin(self, block: int) -> None:
        """Return a metadata block to its admin space."""
        for cblock, asc in await self._admin_containers():
            for i, a in enumerate(asc.adminspace):
                if a.space and a.space <= block < a.space + ADMIN_SPACE_BLOCKS:
                    mask = 0x80000000 >> (block - a.space)
                    if not a.bits & mask:
                        raise CorruptError(f"admin block {block} is already free", block=cblock, field="bits")
                    await self._set_admin_entry(cblock, i, a.space, a.bits & ~mask)
                    self._record(block)
                    self.pending.pop(block, None)
                    self.cache.pop(block, None)
                    return
        raise CorruptError(f"block {block} is not in any admin space", block=block, field="adminspace")

    # ------------------------------------------------------------------ object nodes
    def _leaf_count(self) -> int:
        return codec.leaf_node_count(self.block_size)

    def _index_count(self) -> int:
        return codec.index_node_count(self.block_size)

    async def set_node(self, node: int, *, data: int | None = None, next: int | None = None,
                       hash16: int | None = None) -> None:  # fmt: skip
        ref = (await self.node_path(node))[-1]
        nc = await self.ncontainer(ref.block)
        i = node - ref.nodenumber
        old = nc.objectnodes[i]
        new = ObjectNode(
            old.data if data is None else data,
            old.next if next is None else next,
            old.hash16 if hash16 is None else hash16,
        )
        await self._put_objectnode(ref.block, nc, i, new)

    async def _put_objectnode(self, block: int, nc: NodeContainer, i: int, on: ObjectNode) -> None:
        """Store object node ``i`` of leaf ``block`` and keep its parsed form."""
        buf = await self.modify(block, codec.NODECONTAINER_ID)
        struct.pack_into(">IIH", buf, codec.NODECONTAINER_HEADER + i * codec.OBJECTNODE_SIZE, on.data, on.next, on.hash16)
        ons = nc.objectnodes
        self.parsed[block] = codec.fast_replace(nc, checksum=0, objectnodes=(*ons[:i], on, *ons[i + 1 :]))

    @staticmethod
    def _index_full(nc: NodeContainer) -> bool:
        return all(e != 0 and e & 1 for e in nc.node)

    async def _mark_parent(self, path: list[NodeRef], level: int, full: bool) -> None:
        """Set (full) or clear the full bit of path[level]'s entry in its parent."""
        if level == 0:
            return
        pblock = path[level - 1].block
        child = path[level]
        buf = await self.modify(pblock, codec.NODECONTAINER_ID)
        pnc = NodeContainer.unpack(bytes(buf))
        was_full = self._index_full(pnc)
        idx = (child.nodenumber - pnc.nodenumber) // pnc.nodes
        off = codec.NODECONTAINER_HEADER + 4 * idx
        entry = struct.unpack_from(">I", buf, off)[0]
        struct.pack_into(">I", buf, off, entry | 1 if full else entry & ~1)
        pnc = NodeContainer.unpack(bytes(buf))
        if full and self._index_full(pnc):
            await self._mark_parent(path, level - 1, True)
        elif not full and was_full:
            await self._mark_parent(path, level - 1, False)

    async def _add_node_level(self) -> None:
        self.leaf_refs.clear()
        rootb = self.root.objectnoderoot
        data = bytearray(await self.block(rootb, codec.NODECONTAINER_ID))
        nc = NodeContainer.unpack(bytes(data))
        new = await self.alloc_admin()
        copy = bytearray(data)
        self.put(new, self.finish(copy, codec.NODECONTAINER_ID, new))
        buf = bytearray(self.block_size)
        nodes = self._leaf_count() if nc.nodes == 1 else nc.nodes * self._index_count()
        struct.pack_into(">III", buf, codec.NODECONTAINER_HEADER - 8, nc.nodenumber, nodes, (new << self.shift) | 1)
        self.put(rootb, self.finish(buf, codec.NODECONTAINER_ID, rootb))

    async def create_node(self, data: int) -> int:
        """A new object node pointing at container ``data``; its number."""
        for _ in range(MAX_TREE_DEPTH * 4):
            block = self.root.objectnoderoot
            path: list[NodeRef] = []
            restart = False
            for _depth in range(MAX_TREE_DEPTH):
                nc = await self.ncontainer(block)
                path.append(NodeRef(block, nc.nodenumber, nc.nodes))
                if nc.nodes == 1:
                    empty = [i for i, on in enumerate(nc.objectnodes) if not on.data][:2]
                    if not empty:
                        if block != self.root.objectnoderoot:
                            raise CorruptError("node container marked not full has no free node", block=block, field="node")
                        await self._add_node_level()
                        restart = True
                        break
                    i = empty[0]
                    await self._put_objectnode(block, nc, i, ObjectNode(data, 0, 0))
                    if len(empty) == 1:
                        await self._mark_parent(path, len(path) - 1, True)
                    return nc.nodenumber + i
                pick = next((i for i, e in enumerate(nc.node) if e != 0 and not e & 1), -1)
                if pick >= 0:
                    block = self.check_pointer(nc.node[pick] >> self.shift, block, f"node[{pick}]")
                    continue
                hole = next((i for i, e in enumerate(nc.node) if e == 0), -1)
                if hole < 0:
                    if block != self.root.objectnoderoot:
                        raise CorruptError("node index marked not full is full", block=block, field="node")
                    await self._add_node_level()
                    restart = True
                    break
                nodes = 1 if nc.nodes == self._leaf_count() else nc.nodes // self._index_count()
                new = await self.alloc_admin()
                nbuf = bytearray(self.block_size)
                struct.pack_into(">II", nbuf, 12, nc.nodenumber + hole * nc.nodes, nodes)
                self.put(new, self.finish(nbuf, codec.NODECONTAINER_ID, new))
                self.leaf_refs.clear()
                pbuf = await self.modify(block, codec.NODECONTAINER_ID)
                struct.pack_into(">I", pbuf, codec.NODECONTAINER_HEADER + 4 * hole, new << self.shift)
                block = new
            if not restart:
                raise ChainLoopError("object node tree too deep", block=block, field="nodes")
        raise NoSpace("no free object node could be created")

    async def delete_node(self, node: int) -> None:
        path = await self.node_path(node)
        block = path[-1].block
        nc = await self.ncontainer(block)
        was_full = all(on.data != 0 for on in nc.objectnodes)
        await self._put_objectnode(block, nc, node - nc.nodenumber, ObjectNode(0, 0, 0))
        if was_full:
            await self._mark_parent(path, len(path) - 1, False)
        if not any(on.data for on in (await self.ncontainer(block)).objectnodes):
            await self._free_node_container(path, len(path) - 1)

    async def _free_node_container(self, path: list[NodeRef], level: int) -> None:
        """Free an emptied node container (never the root) and clear its parent's
        pointer; an index left with no pointers is freed the same way (as the handler
        does in ``freecontainer``)."""
        if level == 0:
            return
        self.leaf_refs.clear()
        child = path[level]
        await self.free_admin(child.block)
        parent = path[level - 1]
        buf = await self.modify(parent.block, codec.NODECONTAINER_ID)
        struct.pack_into(">I", buf, codec.NODECONTAINER_HEADER + 4 * ((child.nodenumber - parent.nodenumber) // parent.nodes), 0)
        if not any(NodeContainer.unpack(bytes(buf)).node):
            await self._free_node_container(path, level - 1)

    # ------------------------------------------------------------------ containers
    def _fits(self, block: int, used_before_last: int, last_size: int) -> bool:
        """Whether an object of ``last_size`` bytes can start at ``used_before_last``:
        it must end inside the block (before the root info in the root container) and
        start before ``blocksize - sizeof(fsObject) - 2``, where readers stop looking."""
        start_limit = self.block_size - codec.object_sizeof(self.sfs2) - 2
        return used_before_last < start_limit and used_before_last + last_size <= self._capacity(block)

    def _capacity(self, block: int) -> int:
        if block == self.root.rootobjectcontainer:
            return self.block_size - codec.ROOTINFO_SIZE
        return self.block_size

    async def _write_container(
        self, block: int, oc: ObjectContainer, objects: list[SfsObject], used: int | None = None
    ) -> None:
        """Rewrite a container with ``objects`` (``used``: their bytes with the header,
        when the caller knows them)."""
        trailer = b""
        if block == self.root.rootobjectcontainer:
            cur = await self.raw(block)
            trailer = cur[self.block_size - codec.ROOTINFO_SIZE :]
        buf = codec.build_object_container(
            self.block_size, block, oc.parent, oc.next, oc.previous, objects, trailer, self.sfs2
        )
        self.put(block, buf)
        if used is None:
            used = codec.objects_used_bytes(objects)
        self.parsed[block] = ObjectContainer(
            codec.OBJECTCONTAINER_ID, 0, block, oc.parent, oc.next, oc.previous, tuple(objects),
            bytes(buf[used:]), self.sfs2, used,
        )  # fmt: skip

    async def _set_container_link(self, block: int, *, next: int | None = None, previous: int | None = None) -> None:
        buf = await self.modify(block, codec.OBJECTCONTAINER_ID)
        if next is not None:
            struct.pack_into(">I", buf, 16, next)
        if previous is not None:
            struct.pack_into(">I", buf, 20, previous)

    async def update_object(self, node: int, new: SfsObject, loc: Located | None = None) -> None:
        """Replace object ``node`` (same node number), moving it to another container
        of its directory when it no longer fits.  ``loc``: where the object is, when the
        caller located it and changed no object container since."""
        if loc is None:
            loc = await self.locate(node)
        oc = await self.container(loc.container)
        new_size = new.packed_size
        if new_size == loc.obj.packed_size:
            # Same size: patch the object's bytes in place.
            buf = await self.modify(loc.container, codec.OBJECTCONTAINER_ID)
            buf[loc.offset : loc.offset + new_size] = new.pack()
            self.parsed[loc.container] = codec.fast_replace(
                oc, checksum=0, objects=tuple(new if o.objectnode == node else o for o in oc.objects)
            )
            return
        objects = [new if o.objectnode == node else o for o in oc.objects]
        if new_size < loc.obj.packed_size:
            self.full_for.pop(oc.parent, None)
        used = oc.used - loc.obj.packed_size + new_size
        last = new_size if objects[-1] is new else objects[-1].packed_size
        if self._fits(loc.container, used - last, last):
            await self._write_container(loc.container, oc, objects, used)
            return
        await self._remove_from_container(loc)
        parent = oc.parent
        block = await self._place(parent, new)
        await self.set_node(node, data=block)

    async def _place(self, dir_node: int, obj: SfsObject) -> int:
        """Put ``obj`` into a container of directory ``dir_node``; the container block."""
        index = self.dir_index.get(dir_node)
        if index is not None:
            index[self.name_key(obj.name)] = obj.objectnode
        dloc = await self.locate(dir_node)
        d = dloc.obj
        block = d.firstdirblock
        size = obj.packed_size
        hint = self.full_for.get(dir_node)
        seen: set[int] = set()
        while block:
            if block in seen:
                raise ChainLoopError("directory container chain loops", block=block, field="next")
            seen.add(block)
            oc = await self.container(block)
            if self._fits(block, oc.used, size):
                # Append in place: the bytes after the last object are free.
                buf = await self.modify(block, codec.OBJECTCONTAINER_ID)
                cap = self._capacity(block)
                buf[oc.used : cap] = obj.pack() + bytes(cap - oc.used - size)  # zeros end the list
                self.parsed[block] = codec.fast_replace(
                    oc, checksum=0, objects=(*oc.objects, obj), tail=bytes(buf[oc.used + size :]), used=oc.used + size
                )
                return block
            block = 0 if d.bits & codec.OTYPE_QUICKDIR else oc.next
            if hint is not None and size >= hint:
                block = 0  # every container after the first is known to be too full
        # No room anywhere: the containers after the new one are all too full for
        # objects of this size (the scan above, or the hint, says so).
        self.full_for[dir_node] = max(size, hint) if hint is not None and size >= hint else size
        new = await self.alloc_admin()
        first = d.firstdirblock
        self.put(
            new, codec.build_object_container(self.block_size, new, dir_node, first, 0, [obj], b"", self.sfs2)
        )
        if first:
            await self._set_container_link(first, previous=new)
        d = (await self.locate(dir_node)).obj
        await self.update_object(dir_node, replace(d, size=SfsObject.dir_size_field(new, self.sfs2)))
        return new

    async def _remove_from_container(self, loc: Located) -> None:
        oc = await self.container(loc.container)
        index = self.dir_index.get(oc.parent)
        if index is not None and index.get(self.name_key(loc.obj.name)) == loc.obj.objectnode:
            del index[self.name_key(loc.obj.name)]
        self.full_for.pop(oc.parent, None)
        objects = [o for o in oc.objects if o.objectnode != loc.obj.objectnode]
        if objects or loc.container == self.root.rootobjectcontainer:
            await self._write_container(loc.container, oc, objects, oc.used - loc.obj.packed_size)
            return
        # The container is empty: unlink it from the directory's chain and free it.
        if oc.previous:
            await self._set_container_link(oc.previous, next=oc.next)
        else:
            d = (await self.locate(oc.parent)).obj
            if d.firstdirblock != loc.container:
                raise CorruptError("first container of a directory has a previous", block=loc.container, field="previous")
            await self.update_object(oc.parent, replace(d, size=SfsObject.dir_size_field(oc.next, self.sfs2)))
        if oc.next:
            await self._set_container_link(oc.next, previous=oc.previous)
        await self.free_admin(loc.container)

    # ------------------------------------------------------------------ hashing
    async def hash_add(self, dir_obj: SfsObject, node: int, name: bytes, *, data: int | None = None) -> None:
        """Link ``node`` at the head of its hash chain (and set its ``data`` too)."""
        h16 = codec.name_hash(name, self.case_sensitive)
        if dir_obj.hashtable == 0:
            # No hash table (``.recycled``): the handler still stores the name's hash.
            await self.set_node(node, data=data, next=0, hash16=h16)
            return
        hblock = self.check_pointer(dir_obj.hashtable, dir_obj.objectnode, "hashtable")
        buf = await self.modify(hblock, codec.HASHTABLE_ID)
        off = codec.HASHTABLE_HEADER + 4 * (h16 % codec.hash_chains(self.block_size))
        head = struct.unpack_from(">I", buf, off)[0]
        struct.pack_into(">I", buf, off, node)
        await self.set_node(node, data=data, next=head, hash16=h16)

    async def hash_remove(self, dir_obj: SfsObject, node: int, name: bytes) -> None:
        if dir_obj.hashtable == 0:
            return
        hblock = self.check_pointer(dir_obj.hashtable, dir_obj.objectnode, "hashtable")
        ht = codec.HashTable.unpack(await self.block(hblock, codec.HASHTABLE_ID))
        h16 = codec.name_hash(name, self.case_sensitive)
        chain = h16 % len(ht.hashentry)
        # The whole chain is walked before anything changes: a chain that loops or
        # holds a node twice is refused (unlinking the first copy of a repeated node
        # would leave the second behind, hashed under a name it no longer has).
        links: list[tuple[int, int]] = []  # (node, its next)
        seen: set[int] = set()
        cur = ht.hashentry[chain]
        while cur:
            if cur in seen:
                raise ChainLoopError(f"hash chain {chain} loops or repeats node {cur}", block=hblock, field="hashentry")
            seen.add(cur)
            on = await self.object_node(cur)
            links.append((cur, on.next))
            cur = on.next
        for i, (cur, nxt) in enumerate(links):
            if cur == node:
                if i:
                    await self.set_node(links[i - 1][0], next=nxt)
                else:
                    buf = await self.modify(hblock, codec.HASHTABLE_ID)
                    struct.pack_into(">I", buf, codec.HASHTABLE_HEADER + 4 * chain, nxt)
                await self.set_node(node, next=0)
                return
        raise CorruptError(f"object node {node} is missing from its hash chain", block=hblock, field="hashentry")

    # ------------------------------------------------------------------ objects
    async def add_object(self, dir_node: int, obj: SfsObject) -> int:
        """Create the node for ``obj`` (its objectnode field is filled in), place and
        hash it.  Returns the node number."""
        node = await self.create_node(0xFFFFFFFF)  # placeholder until placed
        obj = obj.evolve(objectnode=node)
        block = await self._place(dir_node, obj)
        d = (await self.locate(dir_node)).obj
        await self.hash_add(d, node, obj.name, data=block)  # one node update for both
        return node

    async def remove_object(self, loc: Located) -> None:
        self.dir_index.pop(loc.obj.objectnode, None)  # its node number may be reused
        self.full_for.pop(loc.obj.objectnode, None)
        oc = await self.container(loc.container)
        d = (await self.locate(oc.parent)).obj
        await self.hash_remove(d, loc.obj.objectnode, loc.obj.name)
        await self._remove_from_container(await self.locate(loc.obj.objectnode))
        await self.delete_node(loc.obj.objectnode)
        self.op_removed.append(loc.obj.objectnode)

    async def parent_of(self, node: int) -> int:
        loc = await self.locate(node)
        return (await self.container(loc.container)).parent

    # ------------------------------------------------------------------ extent B-tree
    async def _bpath(self, key: int) -> list[list[object]]:
        return [[b, list(bc.extents if bc.isleaf else bc.index), i, bool(bc.isleaf)] for b, bc, i in await self.extent_path(key)]

    def _write_bnode(self, block: int, isleaf: bool, entries: list[object]) -> None:
        if isleaf:
            buf = codec.build_bnode_container(self.block_size, block, True, self.sfs2, [], entries)  # type: ignore[arg-type]
        else:
            buf = codec.build_bnode_container(self.block_size, block, False, self.sfs2, entries, [])  # type: ignore[arg-type]
        self.put(block, buf)
        # Keep the parsed form (what a re-parse would give; the checksum comes at commit).
        nodesize = buf[15]
        self.parsed[block] = BNodeContainer(
            codec.BNODECONTAINER_ID, 0, block, len(entries), 1 if isleaf else 0, nodesize,
            () if isleaf else tuple(entries),  # type: ignore[arg-type]
            tuple(entries) if isleaf else (),  # type: ignore[arg-type]
            bytes(buf[codec.BNODECONTAINER_HEADER + len(entries) * nodesize :]),
        )  # fmt: skip

    async def _put_bnode(self, path: list[list[object]], level: int, entries: list[object]) -> None:
        block = int(path[level][0])  # type: ignore[call-overload]
        isleaf = bool(path[level][3])
        nodesize = codec.extent_node_size(self.sfs2) if isleaf else 8
        cap = codec.bnode_capacity(self.block_size, nodesize)
        if len(entries) <= cap:
            self._write_bnode(block, isleaf, entries)
            return
        half = len(entries) // 2
        left, right = entries[:half], entries[half:]
        if level == 0:
            a = await self.alloc_admin()
            b = await self.alloc_admin()
            self._write_bnode(a, isleaf, left)
            self._write_bnode(b, isleaf, right)
            self._write_bnode(
                block, False, [BNode(left[0].key, a), BNode(right[0].key, b)]  # type: ignore[attr-defined]
            )
            return
        nb = await self.alloc_admin()
        self._write_bnode(block, isleaf, left)
        self._write_bnode(nb, isleaf, right)
        parent = path[level - 1]
        pentries = list(parent[1])  # type: ignore[call-overload]
        pentries.insert(int(parent[2]) + 1, BNode(right[0].key, nb))  # type: ignore[call-overload, attr-defined]
        await self._put_bnode(path, level - 1, pentries)

    async def btree_insert(self, ext: ExtentBNode) -> None:
        trail = await self.extent_path(ext.key)
        block, leaf_bc, idx = trail[-1]
        if idx < len(leaf_bc.extents) and leaf_bc.extents[idx].key == ext.key:
            raise CorruptError(f"extent {ext.key} is already in the B-tree", block=block, field="key")
        nodesize = codec.extent_node_size(self.sfs2)
        if len(leaf_bc.extents) < codec.bnode_capacity(self.block_size, nodesize) and all(
            bc.index[i].key <= ext.key for _, bc, i in trail[:-1]
        ):
            # The common case (no split, no index key to lower): shift the later
            # entries in place and write the new one.
            entries = (*leaf_bc.extents[:idx], ext, *leaf_bc.extents[idx:])
            buf = await self.modify(block, codec.BNODECONTAINER_ID)
            pos = codec.BNODECONTAINER_HEADER + idx * nodesize
            end = codec.BNODECONTAINER_HEADER + (len(entries) - 1) * nodesize
            buf[pos + nodesize : end + nodesize] = buf[pos:end]
            fmt = ">IIII" if self.sfs2 else ">IIIH"
            struct.pack_into(fmt, buf, pos, ext.key, ext.next, ext.prev, ext.blocks)
            struct.pack_into(">H", buf, 12, len(entries))
            self.parsed[block] = codec.fast_replace(
                leaf_bc, checksum=0, nodecount=len(entries), extents=entries, tail=bytes(buf[end + nodesize :])
            )
            return
        path = [[b, list(bc.extents if bc.isleaf else bc.index), i, bool(bc.isleaf)] for b, bc, i in trail]
        leaf = path[-1]
        entries_l: list[object] = list(leaf[1])  # type: ignore[call-overload]
        # Keep index keys <= the smallest key below them (leftmost path only).
        for level in range(len(path) - 1):
            node = path[level]
            ientries: list[BNode] = node[1]  # type: ignore[assignment]
            i = int(node[2])  # type: ignore[call-overload]
            if ientries[i].key > ext.key:
                ientries[i] = BNode(ext.key, ientries[i].data)
                self._write_bnode(int(node[0]), False, list(ientries))  # type: ignore[call-overload]
        entries_l.insert(idx, ext)
        await self._put_bnode(path, len(path) - 1, entries_l)

    async def btree_update(self, ext: ExtentBNode) -> None:
        path = await self._bpath(ext.key)
        leaf = path[-1]
        entries: list[ExtentBNode] = leaf[1]  # type: ignore[assignment]
        idx = int(leaf[2])  # type: ignore[call-overload]
        if idx >= len(entries) or entries[idx].key != ext.key:
            raise CorruptError(f"extent {ext.key} is missing from the B-tree", block=int(leaf[0]), field="key")  # type: ignore[call-overload]
        entries[idx] = ext
        self._write_bnode(int(leaf[0]), True, list(entries))  # type: ignore[call-overload]

    async def btree_delete(self, key: int) -> None:
        path = await self._bpath(key)
        leaf = path[-1]
        entries: list[object] = list(leaf[1])  # type: ignore[call-overload]
        idx = int(leaf[2])  # type: ignore[call-overload]
        if idx >= len(entries) or entries[idx].key != key:
            raise CorruptError(f"extent {key} is missing from the B-tree", block=int(leaf[0]), field="key")  # type: ignore[call-overload]
        del entries[idx]
        level = len(path) - 1
        while True:
            node = path[level]
            block = int(node[0])  # type: ignore[call-overload]
            if entries or level == 0:
                self._write_bnode(block, bool(node[3]) if entries else True, entries)
                if entries and level > 0:
                    await self._merge_bnode(path, level, entries)
                return
            # An empty non-root container: free it and drop its entry from the parent.
            await self.free_admin(block)
            level -= 1
            parent = path[level]
            entries = list(parent[1])  # type: ignore[call-overload]
            del entries[int(parent[2])]  # type: ignore[call-overload]

    async def _merge_bnode(self, path: list[list[object]], level: int, entries: list[object]) -> None:
        """Merge an underfull container (a third full or less) with a neighbour when
        both fit in two thirds of one block: the right one's entries move into the
        left one, the right one is freed and dropped from the parent.  A root index
        left with one child takes that child's contents (the tree gets lower)."""
        isleaf = bool(path[level][3])
        nodesize = codec.extent_node_size(self.sfs2) if isleaf else 8
        cap = codec.bnode_capacity(self.block_size, nodesize)
        if len(entries) * 3 > cap:
            return
        parent = path[level - 1]
        pblock = int(parent[0])  # type: ignore[call-overload]
        pentries: list[BNode] = list((await self.bcontainer(pblock)).index)
        pidx = int(parent[2])  # type: ignore[call-overload]
        if pidx >= len(pentries) or pentries[pidx].data != int(path[level][0]):  # type: ignore[call-overload]
            return  # the parent changed under us (a split above): leave it
        if pidx + 1 < len(pentries):
            left_i = pidx
        elif pidx > 0:
            left_i = pidx - 1
        else:
            return
        lblock, rblock = pentries[left_i].data, pentries[left_i + 1].data
        left, right = await self.bcontainer(lblock), await self.bcontainer(rblock)
        if bool(left.isleaf) != isleaf or bool(right.isleaf) != isleaf:
            raise CorruptError("B-tree siblings of different kinds", block=pblock, field="isleaf")
        lents: list[object] = list(left.extents if isleaf else left.index)
        rents: list[object] = list(right.extents if isleaf else right.index)
        if (len(lents) + len(rents)) * 3 > cap * 2:
            return
        self._write_bnode(lblock, isleaf, lents + rents)
        await self.free_admin(rblock)
        del pentries[left_i + 1]
        if level - 1 == 0 and len(pentries) == 1:
            # The root index has one child left: the child moves into the root.
            self._write_bnode(pblock, isleaf, lents + rents)
            await self.free_admin(lblock)
            return
        self._write_bnode(pblock, False, list(pentries))

    async def sync_extents(self, node: int, old: list[tuple[int, int]], new: list[tuple[int, int]]) -> None:
        """Make the B-tree hold ``new`` as the extents of file ``node`` (was ``old``)."""

        def table(exts: list[tuple[int, int]]) -> dict[int, ExtentBNode]:
            out = {}
            for i, (start, count) in enumerate(exts):
                prev = exts[i - 1][0] if i else 0x80000000 | node
                nxt = exts[i + 1][0] if i + 1 < len(exts) else 0
                out[start] = ExtentBNode(start, nxt, prev, count)
            return out

        before, after = table(old), table(new)
        for key in before:
            if key not in after:
                await self.btree_delete(key)
        for key, ext in after.items():
            if key not in before:
                await self.btree_insert(ext)
            elif before[key] != ext:
                await self.btree_update(ext)
        self.extent_cache[node] = list(new)

    # ------------------------------------------------------------------ file blocks
    def grow_extents(self, node: int, extents: list[tuple[int, int]], count: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Allocate ``count`` more blocks for a file; (new extent list, new runs)."""
        hint = extents[-1][0] + extents[-1][1] if extents else self.data_hint
        runs = self.freemap.allocate(count, hint)
        for start, length in runs:
            self.fresh.update(range(start, start + length))
        out = list(extents)
        for start, length in runs:
            while length:
                if out and out[-1][0] + out[-1][1] == start and out[-1][1] < self.max_extent:
                    take = min(length, self.max_extent - out[-1][1])
                    out[-1] = (out[-1][0], out[-1][1] + take)
                else:
                    take = min(length, self.max_extent)
                    out.append((start, take))
                start += take
                length -= take
        if runs:
            self.data_hint = runs[-1][0] + runs[-1][1]
        return out, runs

    def shrink_extents(self, extents: list[tuple[int, int]], keep: int) -> list[tuple[int, int]]:
        """Keep the first ``keep`` blocks; free (hold) the rest."""
        out = []
        total = 0
        for start, count in extents:
            if total >= keep:
                self.freemap.mark_free(start, count)
            elif total + count > keep:
                k = keep - total
                out.append((start, k))
                self.freemap.mark_free(start + k, count - k)
            else:
                out.append((start, count))
            total += count
        return out

    @staticmethod
    def map_runs(extents: list[tuple[int, int]], first: int, count: int) -> list[tuple[int, int]]:
        """Disk runs (start, count) holding file blocks ``first .. first+count-1``."""
        runs: list[tuple[int, int]] = []
        fb = 0
        last = first + count - 1
        for start, n in extents:
            lo, hi = max(fb, first), min(fb + n - 1, last)
            if lo <= hi:
                disk = start + lo - fb
                if runs and runs[-1][0] + runs[-1][1] == disk:
                    runs[-1] = (runs[-1][0], runs[-1][1] + hi - lo + 1)
                else:
                    runs.append((disk, hi - lo + 1))
            fb += n
            if fb > last:
                break
        return runs

    async def adjust_deleted(self, files: int, blocks: int) -> None:
        """Change the root info's counters of what sits in ``.recycled``."""
        buf = await self.modify(self.root.rootobjectcontainer, codec.OBJECTCONTAINER_ID)
        off = self.block_size - codec.ROOTINFO_SIZE
        ri = codec.RootInfo.unpack(bytes(buf[off:]))
        # the stored counters may be anything (0xFFFFFFFF + 1 does not pack): clamp
        buf[off:] = replace(
            ri,
            deletedfiles=min(0xFFFFFFFF, max(0, ri.deletedfiles + files)),
            deletedblocks=min(0xFFFFFFFF, max(0, ri.deletedblocks + blocks)),
        ).pack()
        self.deleted_files = None  # the operation may still be undone: read it again

    # ------------------------------------------------------------------ commit
    async def _commit_extras(self) -> dict[int, bytearray]:
        """The blocks a commit adds to ``pending`` (nothing changed here): the dirty
        bitmap blocks from the free map, and the root container with the free count."""
        out: dict[int, bytearray] = {}
        for index in sorted(self.freemap.dirty_blocks):
            block = self.root.bitmapbase + index
            buf = bytearray(self.block_size)
            buf[codec.BLOCKHEADER_SIZE :] = self.freemap.encode_block(index, self.block_size - codec.BLOCKHEADER_SIZE)
            out[block] = self.finish(buf, codec.BITMAP_ID, block)
        roc = self.root.rootobjectcontainer
        buf = bytearray(await self.block(roc, codec.OBJECTCONTAINER_ID))
        off = self.block_size - codec.ROOTINFO_SIZE
        ri = codec.RootInfo.unpack(bytes(buf[off:]))
        buf[off:] = replace(ri, freeblocks=self.freemap.free_count).pack()
        out[roc] = buf
        return out

    async def _prepare_commit(self) -> None:
        """Bitmap blocks and the root info's free count into ``pending``; checksums."""
        roc = self.root.rootobjectcontainer
        await self.modify(roc, codec.OBJECTCONTAINER_ID)  # records its original
        self.pending.update(await self._commit_extras())
        self.freemap.dirty_blocks.clear()
        for data in self.pending.values():
            codec.set_checksum(data, self.sfs2)

    def _chain_blocks(self, count: int) -> list[int]:
        """``count`` blocks free now and in the committed state (not marked): the
        handler's TRST blocks are free blocks too (``savetransaction``: ``findspace``,
        never marked), and ours must also survive a crash that keeps the old state."""
        start = self.freemap.find_run(count, self.data_hint)
        if start < 0:
            start = self.freemap.find_run(count, 0)
        if start >= 0:
            return list(range(start, start + count))
        out: list[int] = []
        pos = 0
        while len(out) < count:
            b = self.freemap.next_free(pos)
            if b < 0 or b < pos:
                raise NoSpace("not enough free space for the SFS transaction records")
            out.append(b)
            pos = b + 1
        return out

    def has_pending(self) -> bool:
        return bool(self.pending or self.freemap.dirty_blocks or self.pending_data)

    def room_for(self, extra_blocks: int = 0) -> bool:
        """The cheap bound of ``chain_fits``, with ``extra_blocks`` more changed blocks:
        every changed block at its largest record; ``ceil(bytes / area) <= usable``
        written as ``bytes <= usable * area``."""
        fm = self.freemap
        changed = len(self.pending) + len(self.pending_data) + len(fm.dirty_blocks) + 1 + extra_blocks
        return changed * self._record_bound + 2 <= (fm.free_count - len(fm.held)) * self._chain_area

    async def chain_fits(self) -> bool:
        """Whether the records of the pending transaction (with the bitmap blocks and
        the root container a commit adds) fit in the blocks usable for its TRST chain.
        A bound first (every block at its largest record); when that does not fit (a
        nearly full volume) the records are computed, with room for checksums."""
        if self.room_for():
            return True
        extras = await self._commit_extras()
        ops = self._operations(extras)
        exact = sum(transactions.record_size(len(op.data)) + 8 for op in ops) + 2
        return transactions.storage_block_count(exact, self.block_size) <= self.freemap.usable_count()

    def _operations(self, extras: Mapping[int, bytes | bytearray] | None = None) -> list[transactions.Operation]:
        """One record per block the commit writes (``extras`` replacing pending
        contents), in ascending block order (the order of the handler's operation
        tree)."""
        ops: list[transactions.Operation] = []
        contents: dict[int, bytes | bytearray] = {**self.pending_data, **self.pending, **(extras or {})}
        for block in sorted(contents):
            new = bytes(contents[block])
            base = None if block in self.pending_data else self.originals.get(block, self.cache.get(block))
            if base is None:
                ops.append(transactions.Operation(block, transactions.OI_EMPTY, transactions.compress_from_zero(new)))
            elif base != new:
                ops.append(transactions.Operation(block, 0, transactions.compress(base, new)))
        return ops

    async def _write_runs(self, items: Mapping[int, bytes | bytearray]) -> None:
        for start, count in runs_of(list(items)):
            await self.io.write(start, b"".join(bytes(items[b]) for b in range(start, start + count)))

    async def commit(self) -> None:
        """Write the pending transaction (see module docstring).  Callers shield it
        from cancellation.  Raises the device's errors (DeviceGone, IOError): the
        volume on the device then holds the old state or an unfinished transaction
        that the next open (ours or the handler's) replays."""
        if not self.has_pending():
            return
        await self._prepare_commit()
        ops = self._operations()
        written = {op.blckno for op in ops}
        everything: dict[int, bytes | bytearray] = {**self.pending_data, **self.pending}
        contents = {b: c for b, c in everything.items() if b in written}
        if ops:
            stream = transactions.pack_operations(ops)
            try:
                chain = self._chain_blocks(transactions.storage_block_count(len(stream), self.block_size))
            except NoSpace:
                # Not reached while every operation passed ``chain_fits`` (the Volume
                # checks it); kept so a commit still happens, counted for the tests.
                chain = []
                self.unrecorded_commits += 1
            if chain:
                await self._write_runs(dict(transactions.storage_blocks(stream, chain, self.block_size, self.sfs2)))
                await self.io.flush()
                await self.io.write(self.tr_block, transactions.failure_block(self.tr_block, chain[0], self.block_size, self.sfs2))
                await self.io.flush()
            await self._write_runs(contents)
            await self.io.flush()
            if chain:
                # TROK must be durable before anything reuses the (free) chain blocks:
                # a replay after that would read records that are no longer there.
                await self.io.write(self.tr_block, transactions.ok_block(self.tr_block, self.block_size, self.sfs2))
                await self.io.flush()
        else:
            await self.io.flush()  # data written directly, nothing else changed
        for block, content in self.pending.items():
            self.cache[block] = bytes(content)
        self.pending.clear()
        self.pending_data.clear()
        self.originals.clear()
        self.fresh.clear()
        self.freemap.committed()


async def replay_journal(io: object, reader: SfsReader, apply: bool) -> str | None:
    """Finish (``apply``) or overlay in memory an amigafuse journal found at root OC + 2.

    Returns a note for the user, or None when there was nothing to do.  Raises
    CorruptError when the record is damaged (the caller opens read-only)."""
    tr = reader.root.rootobjectcontainer + 2
    data = await reader.raw(tr)
    block_id = struct.unpack_from(">I", data, 0)[0]
    if block_id != codec.JOURNAL_HEADER_ID:
        return None
    codec.check_block(data, tr, codec.JOURNAL_HEADER_ID, reader.sfs2)
    pairs: list[tuple[int, int]] = []
    block = tr
    seen: set[int] = set()
    data_pairs: list[tuple[int, int]] = []
    while block:
        if block in seen:
            raise ChainLoopError("journal record chain loops", block=block, field="next")
        seen.add(block)
        raw = await reader.raw(block)
        rid = struct.unpack_from(">I", raw, 0)[0]
        is_data = rid == codec.JOURNAL_DATA_ID and block != tr
        codec.check_block(raw, block, codec.JOURNAL_DATA_ID if is_data else codec.JOURNAL_HEADER_ID, reader.sfs2)
        rec = codec.JournalHeader.unpack(raw, block)
        (data_pairs if is_data else pairs).extend(rec.pairs)
        block = reader.check_pointer(rec.next, block, "next") if rec.next else 0
    copies: dict[int, bytes] = {}
    data_copies: dict[int, bytes] = {}
    for target, copy in pairs + data_pairs:
        reader.check_pointer(target, tr, "target")
        reader.check_pointer(copy, tr, "copy")
        content = await reader.io.read(copy, 1)
        if (target, copy) in data_pairs:
            data_copies[target] = content
            continue
        if not codec.checksum_ok(content, reader.sfs2) or struct.unpack_from(">I", content, 8)[0] != target:
            raise CorruptError("journal copy is damaged", block=copy, field="checksum")
        copies[target] = content
    if apply:
        for target, content in {**data_copies, **copies}.items():
            await reader.io.write(target, content)
        await reader.io.flush()
        ok = codec.finish_block(bytearray(reader.block_size), codec.TRANSACTIONOK_ID, tr, reader.sfs2)
        await reader.io.write(tr, bytes(ok))
        await reader.io.flush()
        reader.cache.clear()
        reader.parsed.clear()
        reader.leaf_refs.clear()
        reader.dir_index.clear()
        return f"an unfinished amigafuse transaction ({len(copies)} blocks) was replayed"
    reader.cache.clear()
    reader.parsed.clear()
    reader.leaf_refs.clear()
    reader.dir_index.clear()
    reader.cache.update(copies)
    if isinstance(reader, SfsWriter):
        reader.pending_data.update(data_copies)
    else:
        reader.overlay_data.update(data_copies)
    return f"an unfinished amigafuse transaction ({len(copies)} blocks) was applied in memory only (read-only)"


METADATA_IDS = frozenset({
    codec.ROOT_ID_SFS0, codec.ROOT_ID_SFS2, codec.OBJECTCONTAINER_ID, codec.HASHTABLE_ID, codec.SOFTLINK_ID,
    codec.NODECONTAINER_ID, codec.BNODECONTAINER_ID, codec.BITMAP_ID, codec.ADMINSPACECONTAINER_ID,
})  # fmt: skip


async def replay_handler_transaction(reader: SfsReader, apply: bool) -> str:
    """Finish (``apply``) or overlay in memory an unfinished transaction in the
    handler's format (TRFA at root OC + 2), written by the handler or by amigafuse.

    The steps follow the handler's mount-time replay (SFS 1.84 ``checkfortransaction``,
    ``loadtransaction``, ``writeoperations``, ``removetransactionfailure``): the TRFA
    block and every TRST block must carry their id, checksum and own block number; the
    records are read across the chain up to a zero length; each block is rebuilt from
    its on-disk contents (OI_EMPTY: from nothing) and written in ascending order; then
    TROK.  Stricter than the handler, nothing is written unless every record describes
    its whole block, no block has two records, none targets the chain or the TRFA
    block, and every rebuilt metadata block verifies (checksum, own block number);
    otherwise CorruptError (the caller opens read-only).  Rebuilt blocks that are not
    metadata are file data (amigafuse journals overwritten file data this way)."""
    tr = reader.root.rootobjectcontainer + 2
    head = await reader.raw(tr)
    codec.check_block(head, tr, codec.TRANSACTIONFAILURE_ID, reader.sfs2)
    block = codec.TransactionFailure.unpack(head).firsttransaction
    stream = bytearray()
    pos = 0  # the next record's header in ``stream``
    seen: set[int] = set()
    while block:
        reader.check_pointer(block, tr, "transaction chain")
        if block in seen:
            raise ChainLoopError("transaction storage chain loops", block=block, field="next")
        seen.add(block)
        data = await reader.io.read(block, 1)
        codec.check_block(data, block, codec.TRANSACTIONSTORAGE_ID, reader.sfs2)
        ts = codec.TransactionStorage.unpack(data)
        stream += ts.data
        while pos + 2 <= len(stream) and (length := struct.unpack_from(">H", stream, pos)[0]):
            pos += transactions.record_size(length)
        if pos + 2 <= len(stream):
            break  # the zero length ends the records; ``next`` past it is not followed
        block = ts.next
    ops = transactions.parse_operations(bytes(stream))
    rebuilt: dict[int, bytes] = {}
    for op in ops:
        if op.bits & transactions.OI_DELETE:
            continue
        reader.check_pointer(op.blckno, tr, "operation block")
        if op.blckno in rebuilt or op.blckno in seen or op.blckno == tr:
            raise CorruptError("two transaction records for one block, or one for the records themselves",
                               block=op.blckno, field="blckno")  # fmt: skip
        empty = bool(op.bits & transactions.OI_EMPTY)
        base = bytes(reader.block_size) if empty else await reader.io.read(op.blckno, 1)
        new = transactions.uncompress(base, op.data, empty=empty)
        block_id, _, own = struct.unpack_from(">III", new, 0)
        if block_id in METADATA_IDS and (not codec.checksum_ok(new, reader.sfs2) or own != op.blckno):
            raise CorruptError("a block rebuilt from the transaction does not verify", block=op.blckno, field="checksum")
        rebuilt[op.blckno] = new
    reader.cache.clear()
    reader.parsed.clear()
    reader.leaf_refs.clear()
    reader.dir_index.clear()
    if apply:
        for target, content in sorted(rebuilt.items()):
            await reader.io.write(target, content)
        await reader.io.flush()
        await reader.io.write(tr, transactions.ok_block(tr, reader.block_size, reader.sfs2))
        await reader.io.flush()
        return f"an unfinished SmartFilesystem transaction ({len(rebuilt)} blocks) was replayed"
    reader.cache.update(rebuilt)
    reader.overlay_data.update(rebuilt)
    return f"an unfinished SmartFilesystem transaction ({len(rebuilt)} blocks) was applied in memory only (read-only)"

