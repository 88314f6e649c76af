"""``check_volume`` for SFS: every structure is verified and every block accounted for.

What is checked
    both root blocks; the transaction block; every bitmap block; the admin-space
    container chain; the object-node tree (checksums, ownblock, full bits); the extent
    B+-tree (order, index keys); every directory from the root (container chain and
    back links, parent fields, each object's node pointing at its container, hash
    tables holding exactly the directory's objects with the right hash16); every file's
    extent chain (prev/next, blocks >= size); soft-link blocks; then the bitmap
    against the blocks in use (errors for used blocks marked free, warnings for leaks),
    the admin-space bits against the metadata blocks in use, and the root info's
    free-block count.

Repair (``repair=True``) rewrites only the bitmap and the root info free count from
what was found, and only when the tree itself has no errors.
"""

from __future__ import annotations

import re
import struct

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.blockdev.window import FsBlockIO
from amigafuse.errors import AmigaFuseError, CorruptError
from amigafuse.fs import CheckReport
from amigafuse.fs.sfs import codec
from amigafuse.fs.sfs.alloc import FreeMap
from amigafuse.fs.sfs.codec import AdminSpaceContainer, BNodeContainer, NodeContainer, SfsObject
from amigafuse.fs.sfs.reader import SfsReader, read_root, validate_root

MAX_ERRORS = 200
_NONZERO = re.compile(rb"[^\x00]")


