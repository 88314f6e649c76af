"""The writable FFS Volume: every mutation of :class:`amigafuse.fs.api.Volume`.

Write ordering and cancellation
    Each mutation first *loads* (awaits) every block it will touch, then changes the
    cached metadata with no await in between, so a cancelled call changes nothing or
    everything.  File data goes to the device before the metadata that points at it;
    newly allocated blocks are marked in the bitmap only after their data is written.
    ``sync`` writes dirty metadata blocks (coalesced), then the bitmap pages, then the
    root, and flushes.

Write-back order
    A write-back writes, in this order: (1) the blocks nothing on the disk names yet
    (metadata allocated since the last write-back, ``_fresh``, and the staged data),
    (2) the other dirty metadata (existing blocks, which may now name blocks of (1)),
    (3) the bitmap pages, (4) the root.  Blocks freed meanwhile keep their old contents
    on the disk until the write-back ends (see "Freed blocks").  So a crash at any
    point of a write-back leaves every pointer on the disk naming a valid block, old or
    new: the tree walks, and validation (the bitmap-valid flag is clear while mounted)
    rebuilds the bitmap and mounts the volume.  What a crash in (2) can leave is a
    change half applied across blocks (an entry in both directories of a rename, a
    dircache record not matching its directory, a file's old size with new blocks):
    ``amigafuse check --repair`` reports and rebuilds what it can.

Freed blocks
    A block freed (deleted header, truncated data, dropped extension, dircache or
    comment block) is still named by the metadata on the disk until the next write-back,
    so file data must not go into it before then: it waits in ``_pending_free`` (marked
    used in the in-memory bitmap) and is marked free by the write-back once the metadata
    that no longer names it has been written.  A crash image thus holds the old tree
    intact, not new data in old headers.  Metadata blocks may take pending blocks
    (``_alloc``): they reach the disk only in a write-back, the same pass that writes
    what no longer names them.  ``statfs`` counts pending blocks as free; file data that
    needs them writes back first (``_write_at``).

Full volumes
    Every block a metadata change allocates inside its no-await section is counted and
    checked (``_room``) before that section starts, so NoSpace never leaves a change
    half done (an entry hashed in without its dircache record, or unhooked from its
    directory without its LNFS comment block).

Staged data
    Small data writes (a small file's whole contents, ``STAGE_MAX_WRITE_BYTES`` at most)
    are held in memory by :class:`StagedBlockIO` instead of costing one device request
    each.  They go out at the next write-back *together with* the dirty metadata, in one
    sorted pass of coalesced runs (a small file's header and data blocks are neighbours,
    so thousands of small files become a few large requests), still before the bitmap
    and the root; or alone when more than ``STAGE_LIMIT_BYTES`` are held, or on
    ``io.flush()``.  So for staged data "data before metadata" weakens to "data no later
    than its metadata" (same write-back pass; a crash inside that pass can leave a header
    whose data did not land, on a volume whose bitmap is marked invalid and will be
    validated).  Reads see staged blocks; a write-through of a block replaces its staged
    copy; freed blocks are dropped.

Bitmap-valid protocol
    Opening read-write clears the root's ``bm_flag`` on disk at once (AmigaOS would
    validate the volume if we crashed); ``close`` syncs, sets it again and flushes.  A
    volume found with the flag clear (or a damaged bitmap) is validated on a read-write
    open: the bitmap is rebuilt from the blocks reachable from the root.  If the walk
    finds damage the volume is opened read-only instead, with a note in ``info.notes``.
"""

from __future__ import annotations

import time
from dataclasses import replace

import trio

from amigafuse.amiga.dates import DateStamp
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice, ReadLease
from amigafuse.blockdev.window import FsBlockIO
from amigafuse.errors import (
    CorruptError,
    DirectoryNotEmpty,
    Exists,
    FileTooLarge,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotFound,
    ReadOnlyFilesystem,
    WriteProtected,
)
from amigafuse.fs.api import FIBF_ARCHIVE, SetAttrs, Stat, StatFs, Volume
from amigafuse.fs.ffs.format import encode_label
from amigafuse.fs.ffs.layout import (
    BM_INVALID,
    BM_VALID,
    MAX_COMMENT,
    ST_FILE,
    ST_LINKDIR,
    ST_LINKFILE,
    ST_SOFTLINK,
    ST_USERDIR,
    T_DATA,
    BitmapBlock,
    CommentBlock,
    DirCacheBlock,
    DirCacheRecord,
    EntryBlock,
    FileExtBlock,
    OfsDataBlock,
    RootBlock,
    evolve,
    hash_name,
    lnfs_comment_fits,
    make_bcpl,
    softlink_table,
    with_checksum,
)
from amigafuse.fs.ffs.volume import FfsVolumeBase, dircache_record, read_boot_and_root, runs

MAX_FILE_SIZE = 0xFFFFFFFF
ZERO_CHUNK = 1 << 20
DIRTY_SYNC_LIMIT = 1 << 14  # dirty metadata blocks that trigger a write-back


STAGE_MAX_WRITE_BYTES = 64 << 10  # data writes up to this size are staged
STAGE_LIMIT_BYTES = 4 << 20  # staged data beyond this is written out at once
STAGE_RUN_BLOCKS_BYTES = 1 << 20  # longest device request when writing staged data


def now() -> DateStamp:
    return DateStamp.from_unix(time.time())


