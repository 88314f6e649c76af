"""The FFS/OFS Volume (DOS\\0-\\7): reading, and (in :mod:`.writer`) writing.

Invariants
    * One ``trio.Lock`` (``self._lock``) serialises every public operation, so between
      two awaits inside an operation nothing else changes the volume.  One exception:
      ``read`` finds the device ranges of the data under the lock, then releases it and
      reads them (``self._data_reads`` counts such reads), so several reads can be at the
      device at once (the driver takes 16).  ``_locked`` waits, holding the lock (so no
      new read starts), until no such read is in flight: no operation can free, reuse or
      overwrite blocks a read is still reading.  Metadata changes
      are made in the block cache without awaiting in between, after everything they
      need has been read, so a cancelled call leaves the cache either unchanged or
      changed entirely.
    * ``self._meta`` caches decoded metadata blocks (root, headers, extension, dircache,
      comment blocks).  ``self._dirty`` lists cached blocks not yet written; ``sync``
      writes them (bitmap pages after the blocks, the root last) and flushes.
    * Object ids are header block numbers, except after a hard-link promotion moved an
      object's header: ``_id2b``/``_b2id`` keep the indirection.
    * Every pointer read from the disk is range-checked; every chain walk is bounded by
      the volume size and guarded against loops (ChainLoopError).
"""

from __future__ import annotations

import bisect
import logging
import struct
from typing import Any

import trio

from amigafuse.amiga.dates import DateStamp
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice, ReadLease
from amigafuse.blockdev.window import FsBlockIO
from amigafuse.errors import (
    ChainLoopError,
    ChecksumError,
    CorruptError,
    DeviceError,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    NotFound,
)
from amigafuse.fs.api import Kind, Stat, StatFs, VolumeInfo
from amigafuse.fs.ffs.bitmap import Bitmap
from amigafuse.fs.ffs.layout import (
    BM_VALID,
    MAX_COMMENT,
    MAX_NAME_LNFS,
    MAX_NAME_STD,
    ST_FILE,
    ST_LINKDIR,
    ST_LINKFILE,
    ST_ROOT,
    ST_SOFTLINK,
    ST_USERDIR,
    T_COMMENT,
    T_DATA,
    T_DIRCACHE,
    T_HEADER,
    BitmapBlock,
    BitmapExtBlock,
    BootBlock,
    CommentBlock,
    DirCacheBlock,
    DirCacheRecord,
    EntryBlock,
    FileExtBlock,
    OfsDataBlock,
    RootBlock,
    dostype_flags,
    first_bad_ofs_block,
    hash_name,
    runs,
    scan_ext_chain,
    table_size,
    upper_name,
    verify_checksum,
)
from amigafuse.fs.ffs.reader import lease_bytes, read_planned
from amigafuse.fs.locking import VolumeLock

log = logging.getLogger(__name__)

ENTRY_TYPES = (ST_USERDIR, ST_FILE, ST_SOFTLINK, ST_LINKFILE, ST_LINKDIR)
META_CACHE_LIMIT = 1 << 16  # decoded blocks kept; clean ones are dropped beyond this
BLOCKLIST_CACHE_LIMIT = 4096
INDEX_LIMIT = 1 << 18  # directory-index names kept
INDEX_CHECK_EVERY = 64  # _maybe_evict calls between two counts of them
EXT_PREFETCH_BYTES = 1024 * 1024  # extension blocks read ahead in one request (at most)
EXT_OBJECT_PREFETCH_BYTES = 128 * 1024  # the same where each becomes a FileExtBlock
HEADER_GAP_BYTES = 32 * 1024  # header reads of a directory listing: gaps bridged
HEADER_SPAN_BYTES = 1024 * 1024  # ... and the longest request
HEADER_READS_IN_FLIGHT = 8
DATA_READS_IN_FLIGHT = 8  # device requests of one fragmented read at once
_T_HEADER_LONG = struct.pack(">L", T_HEADER)
_LONG = struct.Struct(">L")


def root_block_for(reserved: int, block_count: int) -> int:
    """The root block rule: (Reserved + blocks - 1) / 2."""
    return (reserved + block_count - 1) // 2