class UsedMap:
    """One bit per block (set = in use), MSB first like the SFS bitmap; cheap in
    memory on large volumes."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bits = bytearray((total + 7) // 8)

    def test(self, b: int) -> bool:
        return bool(self.bits[b >> 3] & (0x80 >> (b & 7)))

    def mark(self, start: int, count: int) -> int:
        """Mark a run; the first block that was already marked, or -1."""
        end = start + count
        b = start
        while b < end and (b & 7 or end - b < 8):
            if self.test(b):
                return b
            self.bits[b >> 3] |= 0x80 >> (b & 7)
            b += 1
        nbytes = (end - b) // 8
        if nbytes:
            lo = b >> 3
            m = _NONZERO.search(self.bits, lo, lo + nbytes)
            if m is not None:
                return m.start() * 8 + next(k for k in range(8) if self.bits[m.start()] & (0x80 >> k))
            self.bits[lo : lo + nbytes] = b"\xff" * nbytes
            b += nbytes * 8
        while b < end:
            if self.test(b):
                return b
            self.bits[b >> 3] |= 0x80 >> (b & 7)
            b += 1
        return -1

    def as_int(self) -> int:
        return int.from_bytes(self.bits, "big")


def set_positions(value: int, nbytes: int, limit: int) -> list[int]:
    """The first ``limit`` set bits of a big-endian bit string held in ``value``."""
    raw = value.to_bytes(nbytes, "big")
    out: list[int] = []
    for m in _NONZERO.finditer(raw):
        byte = raw[m.start()]
        out.extend(m.start() * 8 + k for k in range(8) if byte & (0x80 >> k))
        if len(out) >= limit:
            break
    return out[:limit]


class _Checker:
    def __init__(self, r: SfsReader, report: CheckReport) -> None:
        self.r = r
        self.report = report
        self.meta: set[int] = set()  # metadata blocks in use (admin space)
        self.data = UsedMap(r.total_blocks)  # file data blocks in use
        self.data_count = 0
        self.nodes: dict[int, tuple[int, int, int]] = {}  # node -> (container, next, hash16)
        self.seen_nodes: set[int] = set()
        self.extents: dict[int, codec.ExtentBNode] = {}
        self.used_extents: set[int] = set()
        self.files = 0
        self.dirs = 0

    def error(self, text: str) -> None:
        if len(self.report.errors) < MAX_ERRORS:
            self.report.errors.append(text)

    async def block(self, block: int, expect: int) -> bytes | None:
        if not 0 < block < self.r.total_blocks:
            self.error(f"pointer to block {block} outside the volume (expected {codec.block_id_str(expect)})")
            return None
        try:
            data = await self.r.block(block, expect)
        except AmigaFuseError as exc:
            self.error(str(exc))
            return None
        return data

    # ------------------------------------------------------------------ node tree
    async def node_tree(self, block: int, depth: int) -> bool:
        """Walk a node container; returns whether it is full."""
        if depth > 16 or block in self.meta:
            self.error(f"object node tree loops or is too deep at block {block}")
            return True
        data = await self.block(block, codec.NODECONTAINER_ID)
        if data is None:
            return True
        self.meta.add(block)
        nc = NodeContainer.unpack(data)
        if nc.nodes == 1:
            for i, on in enumerate(nc.objectnodes):
                if on.data and on.data != 0xFFFFFFFF:  # all ones: reserved by format
                    self.nodes[nc.nodenumber + i] = (on.data, on.next, on.hash16)
            return all(on.data for on in nc.objectnodes)
        full = True
        for i, entry in enumerate(nc.node):
            if entry == 0:
                full = False
                continue
            child_full = await self.node_tree(entry >> self.r.shift, depth + 1)
            if bool(entry & 1) and not child_full:
                self.error(f"node container {block} entry {i} is marked full but has free nodes")
            full = full and bool(entry & 1)
        return full

    # ------------------------------------------------------------------ extent tree
    async def extent_tree(self, block: int, depth: int, low: int) -> int | None:
        """Walk a B-tree container; returns its smallest key."""
        if depth > 16 or block in self.meta:
            self.error(f"extent B-tree loops or is too deep at block {block}")
            return None
        data = await self.block(block, codec.BNODECONTAINER_ID)
        if data is None:
            return None
        self.meta.add(block)
        try:
            bc = BNodeContainer.unpack(data, block)
        except CorruptError as exc:
            self.error(str(exc))
            return None
        keys = [e.key for e in bc.extents] if bc.isleaf else [n.key for n in bc.index]
        if keys != sorted(set(keys)):
            self.error(f"B-tree container {block} keys are not strictly ascending")
        if keys and keys[0] < low:
            self.error(f"B-tree container {block} holds key {keys[0]} below its index key {low}")
        if bc.isleaf:
            for e in bc.extents:
                self.extents[e.key] = e
            return keys[0] if keys else None
        if not keys and depth:
            self.error(f"empty B-tree index container {block}")
        for n in bc.index:
            first = await self.extent_tree(n.data, depth + 1, n.key)
            if first is not None and first < n.key:
                self.error(f"B-tree index key {n.key} in block {block} is above its child's first key {first}")
        return keys[0] if keys else None

    # ------------------------------------------------------------------ directories
    async def directory(self, dir_obj: SfsObject, path: str, depth: int) -> None:
        self.dirs += 1
        if depth > 256:
            self.error(f"{path}: directories nested too deep (loop?)")
            return
        members: dict[int, SfsObject] = {}
        block = dir_obj.firstdirblock
        prev = 0
        while block:
            if block in self.meta:
                self.error(f"{path}: container chain loops or shares block {block}")
                break
            data = await self.block(block, codec.OBJECTCONTAINER_ID)
            if data is None:
                break
            self.meta.add(block)
            try:
                oc = codec.ObjectContainer.unpack(data, self.r.sfs2)
            except CorruptError as exc:
                self.error(f"{path}: {exc}")
                break
            if oc.parent != dir_obj.objectnode:
                self.error(f"{path}: container {block} has parent {oc.parent}, not {dir_obj.objectnode}")
            if oc.previous != prev:
                self.error(f"{path}: container {block} has previous {oc.previous}, expected {prev}")
            for obj in oc.objects:
                node = obj.objectnode
                if node in self.seen_nodes:
                    self.error(f"{path}: object node {node} appears twice")
                    continue
                self.seen_nodes.add(node)
                members[node] = obj
                where = self.nodes.get(node)
                if where is None or where[0] != block:
                    self.error(
                        f"{path}/{obj.name.decode('latin-1')}: node {node} points to "
                        f"{where[0] if where else 'nothing'}, object is in block {block}"
                    )
            prev, block = block, oc.next
        await self.hashtable(dir_obj, members, path)
        for obj in members.values():
            name = f"{path}/{obj.name.decode('latin-1')}"
            if obj.is_dir:
                await self.directory(obj, name, depth + 1)
            elif obj.is_softlink:
                data = await self.block(obj.data, codec.SOFTLINK_ID)
                if data is not None:
                    self.meta.add(obj.data)
            else:
                await self.file(obj, name)

    async def hashtable(self, dir_obj: SfsObject, members: dict[int, SfsObject], path: str) -> None:
        if dir_obj.hashtable == 0:
            return
        data = await self.block(dir_obj.hashtable, codec.HASHTABLE_ID)
        if data is None:
            return
        self.meta.add(dir_obj.hashtable)
        ht = codec.HashTable.unpack(data)
        if ht.parent != dir_obj.objectnode:
            self.error(f"{path}: hash table {dir_obj.hashtable} has parent {ht.parent}")
        hashed: set[int] = set()
        for chain, head in enumerate(ht.hashentry):
            node = head
            while node:
                if node in hashed:
                    self.error(f"{path}: hash chain {chain} loops or repeats node {node}")
                    break
                hashed.add(node)
                obj = members.get(node)
                where = self.nodes.get(node)
                if obj is None or where is None:
                    self.error(f"{path}: hash chain {chain} holds node {node}, not an entry of this directory")
                    break
                h16 = codec.name_hash(obj.name, self.r.case_sensitive)
                if where[2] != h16 or h16 % len(ht.hashentry) != chain:
                    self.error(f"{path}/{obj.name.decode('latin-1')}: wrong hash ({where[2]}, chain {chain})")
                node = where[1]
        for node, obj in members.items():
            if node not in hashed:
                self.error(f"{path}/{obj.name.decode('latin-1')}: missing from the directory's hash table")

    async def file(self, obj: SfsObject, path: str) -> None:
        self.files += 1
        key = obj.data
        prev = 0x80000000 | obj.objectnode
        blocks = 0
        steps = 0
        while key:
            steps += 1
            ext = self.extents.get(key)
            if ext is None or key in self.used_extents or steps > self.r.total_blocks:
                self.error(f"{path}: extent {key} missing from the B-tree or shared")
                return
            self.used_extents.add(key)
            if ext.prev != prev:
                self.error(f"{path}: extent {key} has prev {ext.prev:#x}, expected {prev:#x}")
            if ext.blocks == 0 or key + ext.blocks > self.r.total_blocks:
                self.error(f"{path}: extent {key} of {ext.blocks} blocks runs off the volume")
                return
            dup = self.data.mark(key, ext.blocks)
            if dup >= 0:
                self.error(f"{path}: block {dup} is used twice")
                return
            self.data_count += ext.blocks
            blocks += ext.blocks
            prev, key = key, ext.next
        need = (obj.size + self.r.block_size - 1) // self.r.block_size
        if blocks < need:
            self.error(f"{path}: {obj.size} bytes need {need} blocks, extents hold {blocks}")


async def check(device: BlockDevice, geometry: VolumeGeometry, repair: bool) -> CheckReport:
    """See the module docstring.  Damage becomes errors in the report; only device
    failures while repairing propagate."""
    report = CheckReport()
    try:
        return await _check(device, geometry, repair, report)
    except AmigaFuseError as exc:
        if report.repaired:
            raise
        report.errors.append(f"check stopped: {exc}")
        return report


async def _check(device: BlockDevice, geometry: VolumeGeometry, repair: bool, report: CheckReport) -> CheckReport:
    io = FsBlockIO(device, geometry.fs_block_size)
    try:
        root, notes = await read_root(io)
    except AmigaFuseError as exc:
        report.errors.append(str(exc))
        return report
    report.warnings.extend(notes)
    if root.blocksize != geometry.fs_block_size or root.totalblocks > io.block_count:
        report.errors.append(
            f"root says {root.totalblocks} blocks of {root.blocksize} bytes; the partition has "
            f"{io.block_count} of {geometry.fs_block_size}"
        )
        return report
    validate_root(root, io.block_count)
    r = SfsReader(io, root)
    c = _Checker(r, report)
    total = root.totalblocks
    # transaction block
    tr = root.rootobjectcontainer + 2
    tr_raw = await r.raw(tr)
    tr_id = struct.unpack_from(">I", tr_raw, 0)[0]
    if tr_id == codec.TRANSACTIONFAILURE_ID:
        report.errors.append(
            "an unfinished SmartFilesystem transaction (TRFA) is pending: mount the volume read-write "
            "(amigafuse or AmigaOS) once to replay it"
        )
    elif tr_id == codec.JOURNAL_HEADER_ID:
        report.errors.append("an unfinished amigafuse journal is pending; open the volume read-write to replay it")
    elif tr_id != codec.TRANSACTIONOK_ID or not codec.checksum_ok(tr_raw, root.sfs2):
        report.errors.append(f"transaction block {tr} is not a valid TROK block")
    c.meta.add(tr)
    # bitmap
    per = codec.blocks_per_bitmap(r.block_size)
    nbitmap = (total + per - 1) // per
    parts = []
    for i in range(nbitmap):
        data = await c.block(root.bitmapbase + i, codec.BITMAP_ID)
        parts.append(data[codec.BLOCKHEADER_SIZE :] if data else bytes(r.block_size - codec.BLOCKHEADER_SIZE))
    freemap = FreeMap(total, per, b"".join(parts))
    fixed = {0, 1, total - 1, *range(root.bitmapbase, root.bitmapbase + nbitmap)}
    # admin spaces
    spaces: dict[int, int] = {}  # space -> bits
    block = root.adminspacecontainer
    adm: list[int] = []
    while block:
        if block in adm or len(adm) > total:
            c.error(f"admin space container chain loops at {block}")
            break
        data = await c.block(block, codec.ADMINSPACECONTAINER_ID)
        if data is None:
            break
        adm.append(block)
        asc = AdminSpaceContainer.unpack(data)
        for a in asc.adminspace:
            if a.space:
                if a.space + 32 > total:
                    c.error(f"admin space at {a.space} runs off the volume")
                    continue
                spaces[a.space] = a.bits
        block = asc.next
    c.meta.update(adm)
    # root object container and trees
    for b in (root.rootobjectcontainer,):
        if await c.block(b, codec.OBJECTCONTAINER_ID) is not None:
            c.meta.add(b)
    await c.node_tree(root.objectnoderoot, 0)
    await c.extent_tree(root.extentbnoderoot, 0, 0)
    try:
        root_obj = (await r.locate(codec.ROOTNODE)).obj
    except AmigaFuseError as exc:
        report.errors.append(f"root directory unreadable: {exc}")
        return report
    c.seen_nodes.add(codec.ROOTNODE)
    await c.directory(root_obj, "", 0)
    for node in sorted(set(c.nodes) - c.seen_nodes)[:20]:
        report.warnings.append(f"object node {node} is in use but no directory holds its object")
    leaked_ext = set(c.extents) - c.used_extents
    if leaked_ext:
        report.warnings.append(f"{len(leaked_ext)} extents in the B-tree belong to no file")
    # admin bits vs metadata in use
    admin_used: set[int] = set()
    for space, bits in spaces.items():
        for k in range(32):
            if bits & (0x80000000 >> k):
                admin_used.add(space + k)
    for b in sorted(c.meta - admin_used)[:20]:
        c.error(f"metadata block {b} is not marked used in its admin space")
    leaked_admin = admin_used - c.meta
    if leaked_admin:
        report.warnings.append(f"{len(leaked_admin)} admin-space blocks are marked used but unreferenced")
    # bitmap vs blocks in use
    for b in sorted(c.meta):
        if c.data.test(b):
            c.error(f"block {b} is both metadata and file data")
    in_use = UsedMap(total)
    in_use.bits[:] = c.data.bits
    for b in sorted(fixed):
        if b < total and not in_use.test(b):
            in_use.mark(b, 1)
    for space in sorted(spaces):
        overlap = in_use.mark(space, 32)
        if overlap >= 0:
            c.error(f"block {overlap} of the admin space at {space} is also used by a file or twice")
    nbytes = len(in_use.bits)
    free_int = int.from_bytes(freemap.bits[:nbytes].ljust(nbytes, b"\0"), "big")
    used_int = in_use.as_int()
    bad_int = used_int & free_int
    if bad_int:
        count = bad_int.bit_count()
        for b in set_positions(bad_int, nbytes, 20):
            c.error(f"block {b} is in use but marked free in the bitmap")
        if count > 20:
            c.error(f"... {count - 20} more blocks in use are marked free")
    valid = ((1 << total) - 1) << (nbytes * 8 - total)
    leaked_int = ~free_int & ~used_int & valid
    leaked_count = leaked_int.bit_count()
    if leaked_count:
        report.warnings.append(
            f"{leaked_count} blocks are marked used in the bitmap but unreferenced "
            f"(first: {set_positions(leaked_int, nbytes, 8)})"
        )
    ri = await r.root_info()
    if ri.freeblocks != freemap.free_count:
        c.error(f"root info says {ri.freeblocks} free blocks, the bitmap {freemap.free_count}")
    if root.recycled:
        # The handler counts the files in .recycled (``setrecycledinfodiff``: one per
        # file, blocks of its size); its Info reports those blocks as free.
        try:
            rec = (await r.locate(codec.RECYCLEDNODE)).obj
            held = [loc.obj for loc in await r.dir_entries(rec)] if rec.is_dir else []
        except AmigaFuseError as exc:
            report.warnings.append(f".recycled is unreadable: {exc}")
            held = []
        files = [o for o in held if not o.is_dir and not o.is_softlink]
        blocks = sum((o.size + r.block_size - 1) // r.block_size for o in files)
        if (ri.deletedfiles, ri.deletedblocks) != (len(files), blocks):
            report.warnings.append(
                f"root info counts {ri.deletedfiles} files / {ri.deletedblocks} blocks in .recycled, "
                f"it holds {len(files)} / {blocks}"
            )
        report.stats.update(recycled_files=len(files), recycled_blocks=blocks)
    report.stats.update(
        files=c.files,
        directories=c.dirs,
        total_blocks=total,
        free_blocks=freemap.free_count,
        metadata_blocks=len(c.meta),
        data_blocks=c.data_count,
    )
    tree_errors = [e for e in report.errors if "bitmap" not in e and "root info" not in e]
    if repair and report.errors and not tree_errors:
        await _repair(io, r, total, per, nbitmap, in_use, report)
    return report


async def _repair(
    io: FsBlockIO, r: SfsReader, total: int, per: int, nbitmap: int, in_use: UsedMap, report: CheckReport
) -> None:
    bits = bytearray((nbitmap * per + 7) // 8)
    nbytes = len(in_use.bits)
    valid = ((1 << total) - 1) << (nbytes * 8 - total)
    bits[:nbytes] = (~in_use.as_int() & valid).to_bytes(nbytes, "big")
    body = r.block_size - codec.BLOCKHEADER_SIZE
    root = r.root
    free = 0
    for i in range(nbitmap):
        buf = bytearray(r.block_size)
        buf[codec.BLOCKHEADER_SIZE :] = bits[i * body : (i + 1) * body]
        codec.finish_block(buf, codec.BITMAP_ID, root.bitmapbase + i, r.sfs2)
        await io.write(root.bitmapbase + i, bytes(buf))
    free = int.from_bytes(bits, "big").bit_count()
    roc = root.rootobjectcontainer
    buf = bytearray(await io.read(roc, 1))
    off = r.block_size - codec.ROOTINFO_SIZE
    ri = codec.RootInfo.unpack(bytes(buf[off:]))
    from dataclasses import replace

    buf[off:] = replace(ri, freeblocks=free).pack()
    codec.set_checksum(buf, r.sfs2)
    await io.write(roc, bytes(buf))
    await io.flush()
    report.repaired.append(f"bitmap rebuilt from the blocks in use; root info free count set to {free}")
    report.errors.clear()