class StagedBlockIO(FsBlockIO):
    """:class:`FsBlockIO` that can hold whole-block data writes in memory (see "Staged
    data" above).  ``read`` overlays staged blocks; ``write`` (write-through) replaces
    the staged copies of the blocks it writes; ``flush`` writes staged data first.

    Invariant: a block number is in ``_staged`` only while its newest contents are not
    on the device."""

    def __init__(self, device: BlockDevice, fs_block_size: int) -> None:
        super().__init__(device, fs_block_size)
        self._staged: dict[int, bytes] = {}

    @property
    def staged_bytes(self) -> int:
        return len(self._staged) * self.fs_block_size

    def stage(self, block: int, data: bytes | bytearray | memoryview) -> None:
        """Hold whole blocks ``data`` for blocks ``block``... (no I/O).  Raises
        WriteProtected, OutOfRange, ValueError as :meth:`write` would."""
        if self.device.read_only:
            raise WriteProtected("the volume's device is read-only")
        bs = self.fs_block_size
        if len(data) % bs:
            raise ValueError(f"write of {len(data)} bytes is not whole {bs}-byte blocks")
        count = len(data) // bs
        self._check(block, count)
        view = memoryview(data)
        for i in range(count):
            self._staged[block + i] = bytes(view[i * bs : (i + 1) * bs])

    def drop(self, blocks: list[int]) -> None:
        """Forget staged contents of ``blocks`` (freed: nobody reads them any more)."""
        if self._staged:
            for b in blocks:
                self._staged.pop(b, None)

    def _staged_in(self, block: int, count: int) -> list[int]:
        staged = self._staged
        if count <= len(staged):
            return [b for b in range(block, block + count) if b in staged]
        return [b for b in staged if block <= b < block + count]

    def _staged_copy(self, block: int, count: int) -> dict[int, bytes]:
        """The staged contents of blocks ``block``... now (a snapshot: the values are
        immutable ``bytes``)."""
        if not self._staged:
            return {}
        return {b: self._staged[b] for b in self._staged_in(block, count)}

    def _overlaid(self, raw: bytes | memoryview, block: int, hits: dict[int, bytes]) -> bytearray:
        """A copy of ``raw`` (device bytes of blocks ``block``...) with ``hits`` laid
        over it."""
        bs = self.fs_block_size
        buf = bytearray(raw)
        for b, data in hits.items():
            buf[(b - block) * bs : (b - block + 1) * bs] = data
        return buf

    # Reads and staging: the device read awaits, and meanwhile a block of the range may
    # be staged, restaged, written through, written out by flush_staged or dropped.
    # Both read paths take the staged copies before the device read and again after it
    # returns (no await after that), the later winning: a block staged at either moment
    # reads as its newest staged copy; one staged at neither reads as the device returned
    # it (its newest contents when the read started, or a write that raced it, as for
    # any two concurrent device requests).  A block staged when the read started but
    # written out or written through meanwhile reads as that staged copy: its newest
    # contents when the read started (the device read may predate the write).  Dropped
    # blocks are freed: nobody reads them.  The FFS volume adds more: nothing stages,
    # writes or drops while a data read is at the device outside its lock
    # (FfsVolumeBase's invariants), so there these cases do not even arise.

    async def read(self, block: int, count: int = 1) -> bytes:
        """:meth:`FsBlockIO.read` with staged blocks overlaid (see above)."""
        before = self._staged_copy(block, count)
        raw = await super().read(block, count)
        hits = {**before, **self._staged_copy(block, count)}
        return bytes(self._overlaid(raw, block, hits)) if hits else raw

    async def read_lease(self, block: int, count: int = 1) -> ReadLease:
        """:meth:`read` as a lease the caller releases: the device's own lease (its
        buffer lent, no copy) when none of the blocks is staged before or after the
        device read, else a lease on a copy with the staged blocks overlaid (the
        device's lease released before returning).  Raises as :meth:`read`; a
        cancelled or failed call holds no lease."""
        before = self._staged_copy(block, count)
        lease = await self._device_read_lease(block, count)
        # no await from here on: staging cannot change until the caller has the lease
        hits = {**before, **self._staged_copy(block, count)}
        if not hits:
            return lease
        with lease:
            return ReadLease.of(self._overlaid(lease.view, block, hits))

    async def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        if self._staged and len(data) % self.fs_block_size == 0:
            for b in self._staged_in(block, len(data) // self.fs_block_size):
                del self._staged[b]
        await super().write(block, data)

    async def flush_staged(self, extra: dict[int, bytes] | None = None) -> None:
        """Write every staged block and the whole blocks in ``extra`` (block -> bytes;
        they replace staged copies of the same blocks) together, in coalesced runs.
        DeviceError on failure (staged blocks not written stay staged)."""
        out = dict(self._staged)
        if extra:
            for b in extra:
                self._staged.pop(b, None)
            out.update(extra)
        if not out:
            return
        limit = max(1, STAGE_RUN_BLOCKS_BYTES // self.fs_block_size)
        for start, count in runs(sorted(out), limit=limit):
            chunk = [out[b] for b in range(start, start + count)]
            await super().write(start, b"".join(chunk))
            for i, data in enumerate(chunk):
                if self._staged.get(start + i) is data:  # not restaged meanwhile
                    del self._staged[start + i]

    async def flush(self) -> None:
        await self.flush_staged()
        await super().flush()


class FfsVolume(FfsVolumeBase, Volume):
    """An open FFS/OFS volume (DOS\\0-\\7), read and write."""

    opened_invalid = False
    _altered_at: float | None = None  # unix time of the last change not yet in the root

    def __init__(
        self, io: FsBlockIO, geometry: VolumeGeometry, dostype: int, root_block: int,
        root: RootBlock, block_count: int, read_only: bool,
    ) -> None:  # fmt: skip
        super().__init__(io, geometry, dostype, root_block, root, block_count, read_only)
        # freed since the last write-back: marked used until it (see "Freed blocks")
        self._pending_free: set[int] = set()
        # metadata blocks allocated since the last write-back from blocks that were
        # free on the disk: nothing there names them yet ("Write-back order")
        self._fresh: set[int] = set()

    # ================================================================== cache plumbing
    def _c(self, block: int) -> object:
        """A block this operation already loaded (an invariant, not a disk check)."""
        return self._meta[block]

    def _ce(self, block: int) -> EntryBlock:
        e = self._meta[block]
        assert isinstance(e, EntryBlock), block
        return e

    def _set(self, block: int, obj: object) -> None:
        self._meta[block] = obj
        self._dirty.add(block)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyFilesystem("the volume is mounted read-only" + (
                f" ({'; '.join(self.notes)})" if self.notes else ""))
        if self._closed:
            raise ReadOnlyFilesystem("the volume is closed")

    def _alloc(self, goal: int, count: int) -> list[int]:
        """``count`` free blocks near ``goal`` for *metadata* (written only by a
        write-back), marked used; blocks freed since the last write-back are taken when
        the bitmap has too few (see "Freed blocks").  NoSpace if there are fewer."""
        found = self.bitmap.find_free(goal, count)
        if len(found) + len(self._pending_free) < count:
            raise NoSpace(f"the volume is full ({self._free_blocks()} blocks free, {count} needed)")
        self.bitmap.mark_blocks(found, False)
        self._fresh.update(found)
        if len(found) < count:
            extra = sorted(self._pending_free)[: count - len(found)]
            self._pending_free.difference_update(extra)  # already marked used
            found = [*found, *extra]
        return found

    def _free(self, blocks: list[int]) -> None:
        """Forget ``blocks``; they become free at the next write-back ("Freed blocks")."""
        if isinstance(self.io, StagedBlockIO):
            self.io.drop(blocks)
        for b in blocks:
            if self.bitmap.in_range(b):
                self._pending_free.add(b)
            self._fresh.discard(b)
            self._meta.pop(b, None)
            self._dirty.discard(b)
            self._blists.pop(b, None)
            self._extents.pop(b, None)
            self._index.pop(b, None)

    def _free_blocks(self) -> int:
        """Blocks free now or at the next write-back."""
        return self.bitmap.free_count() + len(self._pending_free)

    def _room(self, count: int) -> None:
        """NoSpace unless ``count`` metadata blocks can be allocated (:meth:`_alloc`).
        Called before a no-await section, so a full volume refuses a change before it
        starts instead of in its middle."""
        if count > 0 and self._free_blocks() < count:
            raise NoSpace(f"the volume is full ({self._free_blocks()} blocks free, {count} needed)")

    def _dc_needs_block(
        self, dir_block: int, name: bytes, comment: bytes, leaving: int = 0, in_place: bool = False,
    ) -> bool:  # fmt: skip
        """Whether a record for ``name``/``comment`` added to the dircache of ``dir_block``
        (after the record of header ``leaving`` left it; ``in_place``: or replacing it,
        as :meth:`_dc_refresh` does) needs a new dircache block."""
        if not self.dircache:
            return False
        n = DirCacheRecord.FIXED + len(name) + 1 + len(comment)
        size = n + (n & 1)
        room = self.block_size - 24
        for i, b in enumerate(self._dc_blocks(dir_block)):
            recs = self._dc_records(b)
            kept = [r for r in recs if r.header != leaving]
            if i > 0 and not kept and recs and not in_place:
                continue  # emptied by the removal: it leaves the chain
            if sum(r.packed_size for r in kept) + size <= room:
                return False
        return True

    def _new_id(self, block: int) -> None:
        """Give the new object at ``block`` an id no live object has."""
        reused = block in self._gone  # its old id must not come back to life
        self._gone.discard(block)
        self._b2id.pop(block, None)
        if reused or block in self._id2b:
            fresh = self._next_fresh_id
            self._next_fresh_id += 1
            self._b2id[block] = fresh
            self._id2b[fresh] = block

    def _forget_id(self, block: int) -> None:
        oid = self._b2id.pop(block, None)
        if oid is not None:
            self._id2b.pop(oid, None)

    def _touch(self) -> None:
        """Note a change of the volume.  The root's v_ date ("last altered") is set to the
        time of the last change when the root is next written (:meth:`_write_back`), not
        on every change: rebuilding the root block costs more than most changes."""
        self._altered_at = time.time()
        self._dirty.add(self.root_block)

    def _apply_altered(self) -> None:
        if self._altered_at is not None:
            t = DateStamp.from_unix(self._altered_at)
            self._altered_at = None
            self._set(self.root_block, evolve(self.root, v_days=t.days, v_mins=t.minutes, v_ticks=t.ticks))

    def _set_dir_date(self, dir_block: int, t: DateStamp) -> None:
        if dir_block == self.root_block:
            self._set(dir_block, evolve(self.root, r_days=t.days, r_mins=t.minutes, r_ticks=t.ticks))
        else:
            self._set(dir_block, self._ce(dir_block).with_date(t))
            self._dc_refresh(dir_block)

    # ================================================================== directories
    def _table_of(self, dir_block: int) -> tuple[int, ...]:
        if dir_block == self.root_block:
            return self.root.ht
        return self._ce(dir_block).table

    def _set_slot(self, dir_block: int, slot: int, value: int) -> None:
        table = list(self._table_of(dir_block))
        table[slot] = value
        if dir_block == self.root_block:
            self._set(dir_block, evolve(self.root, ht=tuple(table)))
        else:
            self._set(dir_block, evolve(self._ce(dir_block), table=tuple(table)))

    async def _load_dir(self, dir_block: int, name: bytes) -> None:
        """Load the directory, the hash chain of ``name``, the dircache chain, and what
        changing the directory's own date needs (its parent's dircache)."""
        table = await self._dir_table(dir_block)
        head = table[hash_name(name, self.intl, self.block_size)]
        # most often every block of the chain is cached already: check without awaiting
        b = head
        for _ in range(self.block_count):
            obj = self._meta.get(b)
            if not b or not isinstance(obj, EntryBlock):
                break
            b = obj.hash_chain
        if b:
            await self._chain(dir_block, head)
        if self.dircache:
            first = self.root.extension if dir_block == self.root_block else self._ce(dir_block).extension
            if not first and any(table):
                # a new record would start a dircache that lacks every other entry
                raise CorruptError(
                    f"directory {dir_block} has entries but no dircache block; run amigafuse check --repair",
                    block=dir_block, field="extension",
                )  # fmt: skip
            await self._dircache_chain(dir_block)
            if dir_block != self.root_block:
                await self._load_parent_dc(dir_block)

    def _chain_cached(self, dir_block: int, slot: int) -> list[int]:
        out = []
        b = self._table_of(dir_block)[slot]
        while b:
            out.append(b)
            b = self._ce(b).hash_chain
        return out

    def _insert(self, dir_block: int, block: int) -> None:
        """Insert header ``block`` (cached) into its hash chain, sorted by block number."""
        e = self._ce(block)
        slot = hash_name(e.name, self.intl, self.block_size)
        chain = self._chain_cached(dir_block, slot)
        prev = 0
        for b in chain:
            if b < block:
                prev = b
        nxt = next((b for b in chain if b > block), 0)
        self._set(block, evolve(e, hash_chain=nxt, parent=dir_block))
        index = self._index.get(dir_block)
        if index is not None:
            index[self._key(e.name)] = block
        if prev:
            self._set(prev, evolve(self._ce(prev), hash_chain=block))
        else:
            self._set_slot(dir_block, slot, block)

    def _remove(self, dir_block: int, block: int) -> None:
        e = self._ce(block)
        slot = hash_name(e.name, self.intl, self.block_size)
        chain = self._chain_cached(dir_block, slot)
        i = chain.index(block)
        index = self._index.get(dir_block)
        if index is not None:
            index.pop(self._key(e.name), None)
        if i == 0:
            self._set_slot(dir_block, slot, e.hash_chain)
        else:
            self._set(chain[i - 1], evolve(self._ce(chain[i - 1]), hash_chain=e.hash_chain))
        self._set(block, evolve(e, hash_chain=0))

    async def _lookup_entry(self, dir_block: int, raw: bytes) -> tuple[int, EntryBlock] | None:
        if dir_block not in self._index:
            await self._entries(dir_block)  # builds the name index
        await self._load_dir(dir_block, raw)
        return await self._find(dir_block, raw)

    # ================================================================== dircache
    def _dc_blocks(self, dir_block: int) -> list[int]:
        first = self.root.extension if dir_block == self.root_block else self._ce(dir_block).extension
        out = []
        b = first
        while b:
            out.append(b)
            d = self._c(b)
            assert isinstance(d, DirCacheBlock)
            b = d.next_dirc
        return out

    def _dc_records(self, block: int) -> list[DirCacheRecord]:
        d = self._c(block)
        assert isinstance(d, DirCacheBlock)
        return d.decode_records()

    def _dc_write(self, block: int, dir_block: int, records: list[DirCacheRecord]) -> None:
        d = self._c(block)
        assert isinstance(d, DirCacheBlock)
        self._set(block, DirCacheBlock.build(self.block_size, block, dir_block, d.next_dirc, records))

    def _record_for(self, block: int) -> DirCacheRecord:
        e = self._ce(block)
        comment = e.inline_comment
        if self.lnfs and e.comment_block:  # pragma: no cover - DCFS and LNFS do not mix
            c = self._c(e.comment_block)
            assert isinstance(c, CommentBlock)
            comment = c.comment
        return dircache_record(block, e, comment)

    def _dc_add(self, dir_block: int, block: int) -> None:
        if not self.dircache:
            return
        rec = self._record_for(block)
        blocks = self._dc_blocks(dir_block)
        room = self.block_size - 24
        for b in blocks:
            recs = self._dc_records(b)
            if sum(r.packed_size for r in recs) + rec.packed_size <= room:
                self._dc_write(b, dir_block, [*recs, rec])
                return
        (new,) = self._alloc(blocks[-1] if blocks else dir_block, 1)
        self._set(new, DirCacheBlock.build(self.block_size, new, dir_block, 0, [rec]))
        if blocks:
            last = self._c(blocks[-1])
            assert isinstance(last, DirCacheBlock)
            self._set(blocks[-1], evolve(last, next_dirc=new))
        elif dir_block == self.root_block:
            self._set(dir_block, evolve(self.root, extension=new))
        else:
            self._set(dir_block, evolve(self._ce(dir_block), extension=new))

    def _dc_remove(self, dir_block: int, header: int) -> None:
        if not self.dircache:
            return
        blocks = self._dc_blocks(dir_block)
        for i, b in enumerate(blocks):
            recs = self._dc_records(b)
            keep = [r for r in recs if r.header != header]
            if len(keep) == len(recs):
                continue
            if not keep and i > 0:
                # an emptied block other than the first leaves the chain
                prev = self._c(blocks[i - 1])
                cur = self._c(b)
                assert isinstance(prev, DirCacheBlock) and isinstance(cur, DirCacheBlock)
                self._set(blocks[i - 1], evolve(prev, next_dirc=cur.next_dirc))
                self._free([b])
            else:
                self._dc_write(b, dir_block, keep)
            return

    def _dc_refresh(self, block: int) -> None:
        """Rewrite the dircache record of header ``block`` in its parent's dircache."""
        if not self.dircache:
            return
        e = self._ce(block)
        dir_block = e.parent
        rec = self._record_for(block)
        room = self.block_size - 24
        for b in self._dc_blocks(dir_block):
            recs = self._dc_records(b)
            for i, r in enumerate(recs):
                if r.header == block:
                    recs[i] = rec
                    if sum(x.packed_size for x in recs) <= room:
                        self._dc_write(b, dir_block, recs)
                    else:
                        self._dc_remove(dir_block, block)
                        self._dc_add(dir_block, block)
                    return

    async def _load_parent_dc(self, block: int) -> None:
        """Load what refreshing ``block``'s dircache record needs."""
        if self.dircache:
            e = await self._entry(block)
            if not e.parent and block != self.root_block:
                # _dc_refresh would look for the record in directory 0
                raise CorruptError(f"header {block} names no parent directory", block=block, field="parent")
            if e.parent:
                if e.parent != self.root_block:
                    await self._entry(e.parent)
                await self._dircache_chain(e.parent)

    # ================================================================== names/comments
    def _encode_comment(self, comment: str) -> bytes:
        try:
            raw = comment.encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidName("the comment has characters outside Latin-1") from None
        if len(raw) > MAX_COMMENT:
            raise NameTooLong(f"comments hold at most {MAX_COMMENT} characters")
        return raw

    def _set_name_comment(self, block: int, name: bytes, comment: bytes) -> None:
        """Name and comment of cached header ``block``; LNFS comment blocks as needed."""
        e = self._ce(block)
        if not self.lnfs:
            self._set(block, e.with_name_comment(name, comment))
            return
        if lnfs_comment_fits(name, comment):
            if e.comment_block:
                self._free([e.comment_block])
            self._set(block, e.with_name_comment(name, comment, 0))
            return
        cb = e.comment_block
        if not cb:
            (cb,) = self._alloc(block, 1)
        self._set(cb, CommentBlock.new(self.block_size, cb, block, comment))
        self._set(block, e.with_name_comment(name, b"", cb))

    async def _load_comment(self, block: int) -> bytes:
        e = await self._entry(block)
        return await self._comment(block, e)

    # ================================================================== creating
    async def _new_entry(
        self, dir_id: int, name: str, sec_type: int, protection: int = 0,
        real_entry: int = 0, target: bytes | None = None,
    ) -> int:  # fmt: skip
        self._writable()
        raw = self.encode_name(name)
        dir_block = await self._real_dir(dir_id)
        if await self._lookup_entry(dir_block, raw) is not None:
            raise Exists(f"{name!r} already exists")
        if dir_block != self.root_block:
            await self._load_parent_dc(dir_block)
        if real_entry:
            await self._entry(real_entry)
            await self._load_parent_dc(real_entry)
        table = None
        if target is not None:
            table = softlink_table(target, self.block_size)
        need = 2 if (sec_type == ST_USERDIR and self.dircache) else 1
        self._room(need + self._dc_needs_block(dir_block, raw, b""))
        # ---- no awaits below
        blocks = self._alloc(dir_block, need)
        block = blocks[0]
        t = now()
        e = EntryBlock.new(
            self.block_size, self.lnfs, header_key=block, sec_type=sec_type, parent=dir_block,
            name=raw, date=t, protect=protection,
        )  # fmt: skip
        if table is not None:
            e = evolve(e, table=table)
        if real_entry:
            real = self._ce(real_entry)
            e = evolve(e, real_entry=real_entry, next_link=real.next_link)
            self._set(real_entry, evolve(real, next_link=block))
        if need == 2:
            self._set(blocks[1], DirCacheBlock.build(self.block_size, blocks[1], block, 0, []))
            e = evolve(e, extension=blocks[1])
        if sec_type == ST_USERDIR:
            self._index[block] = {}
        self._new_id(block)
        self._set(block, e)
        self._insert(dir_block, block)
        self._dc_add(dir_block, block)
        self._set_dir_date(dir_block, t)
        self._touch()
        return block

    async def create(self, dir_id: int, name: str, *, protection: int = 0) -> Stat:
        async with self._locked():
            self._maybe_evict()
            block = await self._new_entry(dir_id, name, ST_FILE, protection)
            result = await self._stat_real(block, self._ce(block), self._ce(block).name)
            await self._autosync()
            return result

    async def mkdir(self, dir_id: int, name: str) -> Stat:
        async with self._locked():
            self._maybe_evict()
            block = await self._new_entry(dir_id, name, ST_USERDIR)
            result = await self._stat_real(block, self._ce(block), self._ce(block).name)
            await self._autosync()
            return result

    async def symlink(self, dir_id: int, name: str, target: str) -> Stat:
        async with self._locked():
            self._maybe_evict()
            try:
                raw = target.encode("latin-1")
            except UnicodeEncodeError:
                raise InvalidName("the link target has characters outside Latin-1") from None
            if not raw or b"\0" in raw or len(raw) >= (self.block_size // 4 - 56) * 4:
                raise InvalidArgument("the link target is empty, holds NUL or does not fit one block")
            block = await self._new_entry(dir_id, name, ST_SOFTLINK, target=raw)
            return await self._stat_real(block, self._ce(block), self._ce(block).name)

    async def link(self, object_id: int, dir_id: int, name: str) -> Stat:
        async with self._locked():
            self._maybe_evict()
            target = self._block_for(object_id)
            if target == self.root_block:
                raise InvalidArgument("the root cannot be hard-linked")
            await self._exists(target)
            t = await self._entry(target)
            if t.sec_type in (ST_LINKFILE, ST_LINKDIR):
                target = await self._link_target(target, t)
                t = await self._entry(target)
            if t.sec_type == ST_SOFTLINK:
                raise InvalidArgument("soft links cannot be hard-linked on FFS")
            kind = ST_LINKDIR if t.sec_type == ST_USERDIR else ST_LINKFILE
            block = await self._new_entry(dir_id, name, kind, real_entry=target)
            return await self._stat(block, self._ce(block))

    # ================================================================== file data
    async def write(self, object_id: int, offset: int, data: bytes) -> int:
        if offset < 0:
            raise InvalidArgument("negative offset")
        if offset + len(data) > MAX_FILE_SIZE:
            raise FileTooLarge("FFS files hold at most 4 GiB - 1 bytes")
        async with self._locked():
            self._maybe_evict()
            self._writable()
            block, e = await self._file(object_id)
            if not data:
                return 0
            size = e.byte_size
            while size < offset:  # the gap reads as zeros
                chunk = min(ZERO_CHUNK, offset - size)
                await self._write_at(block, size, bytes(chunk))
                size += chunk
            await self._write_at(block, offset, bytes(data))
            await self._autosync()
            return len(data)

    async def _write_at(self, block: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` <= size of file ``block``."""
        e = await self._entry(block)
        await self._load_parent_dc(block)
        size = e.byte_size
        end = offset + len(data)
        new_size = max(size, end)
        p = self.payload
        dlist, exts = await self._block_lists(block, e)
        old_count = len(dlist)
        need = self._data_count(new_size)
        first = offset // p
        last = (end - 1) // p
        if not self.ffs and need > old_count and old_count:
            first = min(first, old_count - 1)  # its next_data changes
        # blocks to add: found now, marked after the data is on the disk
        add = max(0, need - old_count)
        n = self.ht_size
        ext_need = max(0, -(-(max(need, old_count) - n) // n))
        add_ext = max(0, ext_need - len(exts))
        goal = dlist[-1] + 1 if dlist else block
        if self.bitmap.free_count() < add + add_ext and self._pending_free:
            await self._write_back()  # file data may use freed blocks only after it
        new_data = self.bitmap.find_free(goal, add)
        # extension blocks go to the far end of the free run the data grows into, so a
        # file written in pieces keeps its data contiguous (one request per read)
        new_exts = self.bitmap.find_free_run_end(new_data[-1] + 1 if new_data else goal, add_ext, set(new_data))
        if len(new_data) < add or len(new_exts) < add_ext:
            raise NoSpace(f"the volume is full ({self.bitmap.free_count()} blocks free)")

        def at(i: int) -> int:  # data block i of the grown file (no list copy)
            return dlist[i] if i < old_count else new_data[i - old_count]

        # data blocks first..last of the grown file (slices: C speed, not a call a block)
        targets = dlist[first : min(last + 1, old_count)]
        if last >= old_count:
            targets += new_data[max(0, first - old_count) : last + 1 - old_count]
        lo = first * p
        aligned = offset == lo and (end % p == 0 or end >= size)
        if self.ffs and aligned:
            # whole blocks (or the tail of the file): the data goes out as it is
            pad = (-len(data)) % p
            payload = data if not pad else data + bytes(pad)
            view = memoryview(payload)
            pos = 0
            for start, count in runs(targets):
                await self._data_write(start, view[pos * p : (pos + count) * p])
                pos += count
        else:
            # old contents of partly overwritten blocks
            buf = bytearray((last - first + 1) * p)
            old_hi = min(last, old_count - 1)
            if old_hi >= first:
                keep_end = min(size, (old_hi + 1) * p)
                if keep_end > lo:
                    old = await self._read_file(block, e, lo, keep_end - lo)
                    buf[: len(old)] = old
            buf[offset - lo : end - lo] = data
            if self.ffs:
                out = buf
            else:
                out = bytearray()
                total = old_count + add
                for k in range(len(targets)):
                    idx = first + k
                    valid = min(p, new_size - idx * p)
                    nxt = at(idx + 1) if idx + 1 < total else 0
                    piece = bytes(buf[k * p : k * p + valid]).ljust(p, b"\0")
                    d = OfsDataBlock(T_DATA, block, idx + 1, valid, nxt, 0, piece)
                    out += d.packed_with_checksum()
            bs = self.block_size
            view = memoryview(out)
            pos = 0
            for start, count in runs(targets):
                await self._data_write(start, view[pos * bs : (pos + count) * bs])
                pos += count
        # ---- metadata, no awaits below
        if new_data:
            self.bitmap.mark_blocks(new_data, False)
        if new_exts:
            self.bitmap.mark_blocks(new_exts, False)
            self._fresh.update(new_exts)
        t = now()
        if add or add_ext:
            grown = dlist if len(self._blists.get(block, ((), ()))[0]) == old_count else list(dlist)
            grown.extend(new_data)
            self._set_tables(block, grown, [*exts, *new_exts], changed_from=old_count)
        e = self._ce(block)
        self._set(block, evolve(
            e, byte_size=new_size, protect=e.protect & ~FIBF_ARCHIVE, days=t.days, mins=t.minutes, ticks=t.ticks,
        ))  # fmt: skip
        self._dc_refresh(block)
        self._touch()

    async def _data_write(self, start: int, data: memoryview) -> None:
        """File data for blocks ``start``...: staged when small (see "Staged data")."""
        io = self.io
        if isinstance(io, StagedBlockIO) and len(data) <= STAGE_MAX_WRITE_BYTES:
            io.stage(start, data)
            if io.staged_bytes > STAGE_LIMIT_BYTES:
                await io.flush_staged()
        else:
            await io.write(start, data)

    def _set_tables(self, block: int, data: list[int], exts: list[int], changed_from: int) -> None:
        """Store the data-block list in the header and extension blocks.  Tables from the
        one holding index ``changed_from - 1`` on are rebuilt (its extension pointer may
        change), the others already hold what they should."""
        n = self.ht_size
        first_table = max(0, (changed_from - 1) // n)
        ntables = 1 + len(exts)
        for k in range(first_table, ntables):
            chunk = data[k * n : (k + 1) * n]
            table = tuple([0] * (n - len(chunk)) + list(reversed(chunk)))
            nxt = exts[k] if k < len(exts) else 0
            if k == 0:
                e = self._ce(block)
                self._set(block, evolve(
                    e, table=table, high_seq=len(chunk), first_data=data[0] if data else 0, extension=nxt,
                ))  # fmt: skip
            else:
                xb = exts[k - 1]
                old = self._meta.get(xb)
                base = old if isinstance(old, FileExtBlock) else FileExtBlock.new(self.block_size, xb, block)
                self._set(xb, evolve(base, table=table, high_seq=len(chunk), parent=block, extension=nxt, header_key=xb))
        self._blists[block] = (data, exts)
        self._extents.pop(block, None)

    async def truncate(self, object_id: int, size: int) -> None:
        if size < 0:
            raise InvalidArgument("negative size")
        if size > MAX_FILE_SIZE:
            raise FileTooLarge("FFS files hold at most 4 GiB - 1 bytes")
        async with self._locked():
            self._maybe_evict()
            self._writable()
            block, e = await self._file(object_id)
            cur = e.byte_size
            while cur < size:
                chunk = min(ZERO_CHUNK, size - cur)
                await self._write_at(block, cur, bytes(chunk))
                cur += chunk
            if size < e.byte_size:
                await self._shrink(block, size)
            elif size == e.byte_size:
                await self._load_parent_dc(block)
                self._set(block, self._ce(block).with_date(now()))
                self._dc_refresh(block)
            await self._autosync()

    async def _shrink(self, block: int, size: int) -> None:
        e = await self._entry(block)
        await self._load_parent_dc(block)
        dlist, exts = await self._block_lists(block, e)
        keep = self._data_count(size)
        n = self.ht_size
        keep_ext = max(0, -(-(keep - n) // n))
        last_piece = None
        if not self.ffs and keep and keep <= len(dlist):
            # the new last OFS block: next_data 0 and its data_size
            raw = (await self._read_blocks([dlist[keep - 1]]))[0]
            d = OfsDataBlock.unpack(raw)
            valid = size - (keep - 1) * self.payload
            last_piece = evolve(d, next_data=0, data_size=valid,
                                 data=d.data[:valid].ljust(self.payload, b"\0")).packed_with_checksum()
            await self.io.write(dlist[keep - 1], last_piece)
        # ---- no awaits below
        self._free(dlist[keep:] + exts[keep_ext:])
        data = dlist[:keep]
        exts = exts[:keep_ext]
        self._set_tables(block, data, exts, changed_from=keep)
        # the last kept table must end the chain
        e = self._ce(block)
        if not exts:
            self._set(block, evolve(e, extension=0))
        else:
            x = self._c(exts[-1])
            assert isinstance(x, FileExtBlock)
            self._set(exts[-1], evolve(x, extension=0))
        e = self._ce(block)
        self._set(block, evolve(e, byte_size=size, protect=e.protect & ~FIBF_ARCHIVE).with_date(now()))
        self._dc_refresh(block)
        self._touch()

    # ================================================================== deleting
    async def _load_for_delete(self, block: int, e: EntryBlock) -> None:
        """Load what deleting header ``block`` touches (links, extension lists)."""
        if e.sec_type == ST_FILE:
            _, exts = await self._block_lists(block, e)
            if e.next_link:
                for x in exts:  # a promotion re-points them: they must be cached
                    await self._ext(x, block)
        if e.sec_type in (ST_LINKFILE, ST_LINKDIR):
            target = await self._link_target(block, e)
            t = await self._entry(target)
            nxt = t.next_link
            seen: set[int] = set()
            while nxt and nxt not in seen:
                seen.add(nxt)
                nxt = (await self._entry(nxt)).next_link
        if e.next_link:
            # promotion: the first link becomes the object; load its directory too
            nxt = e.next_link
            seen = set()
            while nxt and nxt not in seen:
                seen.add(nxt)
                le = await self._entry(nxt)
                nxt = le.next_link
            first = await self._entry(e.next_link)
            await self._load_dir(first.parent, first.name)
            if first.parent != self.root_block:
                await self._load_parent_dc(first.parent)
            if self.lnfs and e.comment_block:
                await self._comment_block(e.comment_block, block)
            if e.sec_type == ST_USERDIR and self.dircache:
                await self._dircache_chain(block)
        if self.lnfs and e.comment_block:
            await self._comment_block(e.comment_block, block)

    async def _ofs_rehome(self, block: int, new_owner: int) -> None:
        """OFS data blocks name their file header: rewrite them for a promoted link."""
        if self.ffs:
            return
        dlist, _ = self._blists[block]
        for start, count in runs(dlist):
            raw = await self.io.read(start, count)
            bs = self.block_size
            out = bytearray()
            for i in range(count):
                d = OfsDataBlock.unpack(raw[i * bs : (i + 1) * bs])
                out += evolve(d, header_key=new_owner).packed_with_checksum()
            await self.io.write(start, bytes(out))

    def _delete_entry(self, dir_block: int, block: int) -> None:
        """Unhook and free header ``block`` (already loaded with _load_for_delete)."""
        e = self._ce(block)
        t = now()
        self._remove(dir_block, block)
        self._dc_remove(dir_block, block)
        if e.sec_type in (ST_LINKFILE, ST_LINKDIR):
            # unhook from the target's link chain
            prev = e.real_entry
            while True:
                pe = self._ce(prev)
                if pe.next_link == block:
                    self._set(prev, evolve(pe, next_link=e.next_link))
                    if prev == e.real_entry:
                        pass
                    break
                if not pe.next_link:
                    break
                prev = pe.next_link
            self._free([block])
        elif e.next_link:
            self._promote(block)
        else:
            extra: list[int] = []
            if e.sec_type == ST_FILE:
                dlist, exts = self._blists[block]
                extra = dlist + exts
            if e.sec_type == ST_USERDIR and self.dircache:
                extra += self._dc_blocks(block)
            if self.lnfs and e.comment_block:
                extra.append(e.comment_block)
            self._forget_id(block)
            self._gone.add(block)
            self._free([block, *extra])
        self._set_dir_date(dir_block, t)
        self._touch()

    def _promote(self, block: int) -> None:
        """The object at ``block`` loses its name; its first hard link takes over."""
        e = self._ce(block)
        new = e.next_link
        le = self._ce(new)
        link_dir = le.parent
        comment = e.inline_comment
        cblock = e.comment_block
        moved = evolve(
            e, header_key=new, name_area=le.name_area, hash_chain=le.hash_chain, parent=link_dir,
            next_link=le.next_link, real_entry=0,
        )  # fmt: skip
        self._set(new, moved)
        # the object's old header is free from now on (pending: see "Freed blocks"), so
        # a comment block the link's longer name needs below can always be found
        self._meta.pop(block, None)
        self._dirty.discard(block)
        self._fresh.discard(block)
        self._pending_free.add(block)
        if self.lnfs:
            if cblock:
                c = self._c(cblock)
                assert isinstance(c, CommentBlock)
                self._set(cblock, evolve(c, owner=new))
            elif not lnfs_comment_fits(le.name, comment):
                # the link's name leaves no room for the comment in the shared field
                (cblock,) = self._alloc(new, 1)
                self._set(cblock, CommentBlock.new(self.block_size, cblock, new, comment))
                comment = b""
            self._set(new, moved.with_name_comment(le.name, comment if not cblock else b"", cblock))
        # the other links now point at the new header
        nxt = le.next_link
        while nxt:
            x = self._ce(nxt)
            self._set(nxt, evolve(x, real_entry=new))
            nxt = x.next_link
        if e.sec_type == ST_FILE:
            dlist, exts = self._blists.pop(block)
            self._extents.pop(block, None)
            for xb in exts:
                xe = self._c(xb)
                assert isinstance(xe, FileExtBlock)
                self._set(xb, evolve(xe, parent=new))
            self._blists[new] = (dlist, exts)
        else:
            self._index[new] = self._index.pop(block, {})
        if e.sec_type == ST_USERDIR and self.dircache:
            for db in self._dc_blocks(new):
                d = self._c(db)
                assert isinstance(d, DirCacheBlock)
                self._set(db, evolve(d, parent=new))
        # ids: the object keeps its id
        oid = self._id_for(block)
        self._b2id.pop(block, None)
        self._id2b[oid] = new
        self._b2id[new] = oid
        self._dc_refresh(new)

    async def unlink(self, dir_id: int, name: str) -> None:
        async with self._locked():
            self._maybe_evict()
            self._writable()
            raw = self.encode_name(name)
            dir_block = await self._real_dir(dir_id)
            found = await self._lookup_entry(dir_block, raw)
            if found is None:
                raise NotFound(f"{name!r} not found")
            block, e = found
            if e.sec_type == ST_USERDIR:
                raise IsADirectory(f"{name!r} is a directory")
            if e.sec_type == ST_LINKDIR:
                pass  # removing a link to a directory removes just the link
            await self._load_for_delete(block, e)
            if e.next_link and e.sec_type == ST_FILE and not self.ffs:
                # the OFS data blocks are rewritten to name the promoted link: once
                # started, this must finish together with the metadata change
                with trio.CancelScope(shield=True):
                    await self._ofs_rehome(block, e.next_link)
                    self._delete_entry(dir_block, block)
            else:
                self._delete_entry(dir_block, block)
            await self._autosync()

    async def rmdir(self, dir_id: int, name: str) -> None:
        async with self._locked():
            self._maybe_evict()
            self._writable()
            raw = self.encode_name(name)
            dir_block = await self._real_dir(dir_id)
            found = await self._lookup_entry(dir_block, raw)
            if found is None:
                raise NotFound(f"{name!r} not found")
            block, e = found
            if e.sec_type not in (ST_USERDIR, ST_LINKDIR):
                raise NotADirectory(f"{name!r} is not a directory")
            if e.sec_type == ST_USERDIR and any(e.table):
                raise DirectoryNotEmpty(f"{name!r} is not empty")
            await self._load_for_delete(block, e)
            if e.sec_type == ST_USERDIR and self.dircache:
                await self._dircache_chain(block)
            self._delete_entry(dir_block, block)
            await self._autosync()

    # ================================================================== rename
    async def rename(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str) -> None:
        async with self._locked():
            self._maybe_evict()
            self._writable()
            sraw = self.encode_name(src_name)
            draw = self.encode_name(dst_name)
            sdir = await self._real_dir(src_dir)
            ddir = await self._real_dir(dst_dir)
            found = await self._lookup_entry(sdir, sraw)
            if found is None:
                raise NotFound(f"{src_name!r} not found")
            block, e = found
            is_dir = e.sec_type in (ST_USERDIR, ST_LINKDIR)
            if e.sec_type == ST_USERDIR:
                # not into itself or below it
                d = ddir
                hops = 0
                while d and d != self.root_block:
                    if d == block:
                        raise InvalidArgument(f"cannot move {src_name!r} into itself")
                    d = (await self._entry(d)).parent
                    hops += 1
                    if hops > self.block_count:
                        raise InvalidArgument("directory parents loop")
            dst = await self._lookup_entry(ddir, draw)
            # loaded before the destination goes: no await may fail or be cancelled
            # between deleting it and moving the source (rename is all or nothing)
            comment = await self._load_comment(block)
            if dst is not None and dst[0] != block:
                dblock, de = dst
                same = False
                if de.sec_type in (ST_LINKFILE, ST_LINKDIR) and de.real_entry == block:
                    same = True
                if e.sec_type in (ST_LINKFILE, ST_LINKDIR) and (e.real_entry == dblock or e.real_entry == de.real_entry):
                    same = True
                if same:
                    return  # POSIX: both names are the same object, nothing to do
                d_is_dir = de.sec_type in (ST_USERDIR, ST_LINKDIR)
                if is_dir and not d_is_dir:
                    raise NotADirectory(f"{dst_name!r} is not a directory")
                if d_is_dir and not is_dir:
                    raise IsADirectory(f"{dst_name!r} is a directory")
                if de.sec_type == ST_USERDIR and any(de.table):
                    raise DirectoryNotEmpty(f"{dst_name!r} is not empty")
                await self._load_for_delete(dblock, de)
                if de.next_link and de.sec_type == ST_FILE and not self.ffs:
                    with trio.CancelScope(shield=True):
                        await self._ofs_rehome(dblock, de.next_link)
                        self._delete_entry(ddir, dblock)
                else:
                    self._delete_entry(ddir, dblock)
                # reload: deleting may have changed cached chains (still loaded)
            await self._load_dir(ddir, draw)
            await self._load_dir(sdir, sraw)
            if ddir != self.root_block:
                await self._load_parent_dc(ddir)
            if sdir != self.root_block:
                await self._load_parent_dc(sdir)
            need = int(self._dc_needs_block(ddir, draw, comment, leaving=block if sdir == ddir else 0))
            if self.lnfs and not self._ce(block).comment_block and not lnfs_comment_fits(draw, comment):
                need += 1
            self._room(need)
            # ---- no awaits below
            t = now()
            self._remove(sdir, block)
            self._dc_remove(sdir, block)
            self._set_name_comment(block, draw, comment)
            self._set(block, evolve(self._ce(block), parent=ddir))
            self._insert(ddir, block)
            self._dc_add(ddir, block)
            self._set_dir_date(sdir, t)
            if ddir != sdir:
                self._set_dir_date(ddir, t)
            self._touch()
            await self._autosync()

    # ================================================================== attributes
    async def setattr(self, object_id: int, attrs: SetAttrs) -> Stat:
        async with self._locked():
            self._maybe_evict()
            self._writable()
            block = self._block_for(object_id)
            if block == self.root_block:
                if attrs.date is not None:
                    d = attrs.date
                    self._set(block, evolve(self.root, r_days=d.days, r_mins=d.minutes, r_ticks=d.ticks))
                    self._touch()
                if attrs.comment:
                    raise InvalidArgument("the root directory of an FFS volume cannot hold a comment")
                # the root has no protection bits or owner on FFS: those are ignored
                return self._root_stat()
            await self._exists(block)
            e = await self._entry(block)
            if e.sec_type in (ST_LINKFILE, ST_LINKDIR):
                block = await self._link_target(block, e)
                e = await self._entry(block)
            await self._load_parent_dc(block)
            if attrs.comment is not None or self.lnfs:
                await self._load_comment(block)  # a new comment, or LNFS comment blocks
            new_comment = self._encode_comment(attrs.comment) if attrs.comment is not None else None
            if new_comment is not None:
                need = int(self._dc_needs_block(e.parent, e.name, new_comment, leaving=block, in_place=True))
                if self.lnfs and not e.comment_block and not lnfs_comment_fits(e.name, new_comment):
                    need += 1
                self._room(need)
            # ---- no awaits below
            if new_comment is not None:
                self._set_name_comment(block, e.name, new_comment)
            e = self._ce(block)
            changes: dict[str, int] = {}  # one evolve for all of them (every release makes one)
            if attrs.protection is not None:
                changes["protect"] = attrs.protection & 0xFFFFFFFF
            if attrs.date is not None:
                changes.update(days=attrs.date.days, mins=attrs.date.minutes, ticks=attrs.date.ticks)
            if attrs.uid is not None:
                changes["uid"] = attrs.uid & 0xFFFF
            if attrs.gid is not None:
                changes["gid"] = attrs.gid & 0xFFFF
            if changes:
                e = evolve(e, **changes)
            self._set(block, e)
            self._dc_refresh(block)
            self._touch()
            return await self._stat_real(block, self._ce(block), self._ce(block).name)

    async def set_label(self, label: str) -> None:
        async with self._locked():
            self._writable()
            raw = encode_label(label)
            self._set(self.root_block, evolve(self.root, name_area=make_bcpl(raw, 32)))
            self._touch()

    async def statfs(self) -> StatFs:
        st = await super().statfs()
        return replace(st, free_blocks=self._free_blocks())

    # ================================================================== write-back
    async def _autosync(self) -> None:
        if len(self._dirty) > DIRTY_SYNC_LIMIT:
            await self._write_back()

    async def _write_back(self) -> None:
        """Write staged data and new metadata blocks (together, coalesced), then the
        other dirty metadata blocks, then the bitmap pages, then the root (see "Write-back
        order")."""
        bs = self.block_size
        packed = {b: self._pack(self._meta[b]) for b in self._dirty if b != self.root_block}
        fresh = self._fresh
        new = {b: raw for b, raw in packed.items() if b in fresh}
        old = {b: raw for b, raw in packed.items() if b not in fresh}
        for phase in (new, old):
            if isinstance(self.io, StagedBlockIO):
                await self.io.flush_staged(phase)  # the staged data goes with the first
            else:
                for start, count in runs(sorted(phase)):
                    await self.io.write(start, b"".join(phase[b] for b in range(start, start + count)))
        self._dirty.difference_update(packed)
        fresh.clear()
        if self._pending_free:
            # nothing on the disk names them now but the root (written last; the
            # bitmap-valid flag is clear while mounted, so a crash before it is repaired)
            self.bitmap.mark_blocks(sorted(self._pending_free), True)
            self._pending_free.clear()
        for page in sorted(self.bitmap.dirty_pages):
            await self.io.write(self.bitmap_blocks[page], BitmapBlock.with_map(self.bitmap.page_map(page)).pack())
            self.bitmap.dirty_pages.discard(page)
        self._apply_altered()
        if self.root_block in self._dirty:
            await self.io.write(self.root_block, self.root.packed_with_checksum())
            self._dirty.discard(self.root_block)
        _ = bs

    def _pack(self, obj: object) -> bytes:
        if isinstance(obj, (EntryBlock, FileExtBlock, DirCacheBlock, CommentBlock, RootBlock)):
            return with_checksum(obj.pack())
        raise AssertionError(f"cannot pack {type(obj).__name__}")

    async def sync(self) -> None:
        async with self._locked():
            if self.read_only or self._closed:
                return
            await self._write_back()
            await self.io.flush()

    async def close(self) -> None:
        """Write everything, set the bitmap-valid flag, flush.  Shielded from
        cancellation: a close that started finishes (or fails with DeviceError)."""
        with trio.CancelScope(shield=True):
            async with self._locked():
                if self._closed:
                    return
                if not self.read_only:
                    await self._write_back()
                    self._set(self.root_block, evolve(self.root, bm_flag=BM_VALID))
                    await self._write_back()
                    await self.io.flush()
                self._closed = True

    async def _mark_mounted(self) -> None:
        """Clear the bitmap-valid flag on the disk while we are mounted read-write."""
        self._set(self.root_block, evolve(self.root, bm_flag=BM_INVALID))
        await self._write_back()
        await self.io.flush()

    # ================================================================== validation
    def _rebuild_bitmap(self, used: set[int]) -> None:
        self._pending_free.clear()  # what is not used is free in the rebuilt bitmap
        self.bitmap.set_all(True)
        for b in used:
            if self.bitmap.in_range(b):
                self.bitmap.mark(b, False)
        self.bitmap_ok = True

    async def _rebuild_dircache(self, dir_block: int) -> None:
        """Replace the dircache of a directory by records built from its entries."""
        entries = await self._entries(dir_block)
        try:
            old = [b for b, _ in await self._dircache_chain(dir_block)]
        except Exception:
            old = []
        comments = {b: await self._comment(b, e) for b, e in entries}
        if dir_block != self.root_block:
            await self._entry(dir_block)
        # ---- no awaits below
        recs = [dircache_record(b, e, comments[b]) for b, e in entries]
        room = self.block_size - 24
        groups: list[list[DirCacheRecord]] = [[]]
        fill = 0
        for r in recs:
            if fill + r.packed_size > room:
                groups.append([])
                fill = 0
            groups[-1].append(r)
            fill += r.packed_size
        blocks = old[: len(groups)]
        for b in old[len(groups):]:
            self._free([b])
        if len(blocks) < len(groups):
            blocks += self._alloc(dir_block, len(groups) - len(blocks))
        for i, (b, g) in enumerate(zip(blocks, groups, strict=True)):
            nxt = blocks[i + 1] if i + 1 < len(blocks) else 0
            self._set(b, DirCacheBlock.build(self.block_size, b, dir_block, nxt, g))
        if dir_block == self.root_block:
            self._set(dir_block, evolve(self.root, extension=blocks[0]))
        else:
            self._set(dir_block, evolve(self._ce(dir_block), extension=blocks[0]))

    async def repair(self, used: set[int], bad_dircache: set[int]) -> list[str]:
        """Fix what ``check`` found and can fix safely; returns what was done."""
        async with self._locked():
            self._writable()
            done = []
            for d in sorted(bad_dircache):
                await self._rebuild_dircache(d)
                done.append(f"rebuilt the dircache of directory {d}")
            if bad_dircache:
                # new dircache blocks changed what is used
                used = await self.walk()
            self._rebuild_bitmap(used)
            done.append("rebuilt the bitmap from the blocks in use")
            return done


async def open_volume(
    device: BlockDevice, geometry: VolumeGeometry, read_only: bool, *, validate: bool = True
) -> FfsVolume:
    """Open the FFS volume on ``device`` (the partition window).

    Read-write: a volume whose bitmap is marked invalid (or damaged) is validated first
    (bitmap rebuilt from the reachable blocks); if the tree is damaged the volume is
    opened read-only with a note.  ``validate=False`` (the checker) skips that.  Raises
    CorruptError when there is no valid FFS volume, DeviceError on I/O failure."""
    io, dostype, count, root_block, root = await read_boot_and_root(device, geometry)
    ro = read_only or device.read_only
    if not ro:
        io = StagedBlockIO(io.device, io.fs_block_size)
    vol = FfsVolume(io, geometry, dostype, root_block, root, count, ro)
    await vol._load_bitmap()
    vol.opened_invalid = root.bm_flag != BM_VALID
    if ro or not validate:
        if vol.opened_invalid:
            vol._note("the bitmap is marked invalid (not closed cleanly): free space may be wrong")
        return vol
    if vol.opened_invalid or not vol.bitmap_ok:
        if len(vol.bitmap_blocks) < vol.bitmap.pages:
            vol.read_only = True
            vol._note("mounted read-only: the bitmap blocks cannot be found; run amigafuse check")
            return vol
        errors: list[str] = []
        used = await vol.walk(errors)
        if errors:
            vol.read_only = True
            vol._note(f"mounted read-only: the volume needs validation but is damaged ({errors[0]}); run amigafuse check")
            return vol
        vol._rebuild_bitmap(used)
        vol._note("the bitmap was invalid and has been rebuilt (volume validated)")
        if vol.dircache:
            from amigafuse.fs.ffs.check import stale_dircaches  # check imports this module

            stale = await stale_dircaches(vol)
            if stale:
                await vol.repair(used, stale)
                vol._note(f"the dircache of {len(stale)} directories did not match them and has been rebuilt")
    await vol._mark_mounted()
    return vol