class FfsVolumeBase:
    """Read side of an open FFS volume.  See the module docstring for invariants."""

    def __init__(
        self, io: FsBlockIO, geometry: VolumeGeometry, dostype: int, root_block: int,
        root: RootBlock, block_count: int, read_only: bool,
    ) -> None:  # fmt: skip
        self.io = io
        self.geometry = geometry
        self.dostype = dostype
        self.ffs, self.intl, self.dircache, self.lnfs = dostype_flags(dostype)
        self.block_size = io.fs_block_size
        self.block_count = block_count
        self.reserved = geometry.reserved
        self.root_block = root_block
        self.ht_size = table_size(self.block_size)
        self.payload = self.block_size if self.ffs else self.block_size - 24
        self.read_only = read_only
        self.max_name = MAX_NAME_LNFS if self.lnfs else MAX_NAME_STD
        self.notes: list[str] = []
        self.bitmap = Bitmap(self.reserved, block_count - self.reserved, self.block_size)
        self.bitmap_blocks: list[int] = []
        self.bitmap_ext_blocks: list[int] = []
        self.bitmap_ok = False
        self._meta: dict[int, Any] = {root_block: root}
        self._dirty: set[int] = set()
        self._blists: dict[int, tuple[list[int], list[int]]] = {}
        # per file: extents (first index, first block, count) of its data blocks
        self._extents: dict[int, list[tuple[int, int, int]]] = {}
        # per directory whose every entry we have seen: upper-case name -> header block
        self._index: dict[int, dict[bytes, int]] = {}
        self._evict_calls = 0
        self._id2b: dict[int, int] = {}
        self._b2id: dict[int, int] = {}
        self._next_fresh_id = 1 << 40
        self._gone: set[int] = set()  # header blocks whose object was deleted this session
        self._ext_prefetch = max(1, EXT_PREFETCH_BYTES // self.block_size)
        self._ext_object_prefetch = max(1, EXT_OBJECT_PREFETCH_BYTES // self.block_size)
        self._lock = trio.Lock()
        self._data_reads = 0  # reads at the device outside the lock (see the invariants)
        self._reads_done = trio.Event()
        self._reads_done.set()
        self._lock_alone = VolumeLock(self, beside_reads=False)
        self._lock_beside_reads = VolumeLock(self, beside_reads=True)
        self._closed = False

    # ================================================================== basics
    @property
    def root(self) -> RootBlock:
        r = self._meta[self.root_block]
        assert isinstance(r, RootBlock)
        return r

    def _check_ptr(self, block: int, owner: int | None, field: str) -> None:
        if not (self.reserved <= block < self.block_count):
            raise CorruptError(
                f"pointer {block} lies outside the volume ({self.reserved}..{self.block_count - 1})",
                block=owner, field=field,
            )  # fmt: skip

    def _remember(self, block: int, obj: Any) -> None:
        self._meta[block] = obj

    def _maybe_evict(self) -> None:
        """Drop clean cached blocks beyond the limit.  Called only at the start of an
        operation, so blocks an operation prefetched stay until it ends."""
        if len(self._meta) > META_CACHE_LIMIT:
            for b in [b for b in self._meta if b not in self._dirty and b != self.root_block]:
                del self._meta[b]
                if len(self._meta) < META_CACHE_LIMIT // 2:
                    break
        if len(self._blists) > BLOCKLIST_CACHE_LIMIT or len(self._extents) > BLOCKLIST_CACHE_LIMIT:
            self._blists.clear()
            self._extents.clear()
        # the names of every indexed directory are counted every INDEX_CHECK_EVERY calls
        # (a sum over all directories on every operation cost more than most operations)
        self._evict_calls += 1
        if self._evict_calls % INDEX_CHECK_EVERY == 0 and sum(map(len, self._index.values())) > INDEX_LIMIT:
            self._index.clear()

    async def _read_checked(self, block: int, owner: int | None, field: str) -> bytes:
        self._check_ptr(block, owner, field)
        data = await self.io.read(block)
        if not verify_checksum(data):
            raise ChecksumError("block checksum does not verify", block=block, field="chksum")
        return data

    async def _entry(self, block: int, owner: int | None = None, field: str = "pointer") -> EntryBlock:
        """The header block ``block`` (user dir, file, link).  Raises CorruptError."""
        obj = self._meta.get(block)
        if isinstance(obj, EntryBlock):
            return obj
        if obj is not None:
            raise CorruptError(f"expected a header block, found {type(obj).__name__}", block=block, field=field)
        data = await self._read_checked(block, owner, field)
        e = EntryBlock.unpack(data, self.lnfs)
        if e.type != T_HEADER:
            raise CorruptError(f"block type {e.type} is not T_HEADER", block=block, field="type")
        if e.sec_type not in ENTRY_TYPES:
            raise CorruptError(f"secondary type {e.sec_type} is unknown", block=block, field="sec_type")
        if e.header_key != block:
            raise CorruptError(f"header_key {e.header_key} is not the block's own number", block=block, field="header_key")
        self._remember(block, e)
        return e

    async def _ext(self, block: int, owner: int, prefetch: int = 0) -> FileExtBlock:
        """Extension block ``block`` of file ``owner``.  ``prefetch`` > 0 (< 0) also reads
        that many following (preceding) blocks in the same request and keeps those that
        are extension blocks of the same file with a good checksum (our writer puts them
        side by side).  Raises ChecksumError/CorruptError for ``block`` itself."""
        obj = self._meta.get(block)
        if isinstance(obj, FileExtBlock):
            return obj
        if obj is not None:
            raise CorruptError("expected a file extension block", block=block, field="extension")
        self._check_ptr(block, owner, "extension")
        lo = block if prefetch >= 0 else max(self.reserved, block + prefetch)
        hi = min(self.block_count, block + prefetch + 1) if prefetch > 0 else block + 1
        raw = await self.io.read(lo, hi - lo)
        # no awaits below: the cache changes all at once
        parsed = FileExtBlock.unpack_run(raw, self.block_size)
        meta = self._meta
        for i, item in enumerate(parsed):
            b = lo + i
            if item is None or b == block or b in meta:
                continue
            x, total = item
            if total == 0 and x.header_key == b and x.parent == owner and x.high_seq <= self.ht_size:
                meta[b] = x
        item = parsed[block - lo]
        bs = self.block_size
        if item is None:
            if not verify_checksum(raw[(block - lo) * bs : (block - lo + 1) * bs]):
                raise ChecksumError("block checksum does not verify", block=block, field="chksum")
            raise CorruptError("bad file extension block (type is not T_LIST)", block=block, field="type")
        x, total = item
        if total != 0:
            raise ChecksumError("block checksum does not verify", block=block, field="chksum")
        if x.header_key != block or x.high_seq > self.ht_size:
            raise CorruptError("bad file extension block", block=block, field="type/header_key/high_seq")
        self._remember(block, x)
        return x

    async def _dircache_block(self, block: int, owner: int) -> DirCacheBlock:
        obj = self._meta.get(block)
        if isinstance(obj, DirCacheBlock):
            return obj
        if obj is not None:
            raise CorruptError("expected a dircache block", block=block, field="extension")
        data = await self._read_checked(block, owner, "dircache")
        d = DirCacheBlock.unpack(data)
        if d.type != T_DIRCACHE or d.header_key != block:
            raise CorruptError("bad dircache block", block=block, field="type/header_key")
        try:  # records that overrun the block never reach the cache (the writers decode them)
            d.decode_records()
        except ValueError as exc:
            raise CorruptError(str(exc), block=block, field="records") from None
        self._remember(block, d)
        return d

    async def _comment_block(self, block: int, owner: int) -> CommentBlock:
        obj = self._meta.get(block)
        if isinstance(obj, CommentBlock):
            return obj
        if obj is not None:
            raise CorruptError("expected a comment block", block=block, field="comment_block")
        data = await self._read_checked(block, owner, "comment_block")
        c = CommentBlock.unpack(data)
        if c.type != T_COMMENT or c.header_key != block:
            raise CorruptError("bad comment block", block=block, field="type/header_key")
        self._remember(block, c)
        return c

    def _locked(self, *, beside_reads: bool = False) -> VolumeLock:
        """The volume lock, as ``async with self._locked():``.  Taken without a trip
        through the scheduler when it is free (reads from the page cache are shorter
        than a reschedule); waits otherwise.  Then waits, holding it, until no data read
        is in flight outside the lock, unless ``beside_reads`` (``read`` itself: it only
        adds readers).  Cancellation while waiting releases the lock and changes
        nothing.  (A class, not a generator: it is taken for every operation.)"""
        return self._lock_beside_reads if beside_reads else self._lock_alone

    # ================================================================== ids
    def _id_for(self, block: int) -> int:
        return self._b2id.get(block, block)

    def _block_for(self, object_id: int) -> int:
        block = self._id2b.get(object_id)
        if block is not None:
            return block
        if object_id in self._b2id and self._b2id[object_id] != object_id:
            raise NotFound(f"object {object_id} no longer exists")
        return object_id

    # ================================================================== names
    def encode_name(self, name: str) -> bytes:
        if not name or "/" in name or ":" in name:
            raise InvalidName(f"{name!r} is not a valid Amiga name (empty, or holds '/' or ':')")
        try:
            raw = name.encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidName(f"{name!r} has characters outside Latin-1, which Amiga names cannot hold") from None
        if len(raw) > self.max_name:
            raise NameTooLong(f"{name!r} is longer than {self.max_name} characters, the limit of this volume")
        return raw

    def _same(self, a: bytes, b: bytes) -> bool:
        return len(a) == len(b) and upper_name(a, self.intl) == upper_name(b, self.intl)

    # ================================================================== directories
    async def _dir_table(self, dir_block: int) -> tuple[int, ...]:
        if dir_block == self.root_block:
            return self.root.ht
        e = await self._entry(dir_block)
        if e.sec_type != ST_USERDIR:
            raise NotADirectory(f"object {self._id_for(dir_block)} is not a directory")
        return e.table

    async def _real_dir(self, dir_id: int) -> int:
        """The header block of directory ``dir_id``.  NotFound/NotADirectory."""
        block = self._block_for(dir_id)
        if block == self.root_block:
            return block
        await self._exists(block)
        e = await self._entry(block)
        if e.sec_type == ST_LINKDIR:
            return await self._link_target(block, e)
        if e.sec_type != ST_USERDIR:
            raise NotADirectory(f"object {dir_id} is not a directory")
        return block

    async def _exists(self, block: int) -> None:
        if block == self.root_block:
            return
        if block in self._gone:
            raise NotFound(f"object {self._id_for(block)} no longer exists")
        if not (self.reserved <= block < self.block_count):
            raise NotFound(f"object {block} does not exist")
        # Ids come from this session's lookups and listings, and objects deleted in it
        # are in _gone: a header the tree names but the bitmap calls free is damage (a
        # bitmap with a valid checksum that lies).  Read-only, its file is still read
        # (getting data off a damaged disk is what ro is for); read-write, a write could
        # hand that block to another object, so the object is refused.
        if not self.read_only and self.bitmap_ok and self.bitmap.is_free(block):
            raise CorruptError(
                f"header block {block} is in the directory tree but marked free in the "
                "bitmap; run 'amigafuse check' (mount with -o check to have this found "
                "at mount time)", block=block, field="bitmap")

    async def _chain(self, dir_block: int, slot_head: int) -> list[tuple[int, EntryBlock]]:
        out = []
        seen: set[int] = set()
        block = slot_head
        while block:
            if block in seen or len(seen) > self.block_count:
                raise ChainLoopError("hash chain loops", block=block, field="hash_chain")
            seen.add(block)
            e = await self._entry(block, dir_block, "hash_chain")
            out.append((block, e))
            block = e.hash_chain
        return out

    def _key(self, name: bytes) -> bytes:
        return upper_name(name, self.intl)

    async def _find(self, dir_block: int, name: bytes) -> tuple[int, EntryBlock] | None:
        index = self._index.get(dir_block)
        if index is not None:
            hit = index.get(self._key(name))
            if hit is None:
                return None
            return hit, await self._entry(hit, dir_block, "hash_chain")
        table = await self._dir_table(dir_block)
        slot = hash_name(name, self.intl, self.block_size)
        for block, e in await self._chain(dir_block, table[slot]):
            if self._same(e.name, name):
                return block, e
        return None

    async def _entries(self, dir_block: int) -> list[tuple[int, EntryBlock]]:
        """Every entry of a directory, in ExamineNext order; corrupt chains are skipped
        (logged, and noted) so the rest stays readable."""
        table = await self._dir_table(dir_block)
        await self._prefetch_chains(dir_block, [h for h in table if h])
        out: list[tuple[int, EntryBlock]] = []
        complete = True
        misplaced: set[int] = set()
        for slot, head in enumerate(table):
            if not head:
                continue
            try:
                chain = await self._chain(dir_block, head)
                out.extend(chain)
                misplaced.update(
                    b for b, e in chain if hash_name(e.name, self.intl, self.block_size) != slot
                )
            except CorruptError as exc:
                complete = False
                log.warning("directory %d: %s", dir_block, exc)
                self._note(f"damaged directory entry skipped: {exc}")
        if complete:
            # An entry whose name hashes to another slot cannot be found by name (AmigaOS
            # Lookup() walks only the name's slot): leave it out of the index as well,
            # so lookups with and without the index agree and writers never look for it
            # in a chain it is not in.
            self._index[dir_block] = {self._key(e.name): b for b, e in out if b not in misplaced}
        if self.dircache:
            try:
                order = {h: i for i, h in enumerate(await self._dircache_headers(dir_block))}
            except CorruptError as exc:
                log.warning("dircache of %d unreadable: %s", dir_block, exc)
            else:
                out.sort(key=lambda be: order.get(be[0], 1 << 40))
        return out

    async def _prefetch_chains(self, dir_block: int, heads: list[int]) -> None:
        """Warm the cache for a walk of a directory's hash chains: level by level (every
        chain's first headers, then their successors...), the headers not cached are
        read in as few requests as their spacing allows (:meth:`_prefetch_headers`), so
        a directory costs a few requests per chain length, not one per entry.  Best
        effort: what it cannot read or validate is left for the walk to report."""
        frontier = heads
        seen: set[int] = set()
        meta = self._meta
        while frontier and len(seen) <= self.block_count:
            await self._prefetch_headers(frontier, dir_block)
            nxt = []
            for b in frontier:
                seen.add(b)
                e = meta.get(b)
                if isinstance(e, EntryBlock) and e.hash_chain and e.hash_chain not in seen:
                    nxt.append(e.hash_chain)
            frontier = nxt

    async def _prefetch_headers(self, blocks: list[int], parent: int) -> None:
        """Read the uncached ``blocks`` in as few requests as their spacing allows (runs
        with gaps of up to HEADER_GAP_BYTES, each at most HEADER_SPAN_BYTES, several at
        the device at once) and cache every valid header of an entry of directory
        ``parent`` found in what was read, neighbours included (writers put a
        directory's headers near each other).  Valid: checksum, T_HEADER, its own
        number, that parent, a known secondary type, and not free in the bitmap (a
        deleted object's header stays on the disk).  Blocks already cached (perhaps
        changed, not yet written) are never replaced.  A request that fails is skipped
        (the walk reads what it needs itself and reports the error)."""
        meta = self._meta
        want = sorted({b for b in blocks if self.reserved <= b < self.block_count and b not in meta})
        if not want:
            return
        gap = max(1, HEADER_GAP_BYTES // self.block_size)
        span = max(1, HEADER_SPAN_BYTES // self.block_size)
        ranges: list[tuple[int, int]] = []
        start = prev = want[0]
        for b in want[1:]:
            if b - prev > gap or b - start >= span:
                ranges.append((start, prev - start + 1))
                start = b
            prev = b
        ranges.append((start, prev - start + 1))
        pending = iter(ranges)

        async def worker() -> None:
            for first, count in pending:
                try:
                    raw = await self.io.read(first, count)
                except DeviceError as exc:  # a bad neighbour must not fail the listing
                    log.debug("header read-ahead of blocks %d+%d failed: %s", first, count, exc)
                    continue
                self._cache_headers(raw, first, parent)  # no await: all or nothing

        tasks = min(HEADER_READS_IN_FLIGHT, self.io.requests_in_flight, len(ranges))
        if tasks == 1:
            await worker()
            return

        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker)

    def _cache_headers(self, raw: bytes, first: int, parent: int) -> None:
        bs = self.block_size
        meta = self._meta
        for i in range(len(raw) // bs):
            offset = i * bs
            if not raw.startswith(_T_HEADER_LONG, offset):
                continue
            b = first + i
            if b in meta or (self.bitmap_ok and self.bitmap.is_free(b)):
                continue  # cached (perhaps changed), or a deleted object's old header
            key, = _LONG.unpack_from(raw, offset + 4)
            owner, = _LONG.unpack_from(raw, offset + bs - 12)
            if key != b or owner != parent:
                continue
            piece = raw[offset : offset + bs]
            if not verify_checksum(piece):
                continue
            e = EntryBlock.unpack(piece, self.lnfs)
            if e.sec_type in ENTRY_TYPES:
                meta[b] = e

    def _note(self, text: str) -> None:
        if text not in self.notes and len(self.notes) < 50:
            self.notes.append(text)

    async def _dircache_chain(self, dir_block: int) -> list[tuple[int, DirCacheBlock]]:
        if dir_block == self.root_block:
            first = self.root.extension
        else:
            first = (await self._entry(dir_block)).extension
        out: list[tuple[int, DirCacheBlock]] = []
        seen: set[int] = set()
        block = first
        while block:
            if block in seen or len(seen) > self.block_count:
                raise ChainLoopError("dircache chain loops", block=block, field="next_dirc")
            seen.add(block)
            d = await self._dircache_block(block, dir_block)
            out.append((block, d))
            block = d.next_dirc
        return out

    async def _dircache_headers(self, dir_block: int) -> list[int]:
        out: list[int] = []
        for block, d in await self._dircache_chain(dir_block):
            try:
                out.extend(r.header for r in d.decode_records())
            except ValueError as exc:
                raise CorruptError(str(exc), block=block, field="records") from None
        return out

    # ================================================================== objects
    async def _link_target(self, block: int, e: EntryBlock) -> int:
        target = e.real_entry
        t = await self._entry(target, block, "real_entry")
        want = ST_FILE if e.sec_type == ST_LINKFILE else ST_USERDIR
        if t.sec_type != want:
            raise CorruptError(f"hard link points to a secondary type {t.sec_type} object", block=block, field="real_entry")
        return target

    async def _nlink(self, block: int, e: EntryBlock) -> int:
        n = 1
        seen: set[int] = set()
        link = e.next_link
        while link:
            if link in seen or len(seen) > self.block_count:
                raise ChainLoopError("link chain loops", block=link, field="next_link")
            seen.add(link)
            le = await self._entry(link, block, "next_link")
            n += 1
            link = le.next_link
        return n

    async def _comment(self, block: int, e: EntryBlock) -> bytes:
        if self.lnfs and e.comment_block:
            c = await self._comment_block(e.comment_block, block)
            return c.comment
        return e.inline_comment

    def _data_count(self, size: int) -> int:
        return -(-size // self.payload)

    async def _stat(self, name_block: int, name_entry: EntryBlock) -> Stat:
        block, e = name_block, name_entry
        if e.sec_type in (ST_LINKFILE, ST_LINKDIR):
            block = await self._link_target(name_block, name_entry)
            e = await self._entry(block)
        return await self._stat_real(block, e, name_entry.name)

    async def _stat_real(self, block: int, e: EntryBlock, name: bytes) -> Stat:
        comment = await self._comment(block, e)
        nlink = await self._nlink(block, e) if e.next_link else 1
        if e.sec_type == ST_FILE:
            kind, size = Kind.FILE, e.byte_size
            nblocks = self._data_count(size)
            ext = max(0, -(-(nblocks - self.ht_size) // self.ht_size))
            disk_blocks = 1 + nblocks + ext
            target = None
        elif e.sec_type == ST_USERDIR:
            kind, size, disk_blocks, target = Kind.DIR, 0, 1, None
        else:
            kind, size, disk_blocks = Kind.SOFTLINK, 0, 1
            target = e.softlink_target.decode("latin-1")
            size = len(e.softlink_target)
        # every field of Stat, filled without its frozen __init__ (one Stat per create,
        # getattr, setattr and listed entry; equality with the constructor's is tested)
        st = object.__new__(Stat)
        st.__dict__.update(
            object_id=self._id_for(block), name=name.decode("latin-1"), kind=kind, size=size,
            protection=e.protect, date=e.date, comment=comment.decode("latin-1"), nlink=nlink,
            uid=e.uid, gid=e.gid, link_target=target, disk_blocks=disk_blocks,
        )  # fmt: skip
        return st

    def _root_stat(self) -> Stat:
        r = self.root
        return Stat(
            object_id=self.root_block, name=r.disk_name.decode("latin-1"), kind=Kind.DIR, size=0,
            protection=0, date=r.root_date, disk_blocks=1,
        )  # fmt: skip

    async def _file(self, object_id: int) -> tuple[int, EntryBlock]:
        block = self._block_for(object_id)
        if block == self.root_block:
            raise IsADirectory("the root is a directory")
        await self._exists(block)
        e = await self._entry(block)
        if e.sec_type == ST_LINKFILE:
            block = await self._link_target(block, e)
            e = await self._entry(block)
        if e.sec_type in (ST_USERDIR, ST_LINKDIR):
            raise IsADirectory(f"object {object_id} is a directory")
        if e.sec_type != ST_FILE:
            raise InvalidArgument(f"object {object_id} is a soft link, not a file")
        return block, e

    async def _block_lists(self, block: int, e: EntryBlock) -> tuple[list[int], list[int]]:
        """(data blocks, extension blocks) of a file header, from its tables.  Every
        extension block is left in the cache (the writer relies on it), every data block
        pointer is range-checked.  Raises CorruptError (ChainLoopError, ChecksumError)."""
        cached = self._blists.get(block)
        if cached is not None:
            return cached
        n = self.ht_size
        if e.high_seq > n:
            raise CorruptError(f"high_seq {e.high_seq} exceeds the table size {n}", block=block, field="high_seq")
        data = list(e.table[n - e.high_seq :])
        data.reverse()
        exts: list[int] = []
        ext = e.extension
        seen: set[int] = set()
        limit = self.block_count // n + 2
        meta = self._meta
        prev = 0
        while ext:
            if ext in seen or len(seen) > limit:
                raise ChainLoopError("extension chain loops", block=ext, field="extension")
            seen.add(ext)
            x = meta.get(ext)
            if not isinstance(x, FileExtBlock):
                # a miss: read the blocks the chain probably goes on to in the same
                # request, as far as the file's size says there are more
                left = -(-(e.byte_size - len(data) * self.payload) // (self.payload * n))
                step = ext - prev if prev and abs(ext - prev) == 1 else 0
                x = await self._ext(ext, block, step * min(max(left - 1, 0), self._ext_object_prefetch))
            hs = x.high_seq
            if hs:
                data.extend(reversed(x.table[n - hs :]))
            exts.append(ext)
            prev = ext
            ext = x.extension
        extents = []
        index = 0
        lo, hi = self.reserved, self.block_count
        for start, count in runs(data, limit=1 << 30):
            if start < lo or start + count > hi:
                for i, d in enumerate(data):
                    self._check_ptr(d, block, f"data block {i}")
            extents.append((index, start, count))
            index += count
        self._blists[block] = (data, exts)
        self._extents[block] = extents
        return data, exts

    async def _file_extents(self, block: int, e: EntryBlock) -> list[tuple[int, int, int]]:
        """(first index, first block, count) runs of the file's data blocks, for reading.

        Cached per file.  When the block lists are not cached, the extension chain is
        walked on the raw blocks (:func:`scan_ext_chain`), read ahead in the chain's
        direction, without building a FileExtBlock per block: blocks in the metadata
        cache (perhaps changed, not yet written) are taken from it.  The same checks as
        :meth:`_block_lists`: checksums, types, own numbers, table sizes, loops, every
        data pointer in range.  Raises CorruptError (ChainLoopError, ChecksumError)."""
        ext = self._extents.get(block)
        if ext is not None:
            return ext
        lists = self._blists.get(block)
        if lists is not None:  # the writer's lists (its tables may not be on the disk yet)
            ext = self._extents_of(lists[0])
            self._extents[block] = ext
            return ext
        n = self.ht_size
        if e.high_seq > n:
            raise CorruptError(f"high_seq {e.high_seq} exceeds the table size {n}", block=block, field="high_seq")
        hs = e.high_seq
        found = runs(e.table[n - 1 : n - 1 - hs : -1] if hs < n else e.table[::-1], limit=1 << 62)
        nblocks = e.high_seq
        xblock = e.extension
        seen: set[int] = set()
        limit = self.block_count // n + 2
        meta = self._meta
        bs = self.block_size
        raw = b""
        raw_lo = raw_hi = 0  # blocks [raw_lo, raw_hi) of the volume are in raw
        prev = 0
        while xblock:
            obj = meta.get(xblock)
            if obj is not None:
                if xblock in seen or len(seen) > limit:
                    raise ChainLoopError("extension chain loops", block=xblock, field="extension")
                seen.add(xblock)
                if not isinstance(obj, FileExtBlock):
                    raise CorruptError("expected a file extension block", block=xblock, field="extension")
                hs = obj.high_seq
                chunk = runs(obj.table[n - 1 : n - 1 - hs : -1] if hs < n else obj.table[::-1], limit=1 << 62)
                nxt = obj.extension
            elif raw_lo <= xblock < raw_hi:
                xblock, listed, prev = scan_ext_chain(raw, raw_lo, bs, xblock, found, seen, limit, meta)
                nblocks += listed
                continue
            else:
                self._check_ptr(xblock, block, "extension")
                # read ahead in the direction the chain has been going, as far as the
                # file's size says there are more extension blocks; the scan above
                # takes them from there
                left = -(-(e.byte_size - nblocks * self.payload) // (self.payload * n))
                ahead = min(max(left - 1, 0), self._ext_prefetch)
                step = xblock - prev if prev and abs(xblock - prev) == 1 else 0
                if step > 0:
                    raw_lo, raw_hi = xblock, min(self.block_count, xblock + ahead + 1)
                elif step < 0:
                    raw_lo, raw_hi = max(self.reserved, xblock - ahead), xblock + 1
                else:
                    raw_lo, raw_hi = xblock, xblock + 1
                raw = await self.io.read(raw_lo, raw_hi - raw_lo)
                continue
            for start, count in chunk:
                if found and found[-1][0] + found[-1][1] == start:
                    found[-1] = (found[-1][0], found[-1][1] + count)
                else:
                    found.append((start, count))
            nblocks += hs
            prev = xblock
            xblock = nxt
        ext = []
        index = 0
        lo, hi = self.reserved, self.block_count
        for start, count in found:
            if start < lo or start + count > hi:
                bad = start if start < lo or start >= hi else hi
                raise CorruptError(
                    f"pointer {bad} lies outside the volume ({lo}..{hi - 1})",
                    block=block, field=f"data block {index + bad - start}",
                )  # fmt: skip
            ext.append((index, start, count))
            index += count
        self._extents[block] = ext
        return ext

    @staticmethod
    def _extents_of(data: list[int]) -> list[tuple[int, int, int]]:
        ext = []
        index = 0
        for start, count in runs(data, limit=1 << 62):
            ext.append((index, start, count))
            index += count
        return ext

    async def _read_blocks(self, blocks: list[int]) -> list[bytes]:
        """The contents of ``blocks``, read in as few device requests as possible."""
        out: list[bytes] = []
        bs = self.block_size
        for start, count in runs(blocks):
            raw = await self.io.read(start, count)
            out.extend(raw[i * bs : (i + 1) * bs] for i in range(count))
        return out

    async def _read_file(self, block: int, e: EntryBlock, offset: int, length: int) -> bytes:
        """``length`` bytes of file ``block`` from ``offset`` (fewer at its end).  Called
        with the lock held.  Raises CorruptError, DeviceError."""
        plan = await self._plan_read(block, e, offset, length)
        if isinstance(plan, bytes):
            return plan
        return await self._read_planned(*plan)

    async def _plan_read(
        self, block: int, e: EntryBlock, offset: int, length: int
    ) -> bytes | tuple[list[tuple[int, int]], int, int]:
        """What a read needs from the device: ``(device ranges (first block, count) in
        file order, bytes to skip at the start, bytes wanted)`` for FFS data, or the data
        itself (OFS, or nothing to read).  Called with the lock held; its own metadata
        reads happen here.  Raises CorruptError, DeviceError."""
        size = e.byte_size
        if offset >= size or length <= 0:
            return b""
        end = min(size, offset + length)
        first = offset // self.payload
        last = (end - 1) // self.payload
        skip = offset - first * self.payload
        if self.ffs:
            extents = await self._file_extents(block, e)
            listed = extents[-1][0] + extents[-1][2] if extents else 0
            if listed <= last:
                raise CorruptError(
                    f"file header lists {listed} data blocks, its size {size} needs {last + 1}",
                    block=block, field="high_seq",
                )  # fmt: skip
            ranges: list[tuple[int, int]] = []
            k = bisect.bisect_right(extents, (first, 1 << 62, 0)) - 1
            index = first
            while index <= last:
                ex_first, ex_block, ex_count = extents[k]
                skip_blocks = index - ex_first
                take = min(ex_count - skip_blocks, last + 1 - index)
                ranges.append((ex_block + skip_blocks, take))
                index += take
                k += 1
            return ranges, skip, end - offset
        data, _ = await self._block_lists(block, e)
        if len(data) <= last:
            raise CorruptError(
                f"file header lists {len(data)} data blocks, its size {size} needs {last + 1}",
                block=block, field="high_seq",
            )  # fmt: skip
        bs = self.block_size
        parts: list[memoryview] = []
        for start, count in runs(data[first : last + 1]):
            raw = await self.io.read(start, count)
            # FFS 40.1 itself writes wrong seq_num/next_data after a seek past EOF
            # (see docs/ffs.md), so only type, owner and checksum are required here.
            bad = first_bad_ofs_block(raw, bs, block)
            if bad >= 0:
                d = OfsDataBlock.unpack(raw[bad * bs : (bad + 1) * bs])
                if d.type != T_DATA or d.header_key != block:
                    raise CorruptError("OFS data block does not belong to this file", block=start + bad, field="type/header_key")
                raise ChecksumError("OFS data block checksum does not verify", block=start + bad, field="chksum")
            view = memoryview(raw)
            parts.extend(view[i + 24 : i + bs] for i in range(0, len(raw), bs))
        buf = b"".join(parts)
        return buf[skip : skip + (end - offset)]

    async def _read_planned(self, ranges: list[tuple[int, int]], skip: int, nbytes: int) -> bytes:
        """The bytes a :meth:`_plan_read` plan names (:meth:`_read_planned_lease`,
        copied).  Raises the first DeviceError."""
        with await self._read_planned_lease(ranges, skip, nbytes) as lease:
            return lease_bytes(lease)

    async def _read_planned_lease(self, ranges: list[tuple[int, int]], skip: int, nbytes: int) -> ReadLease:
        """The bytes a :meth:`_plan_read` plan names as a lease the caller releases
        (:func:`.reader.read_planned`: nearby ranges in one request, up to
        DATA_READS_IN_FLIGHT requests at the device at once, the device's buffer lent
        when the data is one range).  Raises the first DeviceError; the other requests
        are then cancelled."""
        return await read_planned(
            self.io, ranges, skip, nbytes, max_span_blocks=self.io.max_transfer_blocks,
            in_flight=min(DATA_READS_IN_FLIGHT, self.io.requests_in_flight),
        )  # fmt: skip

    # ================================================================== public reads
    @property
    def info(self) -> VolumeInfo:
        r = self.root
        return VolumeInfo(
            label=r.disk_name.decode("latin-1"), dostype=self.dostype, block_size=self.block_size,
            read_only=self.read_only, max_name_length=self.max_name, max_comment_length=MAX_COMMENT,
            case_sensitive=False, created=r.creation_date, notes=tuple(self.notes),
        )  # fmt: skip

    @property
    def root_id(self) -> int:
        return self.root_block

    async def getattr(self, object_id: int) -> Stat:
        async with self._locked():
            self._maybe_evict()
            block = self._block_for(object_id)
            if block == self.root_block:
                return self._root_stat()
            await self._exists(block)
            e = await self._entry(block)
            if e.sec_type in (ST_LINKFILE, ST_LINKDIR):
                return await self._stat(block, e)
            return await self._stat_real(block, e, e.name)

    async def lookup(self, dir_id: int, name: str) -> Stat:
        async with self._locked():
            self._maybe_evict()
            raw = self.encode_name(name)
            dir_block = await self._real_dir(dir_id)
            found = await self._find(dir_block, raw)
            if found is None:
                raise NotFound(f"{name!r} not found")
            return await self._stat(*found)

    async def readdir(self, dir_id: int) -> list[Stat]:
        async with self._locked():
            self._maybe_evict()
            dir_block = await self._real_dir(dir_id)
            out = []
            for block, e in await self._entries(dir_block):
                try:
                    out.append(await self._stat(block, e))
                except CorruptError as exc:
                    log.warning("entry %d: %s", block, exc)
                    self._note(f"damaged directory entry skipped: {exc}")
            return out

    def _data_read_started(self) -> None:
        """A data read goes to the device outside the lock (called holding it):
        operations that change blocks wait for ``_reads_done`` (see the invariants)."""
        self._data_reads += 1
        if self._data_reads == 1:
            self._reads_done = trio.Event()

    def _data_read_ended(self) -> None:
        self._data_reads -= 1
        if not self._data_reads:
            self._reads_done.set()

    async def read(self, object_id: int, offset: int, length: int) -> bytes:
        """Volume.read: :meth:`read_lease`, copied."""
        with await self.read_lease(object_id, offset, length) as lease:
            return lease_bytes(lease)

    async def read_lease(self, object_id: int, offset: int, length: int) -> ReadLease:
        """:meth:`read` into a buffer the device may lend (Volume.read_lease; the
        caller releases the lease): a contiguous FFS read comes back in the device's
        own buffer, fragmented ones in one request per run of nearby ranges
        (:mod:`.reader`).  Raises as :meth:`read`."""
        if offset < 0 or length < 0:
            raise InvalidArgument("negative offset or length")
        async with self._locked(beside_reads=True):
            self._maybe_evict()
            block, e = await self._file(object_id)
            plan = await self._plan_read(block, e, offset, length)
            if isinstance(plan, bytes):
                return ReadLease.of(plan)
            # the data is read outside the lock, beside other reads; operations that
            # change blocks wait for it (see the invariants)
            self._data_read_started()
        try:
            return await self._read_planned_lease(*plan)
        finally:
            self._data_read_ended()

    async def readlink(self, object_id: int) -> str:
        async with self._locked():
            self._maybe_evict()
            block = self._block_for(object_id)
            if block == self.root_block:
                raise InvalidArgument("the root is not a soft link")
            await self._exists(block)
            e = await self._entry(block)
            if e.sec_type != ST_SOFTLINK:
                raise InvalidArgument(f"object {object_id} is not a soft link")
            return e.softlink_target.decode("latin-1")

    async def statfs(self) -> StatFs:
        return StatFs(
            block_size=self.block_size, total_blocks=self.bitmap.count,
            free_blocks=self.bitmap.free_count(), max_name_length=self.max_name,
        )  # fmt: skip

    # ================================================================== bitmap
    async def _load_bitmap(self) -> None:
        """Read the bitmap pages named by the root and its extension chain.  Sets
        ``bitmap_ok`` False (with a note) when a page or pointer is bad."""
        r = self.root
        pages: list[int] = [p for p in r.bm_pages if p]
        exts: list[int] = []
        ext = r.bm_ext
        need = self.bitmap.pages
        seen: set[int] = set()
        try:
            while ext and len(pages) < need:
                if ext in seen or len(seen) > need:
                    raise ChainLoopError("bitmap extension chain loops", block=ext, field="bm_ext")
                seen.add(ext)
                self._check_ptr(ext, self.root_block, "bm_ext")
                x = BitmapExtBlock.unpack(await self.io.read(ext))
                exts.append(ext)
                pages.extend(p for p in x.bm_pages if p)
                ext = x.bm_ext
            if len(pages) < need:
                raise CorruptError(f"the root names {len(pages)} bitmap blocks, the volume needs {need}", block=self.root_block, field="bm_pages")
            pages = pages[:need]
            for p in pages:
                self._check_ptr(p, self.root_block, "bm_pages")
            i = 0
            bs = self.block_size
            for start, count in runs(pages):  # usually one request for all of them
                raws = await self.io.read(start, count)
                for j in range(count):
                    raw = raws[j * bs : (j + 1) * bs]
                    if not verify_checksum(raw, 0):
                        raise ChecksumError("bitmap block checksum does not verify", block=start + j, field="chksum")
                    self.bitmap.load_page(i, BitmapBlock.unpack(raw).map)
                    i += 1
        except CorruptError as exc:
            self.bitmap_ok = False
            self._note(f"bitmap unreadable ({exc})")
            self.bitmap_blocks = pages[:need]
            self.bitmap_ext_blocks = exts
            return
        # A bitmap whose checksum verifies may still be another block's bytes (any block
        # whose longs sum to zero passes): one that calls the root or a bitmap block
        # free would let the next allocation overwrite it.  Treat it as damaged.
        vital = [self.root_block, *pages, *exts]
        free = [b for b in vital if self.bitmap.in_range(b) and self.bitmap.is_free(b)]
        if free:
            self.bitmap_ok = False
            self._note(f"bitmap damaged: it marks block {free[0]} (root or bitmap) free")
            self.bitmap_blocks = pages
            self.bitmap_ext_blocks = exts
            return
        self.bitmap_blocks = pages
        self.bitmap_ext_blocks = exts
        self.bitmap_ok = True

    # ================================================================== reachability
    async def walk(self, errors: list[str] | None = None) -> set[int]:
        """Every block reachable from the root (boot blocks and bitmap included).
        Damaged parts are reported in ``errors`` (when given) and skipped."""
        errs = errors if errors is not None else []
        used: set[int] = set(range(self.reserved))
        used.add(self.root_block)
        used.update(self.bitmap_blocks)
        used.update(self.bitmap_ext_blocks)
        stack = [self.root_block]
        seen_dirs: set[int] = set()
        while stack:
            d = stack.pop()
            if d in seen_dirs:
                continue
            seen_dirs.add(d)
            if self.dircache:
                try:
                    for b, _ in await self._dircache_chain(d):
                        used.add(b)
                except CorruptError as exc:
                    errs.append(f"directory {d}: dircache: {exc}")
            try:
                table = await self._dir_table(d)
            except (CorruptError, NotADirectory) as exc:
                errs.append(f"directory {d}: {exc}")
                continue
            for head in table:
                if not head:
                    continue
                try:
                    chain = await self._chain(d, head)
                except CorruptError as exc:
                    errs.append(f"directory {d}: {exc}")
                    continue
                for b, e in chain:
                    used.add(b)
                    if self.lnfs and e.comment_block:
                        used.add(e.comment_block)
                    if e.sec_type == ST_USERDIR:
                        stack.append(b)
                    elif e.sec_type == ST_FILE:
                        try:
                            data, exts = await self._block_lists(b, e)
                        except CorruptError as exc:
                            errs.append(f"file {b}: {exc}")
                            continue
                        used.update(data)
                        used.update(exts)
        return used


async def read_boot_and_root(
    device: BlockDevice, geometry: VolumeGeometry
) -> tuple[FsBlockIO, int, int, int, RootBlock]:
    """(io, dostype, block_count, root_block, root) of an FFS volume.  CorruptError if
    the device does not hold one."""
    io = FsBlockIO(device, geometry.fs_block_size)
    count = io.block_count
    if geometry.fs_block_count and geometry.fs_block_count < count:
        count = geometry.fs_block_count
    if count <= geometry.reserved + 2:
        raise CorruptError(f"the partition has only {count} blocks, too few for FFS")
    boot_raw = await io.read(0, max(1, 1024 // io.fs_block_size))
    boot = BootBlock.unpack(boot_raw[:1024].ljust(1024, b"\0"))
    dostype = geometry.dostype
    if boot.disk_type >> 8 == 0x444F53 and (boot.disk_type & 0xFF) <= 7:
        dostype = boot.disk_type
    elif dostype >> 8 != 0x444F53 or (dostype & 0xFF) > 7:
        raise CorruptError(
            "no DOS\\0-\\7 boot block and the partition's DosType is not FFS either", block=0, field="disk_type"
        )
    candidates = [root_block_for(geometry.reserved, count)]
    candidates.append(candidates[0] + 1)
    problems = []
    for rb in candidates:
        if rb >= count:
            continue
        raw = await io.read(rb)
        r = RootBlock.unpack(raw)
        if not verify_checksum(raw):
            problems.append(f"block {rb}: checksum does not verify")
            continue
        if r.type != T_HEADER or r.sec_type != ST_ROOT:
            problems.append(f"block {rb}: type {r.type}/{r.sec_type} is not a root block")
            continue
        if r.ht_size != table_size(io.fs_block_size):
            problems.append(f"block {rb}: hash table size {r.ht_size} does not match the block size")
            continue
        return io, dostype, count, rb, r
    raise CorruptError(
        "no valid root block (" + "; ".join(problems) + "): not an FFS volume, or a damaged one",
        block=candidates[0], field="root",
    )  # fmt: skip


def dircache_record(block: int, e: EntryBlock, comment: bytes) -> DirCacheRecord:
    """The dircache record FFS keeps for header ``block`` (links describe themselves)."""
    return DirCacheRecord(
        header=block, size=e.byte_size if e.sec_type == ST_FILE else 0, protect=e.protect,
        uid=e.uid, gid=e.gid, days=e.days & 0xFFFF, mins=e.mins & 0xFFFF, ticks=e.ticks & 0xFFFF,
        type=e.sec_type, name=e.name, comment=comment,
    )  # fmt: skip


__all__ = ["BM_VALID", "DateStamp", "FfsVolumeBase", "read_boot_and_root", "root_block_for", "runs"]
