"""The SFS :class:`~amigafuse.fs.api.Volume`.

Identity: object ids are SFS object-node numbers (the root directory is node 1,
``.recycled`` node 2); they stay stable across renames because SFS never renumbers a
node.  A node freed while the volume is open (a delete, a purge of ``.recycled``) may be
handed to a new object; that object then gets a fresh id (from ``FRESH_ID_BASE`` up,
above every 32-bit node number) and the freed node's old id answers NotFound for the
rest of the session.  Invariant: an id never names two objects while the volume is
open (``_node``/``_oid`` translate at the interface; ``SfsWriter.removed_nodes`` holds
the freed nodes, counted only for operations that were not rolled back).

Busy objects (``set_busy``, told by the FUSE layer for open files): a purge of
``.recycled`` skips them, so a file unlinked while open lives on in ``.recycled`` and
its descriptor keeps reading and writing it (POSIX).  A busy object deleted at once
(a volume without ``.recycled``, a delete inside ``.recycled``, an unlink on a volume
too full even for the move) is gone: its id answers NotFound (ENOENT), never another
object.

Locking: ``self._lock`` serialises every mutation and every read that walks metadata,
because a mutation changes several blocks between awaits (pending overlay, caches).
File data located under the lock is read outside it (``read_lease``), counted in
``_data_reads``; every other holder of the lock waits, holding it, until no such read
is at the device, so no block such a read is reading is changed or reused under it.
Blocks with changes not yet on the disk are read holding the lock instead.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import trio

from amigafuse.amiga.dates import DateStamp
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice, ReadLease
from amigafuse.blockdev.window import FsBlockIO
from amigafuse.errors import (
    AmigaFuseError,
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
    NotSupported,
    PermissionDenied,
    ReadOnlyFilesystem,
)
from amigafuse.fs.api import FIBF_ARCHIVE, Kind, SetAttrs, Stat, StatFs, Volume, VolumeInfo
from amigafuse.fs.locking import VolumeLock
from amigafuse.fs.sfs import codec
from amigafuse.fs.sfs.alloc import FreeMap
from amigafuse.fs.sfs.codec import SfsObject
from amigafuse.fs.sfs.reader import Located, SfsReader, read_root, validate_root
from amigafuse.fs.sfs.writer import (
    SfsWriter,
    now_seconds,
    replay_handler_transaction,
    replay_journal,
)

T = TypeVar("T")
MAX_LABEL_LENGTH = 30
ZERO_CHUNK = 1 << 20

MAX_NAME_LENGTH = 107  # SFS 1.277; 1.8x accepted 100
MAX_COMMENT_LENGTH = 79
OPERATION_MARGIN = 64  # blocks an operation is assumed to change, for the early commit
FRESH_ID_BASE = 1 << 32  # ids for objects on reused nodes (node numbers are 32-bit)
RECYCLED_PURGE_FILES = 35  # the handler purges .recycled after a delete or create beyond this
PROTECTION_INVERT = 0x0F  # SFS stores RWED as "allowed" bits, AmigaDOS as "denied"


def encode_name(name: str) -> bytes:
    """Latin-1 bytes of a name.  InvalidName / NameTooLong."""
    if not name or "/" in name or ":" in name:
        raise InvalidName(f"{name!r} is not a valid Amiga name (empty, or contains '/' or ':')")
    try:
        raw = name.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidName(f"{name!r} has characters outside Latin-1, which SFS cannot store") from None
    if 0 in raw:
        raise InvalidName(f"{name!r} contains a NUL byte")
    if len(raw) > MAX_NAME_LENGTH:
        raise NameTooLong(f"{name!r} is longer than SFS's {MAX_NAME_LENGTH} characters")
    return raw


async def load_freemap(reader: SfsReader, notes: list[str]) -> FreeMap | None:
    """The whole bitmap in memory, or None (with a note) when a bitmap block is bad."""
    root = reader.root
    per = codec.blocks_per_bitmap(reader.block_size)
    count = (root.totalblocks + per - 1) // per
    reader.check_pointer(root.bitmapbase, 0, "bitmapbase")
    if root.bitmapbase + count > root.totalblocks:
        raise CorruptError("the bitmap runs past the volume end", block=0, field="bitmapbase")
    raw = await reader.io.read(root.bitmapbase, count)
    bs = reader.block_size
    parts = []
    for i in range(count):
        blk = raw[i * bs : (i + 1) * bs]
        try:
            codec.check_block(blk, root.bitmapbase + i, codec.BITMAP_ID, root.sfs2)
        except CorruptError as exc:
            notes.append(f"bitmap damaged ({exc}): mounted read-only; run check --repair")
            return None
        parts.append(blk[codec.BLOCKHEADER_SIZE :])
    freemap = FreeMap(root.totalblocks, per, b"".join(parts))
    ri = await reader.root_info()
    if ri.freeblocks != freemap.free_count:
        notes.append(f"root info said {ri.freeblocks} free blocks, the bitmap {freemap.free_count}: corrected")
    return freemap


def _touches(runs: list[tuple[int, int]], blocks: dict[int, bytes]) -> bool:
    """Whether any block of ``runs`` (disk block, count) is a key of ``blocks``."""
    if not blocks:
        return False
    if len(blocks) < sum(n for _, n in runs):
        return any(disk <= b < disk + n for b in blocks for disk, n in runs)
    return any(b in blocks for disk, n in runs for b in range(disk, disk + n))


class SfsVolume(Volume):
    """An open SFS\\0 or SFS\\2 volume (see the module docstring)."""

    def __init__(
        self,
        io: FsBlockIO,
        reader: SfsReader,
        *,
        read_only: bool,
        show_recycled: bool,
        notes: list[str],
    ) -> None:
        self.io = io
        self.r = reader
        self.root = reader.root
        self._read_only = read_only
        self.show_recycled = show_recycled
        self._notes = list(notes)
        self._lock = trio.Lock()
        self._locked = VolumeLock(self, beside_reads=False)
        self._locked_beside_reads = VolumeLock(self, beside_reads=True)
        self._data_reads = 0  # file-data reads at the device outside the lock
        self._reads_done = trio.Event()
        self._reads_done.set()
        self._near_full = False  # the last operation left little room for records
        self._closed = False
        self._label = ""
        self._created = DateStamp.from_seconds_since_1978(self.root.datecreated)
        # Identity (module docstring): fresh ids of objects on reused nodes, both ways,
        # and the ids the FUSE layer holds open (``set_busy``).
        self._id_of_node: dict[int, int] = {}
        self._node_of_id: dict[int, int] = {}
        self._next_fresh_id = FRESH_ID_BASE
        self._busy: set[int] = set()

    # ------------------------------------------------------------------ opening
    @classmethod
    async def open(
        cls, device: BlockDevice, geometry: VolumeGeometry, read_only: bool, *, show_recycled: bool = False
    ) -> SfsVolume:
        io = FsBlockIO(device, geometry.fs_block_size)
        root, notes = await read_root(io)
        if root.blocksize != geometry.fs_block_size:
            raise CorruptError(
                f"the SFS root says {root.blocksize}-byte blocks but the partition is set up for "
                f"{geometry.fs_block_size}: fix the partition's SizeBlock/SectorsPerBlock",
                block=0,
                field="blocksize",
            )
        validate_root(root, io.block_count)
        reader: SfsReader = SfsReader(io, root)
        if device.read_only:
            read_only = True
        tr = root.rootobjectcontainer + 2
        tr_data = await reader.raw(tr)
        tr_id = struct.unpack_from(">I", tr_data, 0)[0]
        if tr_id == codec.TRANSACTIONFAILURE_ID:
            try:
                notes.append(await replay_handler_transaction(reader, apply=not read_only))
            except AmigaFuseError as exc:
                notes.append(
                    f"the volume has an unfinished SmartFilesystem transaction (TRFA) that could not be "
                    f"replayed here ({exc}): mounted read-only; mount it once on AmigaOS so the handler "
                    "replays it"
                )
                read_only = True
        elif tr_id == codec.JOURNAL_HEADER_ID:
            try:
                note = await replay_journal(io, reader, apply=not read_only)
                if note:
                    notes.append(note)
            except CorruptError as exc:
                notes.append(f"the amigafuse journal is damaged ({exc}): mounted read-only")
                read_only = True
        elif tr_id != codec.TRANSACTIONOK_ID or not codec.checksum_ok(tr_data, root.sfs2):
            notes.append(f"the transaction block {tr} is not a valid TROK block: mounted read-only")
            read_only = True
        if not read_only:
            freemap = await load_freemap(reader, notes)
            if freemap is None:
                read_only = True
            else:
                reader = SfsWriter(io, root, freemap)
        vol = cls(io, reader, read_only=read_only, show_recycled=show_recycled, notes=notes)
        root_obj = (await reader.locate(codec.ROOTNODE)).obj
        if not root_obj.is_dir:
            raise CorruptError("the root object is not a directory", block=root.rootobjectcontainer, field="bits")
        vol._label = root_obj.name.decode("latin-1")
        return vol

    @property
    def _max_file_size(self) -> int:
        return (1 << 48) - 1 if self.r.sfs2 else 0x7FFFFFFF

    # ------------------------------------------------------------------ properties
    @property
    def info(self) -> VolumeInfo:
        return VolumeInfo(
            label=self._label,
            dostype=codec.ROOT_ID_SFS2 if self.r.sfs2 else codec.ROOT_ID_SFS0,
            block_size=self.r.block_size,
            read_only=self._read_only,
            max_name_length=MAX_NAME_LENGTH,
            max_comment_length=MAX_COMMENT_LENGTH,
            case_sensitive=self.r.case_sensitive,
            created=self._created,
            notes=tuple(self._notes),
        )

    @property
    def root_id(self) -> int:
        return codec.ROOTNODE

    # ------------------------------------------------------------------ identity
    def _oid(self, node: int) -> int:
        """The object id of the object on ``node`` (module docstring, "Identity")."""
        return self._id_of_node.get(node, node)

    def _node(self, object_id: int) -> int:
        """The node of object ``object_id``.  NotFound for the id of an object deleted
        in this session (its node may carry another object by now)."""
        node = self._node_of_id.get(object_id)
        if node is not None:
            return node
        if object_id >= FRESH_ID_BASE:
            raise NotFound(f"object {object_id} no longer exists")
        w = self.w
        if w is not None and object_id in w.removed_nodes:
            raise NotFound(f"object {object_id} no longer exists")
        return object_id

    def _new_id(self, node: int) -> int:
        """The id of a new object on ``node``: the node number, unless that number
        named an object deleted in this session (then a fresh id)."""
        w = self.w
        old = self._id_of_node.pop(node, None)
        if old is not None:
            self._node_of_id.pop(old, None)
        if w is None or (node not in w.removed_nodes and node not in w.op_removed):
            return node
        fresh = self._next_fresh_id
        self._next_fresh_id += 1
        self._id_of_node[node] = fresh
        self._node_of_id[fresh] = node
        return fresh

    def set_busy(self, object_id: int, busy: bool) -> None:
        """Object ``object_id`` is open (``busy``) or no longer open: a purge of
        ``.recycled`` never deletes a busy file (it skips it; ENOSPC when only busy
        files are left).  Ids of objects that no longer exist are ignored."""
        if busy:
            self._busy.add(object_id)
        else:
            self._busy.discard(object_id)

    # ------------------------------------------------------------------ helpers
    async def _stat_of(self, obj: SfsObject) -> Stat:
        bs = self.r.block_size
        if obj.is_dir:
            kind, size, blocks, target = Kind.DIR, 0, 1, None
        elif obj.is_softlink:
            kind, size, blocks = Kind.SOFTLINK, 0, 1
            target = (await self.r.softlink_target(obj)).decode("latin-1")
        else:
            kind, size, target = Kind.FILE, obj.size, None
            blocks = (obj.size + bs - 1) // bs
        name = obj.name.decode("latin-1") if obj.objectnode != codec.ROOTNODE else ""
        return Stat(
            object_id=self._oid(obj.objectnode),
            name=name,
            kind=kind,
            size=size,
            protection=obj.protection ^ PROTECTION_INVERT,
            date=DateStamp.from_seconds_since_1978(obj.datemodified),
            comment=obj.comment.decode("latin-1"),
            nlink=1,
            uid=obj.owneruid,
            gid=obj.ownergid,
            link_target=target,
            disk_blocks=blocks,
        )

    async def _dir(self, dir_id: int) -> Located:
        loc = await self.r.locate(dir_id)
        if not loc.obj.is_dir:
            raise NotADirectory(f"object {dir_id} is not a directory")
        return loc

    def _check_writable(self) -> None:
        if self._read_only:
            raise ReadOnlyFilesystem("the SFS volume is mounted read-only")

    # ------------------------------------------------------------------ queries
    async def getattr(self, object_id: int) -> Stat:
        async with self._locked:
            return await self._stat_of((await self.r.locate(self._node(object_id))).obj)

    async def lookup(self, dir_id: int, name: str) -> Stat:
        raw = encode_name(name)
        async with self._locked:
            d = await self._dir(self._node(dir_id))
            loc = await self.r.find_in_dir(d.obj, raw)
            if loc is None:
                raise NotFound(f"{name!r} not found")
            return await self._stat_of(loc.obj)

    async def readdir(self, dir_id: int) -> list[Stat]:
        async with self._locked:
            dir_node = self._node(dir_id)
            d = await self._dir(dir_node)
            out = []
            entries = await self.r.dir_entries(d.obj)
            self.r.index_dir(dir_node, entries)
            for loc in entries:
                if loc.obj.bits & codec.OTYPE_HIDDEN and not self.show_recycled:
                    continue
                out.append(await self._stat_of(loc.obj))
            return out

    async def _file_object(self, object_id: int) -> SfsObject:
        """The file ``object_id`` names, for a read (call holding the lock).
        IsADirectory, InvalidArgument (a soft link), NotFound."""
        obj = (await self.r.locate(self._node(object_id))).obj
        if obj.is_dir:
            raise IsADirectory(f"object {object_id} is a directory")
        if obj.is_softlink:
            raise InvalidArgument(f"object {object_id} is a soft link")
        return obj

    async def read(self, object_id: int, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument("negative offset or length")
        async with self._locked:
            obj = await self._file_object(object_id)
            return await self.r.read_data(obj, offset, length)

    async def read_lease(self, object_id: int, offset: int, length: int) -> ReadLease:
        """:meth:`read` in a buffer the device may lend (Volume.read_lease; the caller
        releases it).  The file's extents are walked holding the lock; the data is read
        outside it (operations that change blocks wait for such reads, see amigafuse.fs.locking),
        one device request per contiguous run, and a read that is one run comes back in
        the device's own buffer.  Blocks with changes not yet written back (a writable
        volume's pending data, a read-only volume's journal overlay) are read holding
        the lock, through the copying path.  Raises as :meth:`read`."""
        if offset < 0 or length < 0:
            raise InvalidArgument("negative offset or length")
        async with self._locked_beside_reads:
            obj = await self._file_object(object_id)
            runs, skip, nbytes = await self.r.data_runs(obj, offset, length)
            if not runs:
                return ReadLease.of(b"")
            w = self.w
            if _touches(runs, self.r.overlay_data) or (w is not None and _touches(runs, w.pending_data)):
                return ReadLease.of(await self.r.read_data(obj, offset, length))
            self._data_reads += 1
            if self._data_reads == 1:
                self._reads_done = trio.Event()
        try:
            if len(runs) == 1:
                lease = await self.io.read_lease(*runs[0])
                return lease.narrowed(skip, skip + nbytes)
            bs = self.r.block_size
            out = bytearray(sum(n for _, n in runs) * bs)
            pos = 0
            for disk, n in runs:
                with await self.io.read_lease(disk, n) as part:
                    out[pos : pos + n * bs] = part.view
                pos += n * bs
            return ReadLease.of(memoryview(out)[skip : skip + nbytes])
        finally:
            self._data_reads -= 1
            if not self._data_reads:
                self._reads_done.set()

    async def readlink(self, object_id: int) -> str:
        async with self._locked:
            obj = (await self.r.locate(self._node(object_id))).obj
            if not obj.is_softlink:
                raise InvalidArgument(f"object {object_id} is not a soft link")
            return (await self.r.softlink_target(obj)).decode("latin-1")

    async def statfs(self) -> StatFs:
        """Free blocks as the handler's Info reports them (``fillinfodata``): the
        bitmap's free blocks plus the blocks of the files in ``.recycled``, which the
        handler (and amigafuse) purge whenever the space is needed."""
        async with self._locked:
            w = self.w
            ri = await self.r.root_info()
            # Writable: the live count (the root info is brought up to date at commit).
            free = w.freemap.free_count if w is not None else ri.freeblocks
            if self.root.recycled:
                free += ri.deletedblocks
        return StatFs(
            block_size=self.r.block_size,
            total_blocks=self.root.totalblocks,
            free_blocks=min(free, self.root.totalblocks),
            max_name_length=MAX_NAME_LENGTH,
        )

    # ------------------------------------------------------------------ mutations
    async def _mutate(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one mutation atomically (rolled back on any exception or cancellation).

        A mutation that finds no space (NoSpace from the allocator, or records of its
        transaction that would not fit in the blocks usable for a TRST chain) is undone
        and retried after ``_free_up_space`` (the handler's ``freeupspace``: commit the
        pending transaction, purge ``.recycled``), until nothing more can be freed;
        then NoSpace.  So no commit ever writes in place without its records."""
        async with self._locked:
            self._check_writable()
            w = self.w
            assert w is not None
            if self._near_full and (w.pending or w.pending_data):
                # Nearly full: commit what is pending (it fitted) so the exact check
                # below only has this operation's records to compute.
                with trio.CancelScope(shield=True):
                    await w.commit()
            while True:
                w.begin()
                try:
                    result = await fn()
                    self._near_full = not w.room_for(OPERATION_MARGIN)
                    if self._near_full and not await w.chain_fits():
                        raise NoSpace("the SFS volume is too full to record this change safely")
                except NoSpace:
                    w.rollback()
                    if await self._free_up_space(w):
                        continue
                    raise
                except BaseException:
                    w.rollback()
                    raise
                w.end()
                break
            if w.needs_commit():
                with trio.CancelScope(shield=True):
                    await w.commit()
            return result

    async def _free_up_space(self, w: SfsWriter) -> bool:
        """Make room as the handler's ``freeupspace`` does; whether anything changed.
        Called under the lock, with no operation running."""
        changed = False
        if w.pending or w.pending_data:
            # (A failed operation may leave only its dirty bitmap marks: no progress.)
            with trio.CancelScope(shield=True):
                await w.commit()  # blocks freed by it become usable
            changed = True
        if await self._purge_recycled(w):
            with trio.CancelScope(shield=True):
                await w.commit()
            changed = True
        return changed

    async def _purge_recycled(self, w: SfsWriter) -> bool:
        """Delete files from ``.recycled`` as the handler's ``cleanupdeletedfiles``
        does; whether any was deleted.  Each pass takes the first file of the *last*
        container of the directory's chain (the oldest ones), going to earlier
        containers when that one holds none; passes repeat while the file was found
        past the first container, up to 10 files or 1024 KiB.  Busy (open) files are
        skipped, as the handler skips files it cannot lock.  Each file is deleted in
        its own operation (undone whole if it fails).  Called under the lock."""
        if not self.root.recycled:
            return False
        files = kib = 0
        while kib < 1024 and files < 10:
            try:
                rec = (await w.locate(codec.RECYCLEDNODE)).obj
            except NotFound:
                break
            if not rec.is_dir:
                break
            containers = await w.dir_containers(rec)
            deleted = False
            index = len(containers) - 1
            while index >= 0:
                _, oc = containers[index]
                for obj in oc.objects:
                    if obj.is_dir or obj.is_softlink or obj.bits & codec.OTYPE_UNDELETABLE:
                        continue
                    if self._oid(obj.objectnode) in self._busy:
                        continue  # open (an unlinked file still in use): kept
                    w.begin()
                    try:
                        await self._delete(await w.locate(obj.objectnode))
                        if not await w.chain_fits():
                            raise NoSpace("no room for the records of a purge")
                    except AmigaFuseError:
                        w.rollback()
                        return files > 0
                    except BaseException:
                        w.rollback()
                        raise
                    w.end()
                    kib += obj.size >> 10
                    files += 1
                    deleted = True
                    break
                if deleted or index == 0:
                    break
                index -= 1
            if index <= 0:
                break
        return files > 0

    async def _after_recycling(self) -> None:
        """The handler's rule after a delete or a file creation: more than 35 files in
        ``.recycled`` start a purge (``cleanupdeletedfiles``).  ``w.deleted_files``
        (kept by ``adjust_deleted``) spares the lock and the root info read when the
        count is known to be low."""
        w = self.w
        if not self.root.recycled or self._read_only or w is None:
            return
        if w.deleted_files is not None and w.deleted_files <= RECYCLED_PURGE_FILES:
            return
        async with self._locked:
            ri = await w.root_info()
            w.deleted_files = ri.deletedfiles
            if ri.deletedfiles > RECYCLED_PURGE_FILES:
                await self._purge_recycled(w)
                if w.needs_commit():
                    with trio.CancelScope(shield=True):
                        await w.commit()

    @property
    def w(self) -> SfsWriter | None:
        return self.r if isinstance(self.r, SfsWriter) else None

    def _writer(self) -> SfsWriter:
        w = self.w
        if w is None:
            raise ReadOnlyFilesystem("the SFS volume is mounted read-only")
        return w

    async def _touch(self, node: int) -> None:
        w = self._writer()
        obj = (await w.locate(node)).obj
        now = now_seconds()
        if obj.datemodified == now and not obj.protection & FIBF_ARCHIVE:
            return  # nothing would change (dates are whole seconds)
        await w.update_object(node, obj.evolve(datemodified=now, protection=obj.protection & ~FIBF_ARCHIVE))

    async def _new_entry(self, dir_id: int, name: str, bits: int, protection: int) -> tuple[int, SfsObject]:
        """A new object in directory ``dir_id`` (an object id); its node and object."""
        w = self._writer()
        raw = encode_name(name)
        dir_node = self._node(dir_id)
        if dir_node == codec.RECYCLEDNODE:
            raise PermissionDenied("nothing can be created in .recycled (the handler keeps it for deleted files)")
        d = await self._dir(dir_node)
        if dir_node not in w.dir_index:
            w.index_dir(dir_node, await w.dir_entries(d.obj))
        if await w.find_in_dir(d.obj, raw) is not None:
            raise Exists(f"{name!r} already exists")
        obj = SfsObject(0, 0, 0, protection ^ PROTECTION_INVERT, 0, 0, now_seconds(), bits, raw, b"", w.sfs2)
        node = await w.add_object(dir_node, obj)
        self._new_id(node)
        await self._touch(dir_node)
        return node, obj.evolve(objectnode=node)

    async def create(self, dir_id: int, name: str, *, protection: int = 0) -> Stat:
        async def op() -> Stat:
            _, obj = await self._new_entry(dir_id, name, 0, protection)
            return await self._stat_of(obj)

        st = await self._mutate(op)
        await self._after_recycling()
        return st

    async def mkdir(self, dir_id: int, name: str) -> Stat:
        async def op() -> Stat:
            w = self._writer()
            node, obj = await self._new_entry(dir_id, name, codec.OTYPE_DIR, 0)
            ht = await w.alloc_admin()
            buf = bytearray(w.block_size)
            struct.pack_into(">I", buf, 12, node)
            w.put(ht, w.finish(buf, codec.HASHTABLE_ID, ht))
            await w.update_object(node, replace(obj, data=ht))
            return await self._stat_of((await w.locate(node)).obj)

        return await self._mutate(op)

    async def symlink(self, dir_id: int, name: str, target: str) -> Stat:
        try:
            raw_target = target.encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidName(f"link target {target!r} has characters outside Latin-1") from None
        if not raw_target or 0 in raw_target or len(raw_target) > self.r.block_size - codec.SOFTLINK_HEADER - 1:
            raise InvalidArgument(f"link target {target!r} is empty or too long for one SFS block")

        async def op() -> Stat:
            w = self._writer()
            node, obj = await self._new_entry(dir_id, name, codec.OTYPE_LINK, 0)
            blk = await w.alloc_admin()
            buf = bytearray(w.block_size)
            struct.pack_into(">III", buf, 12, node, 0, 0)
            buf[codec.SOFTLINK_HEADER : codec.SOFTLINK_HEADER + len(raw_target)] = raw_target
            w.put(blk, w.finish(buf, codec.SOFTLINK_ID, blk))
            await w.update_object(node, replace(obj, data=blk))
            return await self._stat_of((await w.locate(node)).obj)

        return await self._mutate(op)

    async def link(self, object_id: int, dir_id: int, name: str) -> Stat:
        self._check_writable()
        raise NotSupported("SmartFilesystem has no hard links; use a soft link")

    async def _file(self, object_id: int) -> Located:
        loc = await self.r.locate(object_id)
        if loc.obj.is_dir:
            raise IsADirectory(f"object {object_id} is a directory")
        if loc.obj.is_softlink:
            raise InvalidArgument(f"object {object_id} is a soft link")
        return loc

    async def _write(self, object_id: int, offset: int, data: bytes) -> None:
        """Write into the file on node ``object_id`` (a node, not an id)."""
        w = self._writer()
        loc = await self._file(object_id)
        obj = loc.obj
        bs = w.block_size
        size = obj.size
        end = offset + len(data)
        if end > self._max_file_size:
            raise FileTooLarge(f"SFS files end at {self._max_file_size} bytes")
        start = min(offset, size)
        if offset > size:
            data = bytes(offset - size) + data
        old = await w.file_extents(obj)
        extents = old
        have = sum(n for _, n in old)
        need = (end + bs - 1) // bs
        if need > have:
            extents, _ = w.grow_extents(object_id, old, need - have)
        first, last = start // bs, (end - 1) // bs
        buf = bytearray((last - first + 1) * bs)
        if start % bs:
            head = w.map_runs(extents, first, 1)[0][0]
            buf[:bs] = await w.read_file_blocks(head, 1)
        if end % bs and end < size and (last != first or not start % bs):
            tail = w.map_runs(extents, last, 1)[0][0]
            buf[-bs:] = await w.read_file_blocks(tail, 1)
        buf[start - first * bs : end - first * bs] = data
        pos = 0
        for disk, count in w.map_runs(extents, first, last - first + 1):
            await w.write_data(disk, buf[pos : pos + count * bs])
            pos += count * bs
        if extents != old:
            await w.sync_extents(object_id, old, extents)
        new_first = extents[0][0] if extents else 0
        in_recycled = (await w.container(loc.container)).parent == codec.RECYCLEDNODE
        # Extent and bitmap changes above touch no object container: ``loc`` holds.
        await w.update_object(
            object_id,
            obj.evolve(size=max(size, end), data=new_first, datemodified=now_seconds(),
                       protection=obj.protection & ~FIBF_ARCHIVE),
            loc,
        )  # fmt: skip
        await self._recount_recycled(in_recycled, size, max(size, end))

    async def _recount_recycled(self, in_recycled: bool, old_size: int, new_size: int) -> None:
        """Keep the root info's block count exact when a file already in
        ``.recycled`` (an open file unlinked under FUSE) changes size: the count is of
        the blocks of the size, as ``_delete`` takes it off again."""
        w = self._writer()
        bs = w.block_size
        delta = (new_size + bs - 1) // bs - (old_size + bs - 1) // bs
        if delta and in_recycled:
            await w.adjust_deleted(0, delta)

    async def write(self, object_id: int, offset: int, data: bytes) -> int:
        if offset < 0:
            raise InvalidArgument("negative offset")
        if not data:
            return 0
        data = bytes(data)

        async def op() -> int:
            await self._write(self._node(object_id), offset, data)
            return len(data)

        return await self._mutate(op)

    async def truncate(self, object_id: int, size: int) -> None:
        if size < 0:
            raise InvalidArgument("negative size")

        async def op() -> None:
            w = self._writer()
            node = self._node(object_id)
            loc = await self._file(node)
            obj = loc.obj
            if size > obj.size:
                pos = obj.size
                while pos < size:
                    n = min(ZERO_CHUNK, size - pos)
                    await self._write(node, pos, bytes(n))
                    pos += n
                return
            in_recycled = (await w.container(loc.container)).parent == codec.RECYCLEDNODE
            old = await w.file_extents(obj)
            keep = (size + w.block_size - 1) // w.block_size
            extents = w.shrink_extents(old, keep)
            if extents != old:
                await w.sync_extents(node, old, extents)
            await w.update_object(
                node,
                replace(obj, size=size, data=extents[0][0] if extents else 0, datemodified=now_seconds(),
                        protection=obj.protection & ~FIBF_ARCHIVE),
            )  # fmt: skip
            await self._recount_recycled(in_recycled, obj.size, size)

        await self._mutate(op)

    async def _delete(self, loc: Located) -> None:
        """Remove an object and free what it owns (directories must be empty)."""
        w = self._writer()
        obj = loc.obj
        if obj.bits & codec.OTYPE_UNDELETABLE:
            raise PermissionDenied(f"{obj.name.decode('latin-1')!r} is protected from deletion by the filesystem")
        if obj.is_dir:
            if obj.firstdirblock and await w.dir_entries(obj):
                raise DirectoryNotEmpty(f"directory {obj.name.decode('latin-1')!r} is not empty")
            if obj.hashtable:
                await w.free_admin(w.check_pointer(obj.hashtable, obj.objectnode, "hashtable"))
        elif obj.is_softlink:
            if obj.data:
                await w.free_admin(w.check_pointer(obj.data, obj.objectnode, "softlink data"))
        else:
            old = await w.file_extents(obj)
            if (await w.container(loc.container)).parent == codec.RECYCLEDNODE:
                # The handler's count (``simpleremoveobject``): blocks of the size.
                await w.adjust_deleted(-1, -((obj.size + w.block_size - 1) // w.block_size))
            w.shrink_extents(old, 0)
            await w.sync_extents(obj.objectnode, old, [])
            w.extent_cache.pop(obj.objectnode, None)
        await w.remove_object(loc)

    async def _recycled_name(self, rec: SfsObject, name: bytes) -> bytes | None:
        """A free name in ``.recycled`` for ``name``, as the handler's
        ``safedeleteobjectquick`` picks it: the name itself, else the name cut to
        ``max length - 4`` characters plus ``$`` and three letters A..P counting up
        (``$AAA``, ``$AAB``, ...); None after 4096 tries."""
        w = self._writer()
        cut = name[: MAX_NAME_LENGTH - 4]
        candidate = name
        for count in range(0x1000):
            if await w.find_in_dir(rec, candidate) is None:
                return candidate
            candidate = cut + b"$" + bytes([65 + ((count >> 8) & 15), 65 + ((count >> 4) & 15), 65 + (count & 15)])
        return None

    async def _remove(self, loc: Located, recycle: bool = True) -> None:
        """Delete as the handler's ``deleteobject`` does: on a volume with a recycled
        directory (root bit, the handler's default), a file outside ``.recycled`` is
        moved into it (its node, attributes and data kept; the root info counts it);
        directories, soft links and files in ``.recycled`` are deleted at once, and so
        is everything when ``recycle`` is False."""
        w = self._writer()
        obj = loc.obj
        if obj.is_dir or obj.is_softlink or not self.root.recycled or not recycle:
            await self._delete(loc)
            return
        if obj.bits & codec.OTYPE_UNDELETABLE:
            raise PermissionDenied(f"{obj.name.decode('latin-1')!r} is protected from deletion by the filesystem")
        parent = (await w.container(loc.container)).parent
        try:
            rec = (await w.locate(codec.RECYCLEDNODE)).obj
        except NotFound:
            rec = None
        name = None if rec is None or not rec.is_dir or parent == codec.RECYCLEDNODE else await self._recycled_name(rec, obj.name)
        if rec is None or name is None:
            await self._delete(loc)
            return
        node = obj.objectnode
        await w.hash_remove((await w.locate(parent)).obj, node, obj.name)
        moved = replace((await w.locate(node)).obj, name=name)
        await w._remove_from_container(await w.locate(node))
        block = await w._place(codec.RECYCLEDNODE, moved)
        await w.set_node(node, data=block)
        await w.hash_add((await w.locate(codec.RECYCLEDNODE)).obj, node, name)
        await w.adjust_deleted(1, (obj.size + w.block_size - 1) // w.block_size)
        await self._touch(codec.RECYCLEDNODE)

    async def _entry(self, dir_id: int, name: str) -> Located:
        raw = encode_name(name)
        d = await self._dir(self._node(dir_id))
        loc = await self.r.find_in_dir(d.obj, raw)
        if loc is None:
            raise NotFound(f"{name!r} not found")
        return loc

    async def unlink(self, dir_id: int, name: str) -> None:
        recycle = True

        async def op() -> None:
            loc = await self._entry(dir_id, name)
            if loc.obj.is_dir:
                raise IsADirectory(f"{name!r} is a directory")
            await self._remove(loc, recycle)
            await self._touch(self._node(dir_id))

        try:
            await self._mutate(op)
        except NoSpace:
            # No room even to move it into .recycled (a full volume): delete it at
            # once rather than refuse (the handler would answer "disk full").
            recycle = False
            await self._mutate(op)
        await self._after_recycling()

    async def rmdir(self, dir_id: int, name: str) -> None:
        async def op() -> None:
            loc = await self._entry(dir_id, name)
            if not loc.obj.is_dir:
                raise NotADirectory(f"{name!r} is not a directory")
            await self._delete(loc)
            await self._touch(self._node(dir_id))

        await self._mutate(op)

    async def rename(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str) -> None:
        recycle = True
        src_dir_id, dst_dir_id = src_dir, dst_dir  # ids; the op works on their nodes

        async def op() -> None:
            w = self._writer()
            src_dir, dst_dir = self._node(src_dir_id), self._node(dst_dir_id)
            src = await self._entry(src_dir_id, src_name)
            if src.obj.bits & codec.OTYPE_UNDELETABLE:
                raise PermissionDenied(f"{src_name!r} is kept in place by the filesystem (undeletable)")
            raw = encode_name(dst_name)
            if dst_dir == codec.RECYCLEDNODE and src_dir != codec.RECYCLEDNODE:
                raise PermissionDenied("nothing can be moved into .recycled (the handler keeps it for deleted files)")
            dd = await self._dir(dst_dir)
            dst = await w.find_in_dir(dd.obj, raw)
            node = src.obj.objectnode
            if dst is not None and dst.obj.objectnode != node:
                if dst.obj.is_dir and not src.obj.is_dir:
                    raise IsADirectory(f"{dst_name!r} is a directory")
                if src.obj.is_dir and not dst.obj.is_dir:
                    raise NotADirectory(f"{dst_name!r} is not a directory")
            if src.obj.is_dir:
                cur = dst_dir
                for _ in range(w.total_blocks):
                    if cur == node:
                        raise InvalidArgument("cannot move a directory into itself")
                    if cur == codec.ROOTNODE:
                        break
                    cur = await w.parent_of(cur)
            if dst is not None and dst.obj.objectnode != node:
                await self._remove(dst, recycle)
            parent = await w.parent_of(node)
            if parent == codec.RECYCLEDNODE and dst_dir != parent and not src.obj.is_dir:
                # Taken back out of .recycled: the root info stops counting it.
                await w.adjust_deleted(-1, -((src.obj.size + w.block_size - 1) // w.block_size))
            pobj = (await w.locate(parent)).obj
            await w.hash_remove(pobj, node, src.obj.name)
            moved = replace((await w.locate(node)).obj, name=raw)
            await w._remove_from_container(await w.locate(node))
            block = await w._place(dst_dir, moved)
            await w.set_node(node, data=block)
            await w.hash_add((await w.locate(dst_dir)).obj, node, raw)
            await self._touch(parent)
            if dst_dir != parent:
                await self._touch(dst_dir)

        try:
            await self._mutate(op)
        except NoSpace:
            recycle = False  # as in unlink: the replaced file is deleted at once
            await self._mutate(op)
        await self._after_recycling()

    async def setattr(self, object_id: int, attrs: SetAttrs) -> Stat:
        comment = None
        if attrs.comment is not None:
            try:
                comment = attrs.comment.encode("latin-1")
            except UnicodeEncodeError:
                raise InvalidArgument("comments must be Latin-1") from None
            if len(comment) > MAX_COMMENT_LENGTH or 0 in comment:
                raise InvalidArgument(f"comments hold at most {MAX_COMMENT_LENGTH} characters")
        for value in (attrs.uid, attrs.gid):
            if value is not None and not 0 <= value <= 0xFFFF:
                raise InvalidArgument("SFS owner ids are 0..65535")

        async def op() -> Stat:
            w = self._writer()
            node = self._node(object_id)
            obj = (await w.locate(node)).obj
            new = obj
            if attrs.protection is not None:
                new = replace(new, protection=(attrs.protection ^ PROTECTION_INVERT) & 0xFFFFFFFF)
            if attrs.date is not None:
                new = replace(new, datemodified=min(0xFFFFFFFF, attrs.date.to_seconds_since_1978()))
            if comment is not None:
                new = replace(new, comment=comment)
            if attrs.uid is not None:
                new = replace(new, owneruid=attrs.uid)
            if attrs.gid is not None:
                new = replace(new, ownergid=attrs.gid)
            if new != obj:
                await w.update_object(node, new)
            return await self._stat_of((await w.locate(node)).obj)

        return await self._mutate(op)

    async def set_label(self, label: str) -> None:
        raw = encode_name(label)
        if len(raw) > MAX_LABEL_LENGTH:
            raise NameTooLong(f"volume names hold at most {MAX_LABEL_LENGTH} characters")

        async def op() -> None:
            w = self._writer()
            obj = (await w.locate(codec.ROOTNODE)).obj
            await w.update_object(codec.ROOTNODE, replace(obj, name=raw))
            self._label = label

        await self._mutate(op)

    async def sync(self) -> None:
        async with self._locked:
            w = self.w
            if w is None or self._read_only:
                return
            with trio.CancelScope(shield=True):
                await w.commit()
                await self.io.flush()

    async def close(self) -> None:
        if self._closed:
            return
        await self.sync()
        self._closed = True
