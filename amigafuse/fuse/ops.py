"""The pyfuse3 Operations adapter: translation between FUSE requests and ``fs.api.Volume``.

Translation only: no filesystem logic lives here.  One adapter serves either one volume
at the mount point itself (``-o partition=NAME``), or a whole disk: a read-only top
directory with one subdirectory per mounted partition, named by its DOS device name.

Invariants:
* Every engine error (``AmigaFuseError``) leaves as ``FUSEError(errno)``; anything else
  is logged with its traceback and leaves as EIO.  Nothing else escapes a handler.
* The kernel's lookup counts are mirrored in :class:`~amigafuse.fuse.inodes.InodeTable`:
  every reply that creates a kernel reference (lookup, create, mkdir, symlink, link,
  mknod, readdirplus entries) goes through ``InodeTable.ref``.
* The kernel caches entries and attributes for ``ENTRY_TIMEOUT``/``ATTR_TIMEOUT``.  Only
  this process changes the volume (a lock per image and partition keeps others out), and
  the kernel updates its caches for the changes it asks for itself.  What it cannot see
  is handled here: a protection change through the xattr (the mode) is invalidated, and
  a name found in another case than stored ("FOO" for "foo") is answered with entry
  timeout 0, so that second name is never cached and cannot outlive an unlink or rename
  of the real one; the other way round (``rm FOO`` while the kernel caches "foo"), the
  stored spelling's entry is invalidated right after the change (asynchronously: the
  kernel holds the directory's lock until we reply).
* Concurrency: handlers run as concurrent trio tasks.  Table updates happen between
  awaits (no await inside a read-modify-write of the table), so they need no lock; the
  engine serialises its own work (fs.api contract).  The kernel serialises requests
  that change one directory (it holds the directory's lock), so the lookups rename makes
  before renaming (the moved inode, RENAME_NOREPLACE) see the state the rename applies to.
* Deferred metadata: mode and mtime changes (setattr) of a file
  with open handles are kept in ``_deferred`` and handed to the engine in one setattr
  when its last handle is released (or at fsync, the periodic commit, unmount, or
  before an xattr request that reads or sets its protection).  ``cp -a`` sends three
  such changes per file (the kernel's own mtime, utimensat, chmod): one engine call
  instead of three, none of them while cp waits.  While deferred, every attribute reply (getattr, lookup,
  readdirplus, the protection xattr) shows them (``_attrs`` overlays ``_deferred``), so
  nothing the kernel caches is stale; the entry leaves ``_deferred`` only after the
  engine has them.  A change that fails then (the file was unlinked meanwhile, or the
  volume went read-only) is logged: close(2) has already returned.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as _stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from amigafuse.amiga.dates import DateStamp
from amigafuse.amiga.dostype import dostype_to_str
from amigafuse.errors import AmigaFuseError
from amigafuse.fs.api import Kind, SetAttrs, Stat, Volume
from amigafuse.fuse import mapping
from amigafuse.fuse.inodes import ROOT_INODE, TOP_SLOT, InodeTable
from amigafuse.fuse.options import MountOptions

log = logging.getLogger("amigafuse.fuse")

ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 60.0
BLKSIZE = 1 << 20  # st_blksize: asks cp & co. for big requests

XATTR_COMMENT = b"user.amiga.comment"
XATTR_PROTECTION = b"user.amiga.protection"
XATTR_VOLUME = b"user.amiga.volume"
XATTR_DOSTYPE = b"user.amiga.dostype"
# The stored spelling of an entry's name.  Setting it changes only the case: Linux cannot
# (rename(2) of a name to another spelling of itself never reaches a filesystem whose
# lookup finds both: the kernel sees one inode and does nothing, and mv says "are the
# same file").  Not listed by listxattr, so cp -a and rsync -X do not copy it.
XATTR_NAME = b"user.amiga.name"
_XATTRS = frozenset({XATTR_COMMENT, XATTR_PROTECTION, XATTR_VOLUME, XATTR_DOSTYPE, XATTR_NAME})

assert pyfuse3.ROOT_INODE == ROOT_INODE


@dataclass
class MountedVolume:
    """One volume this mount serves.  ``name`` is the DOS device name (``DH0``)."""

    name: str
    volume: Volume
    read_only: bool
    notes: list[str] = field(default_factory=list)
    # Mutating requests seen, and how many of them the last write-back covered
    # (commit_changed): the periodic commit skips volumes nobody changed.
    changes: int = 0
    committed: int = 0


@dataclass
class _DirHandle:
    inode: int
    entries: list[tuple[bytes, Stat]] | None = None


@dataclass
class _Deferred:
    """An open file's metadata changes not yet handed to its engine ("Deferred metadata")."""

    slot: int
    object_id: int
    handles: int = 1
    stat: Stat | None = None  # the engine's answer when last asked (None: ask again)
    protection: int | None = None
    date: DateStamp | None = None


class _translate:
    """Per-request context: logs the request under -d, turns engine errors into
    ``FUSEError(errno)`` and anything unexpected into EIO (logged with its traceback).
    A class, not a generator context manager: it runs for every request."""

    __slots__ = ("args", "op")

    def __init__(self, op: str, *args: object) -> None:
        self.op = op
        self.args = args
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r", op, args)

    def __enter__(self) -> None:
        return None

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            return
        op, args = self.op, self.args
        if isinstance(exc, FUSEError):
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s%r -> %s", op, args, errno.errorcode.get(exc.errno, exc.errno))
            return
        if isinstance(exc, AmigaFuseError):
            if exc.errno == errno.EIO:
                log.error("%s%r: %s", op, args, exc.message)
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("%s%r -> %s: %s", op, args, errno.errorcode.get(exc.errno, exc.errno), exc.message)
            raise FUSEError(exc.errno) from None
        if isinstance(exc, Exception):
            log.error("%s%r failed unexpectedly", op, args, exc_info=exc)
            raise FUSEError(errno.EIO) from None
        return  # cancellation and other BaseExceptions pass through


class AmigaOperations(pyfuse3.Operations):
    """pyfuse3 operations over one or more :class:`MountedVolume`."""

    supports_dot_lookup = True
    enable_acl = False

    def __init__(
        self,
        volumes: Sequence[MountedVolume],
        options: MountOptions,
        *,
        single: bool,
        mountpoint: str = "",
    ) -> None:
        super().__init__()
        if single and len(volumes) != 1:
            raise ValueError("a single-partition mount serves exactly one volume")
        self.volumes = list(volumes)
        self.options = options
        self.single = single
        self.mountpoint = os.path.abspath(mountpoint) if mountpoint else ""
        self.enable_writeback_cache = not all(v.read_only for v in self.volumes)
        self.table = InodeTable()
        # static per volume; VolumeInfo is built afresh on every access by some engines
        infos = [mv.volume.info for mv in self.volumes]
        self._block_sizes = [i.block_size for i in infos]
        self._max_names = [i.max_name_length for i in infos]
        self._case_sensitive = [i.case_sensitive for i in infos]
        self._mount_time_ns = time.time_ns()
        self._dir_handles: dict[int, _DirHandle] = {}
        self._deferred: dict[int, _Deferred] = {}  # inode -> changes kept until release
        # (protection, kind) -> st_mode: a volume has few distinct protections
        self._modes: dict[tuple[int, Kind], int] = {}
        # Open files: inode (the fh) -> [slot, object_id, handles].  The engine is told
        # when an object gets its first handle and loses its last (Volume.set_busy).
        self._open_files: dict[int, list[int]] = {}
        self._next_dir_handle = 1
        self.volume_roots: dict[int, int] = {}  # inode -> slot
        if single:
            self.table.pin_root(0, self.volumes[0].volume.root_id)
            self.volume_roots[ROOT_INODE] = 0
        else:
            self.table.pin_root(TOP_SLOT, 0)
            for slot, mv in enumerate(self.volumes):
                ino = self.table.pin(slot, mv.volume.root_id, parent=ROOT_INODE)
                self.volume_roots[ino] = slot

    # ------------------------------------------------------------------ helpers
    def _resolve(self, inode: int) -> tuple[int, int]:
        entry = self.table.resolve(inode)
        if entry is None:
            raise FUSEError(errno.ENOENT)
        return entry.slot, entry.object_id

    def _volume(self, slot: int) -> MountedVolume:
        return self.volumes[slot]

    def _writable(self, slot: int) -> Volume:
        if slot == TOP_SLOT:
            raise FUSEError(errno.EPERM)
        mv = self.volumes[slot]
        if mv.read_only:
            raise FUSEError(errno.EROFS)
        mv.changes += 1
        return mv.volume

    def _name(self, slot: int, raw: bytes) -> str:
        return mapping.name_from_fuse(raw, self._max_names[slot])

    def _attrs(self, slot: int, st: Stat, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        protection, date = st.protection, st.date
        deferred = self._deferred.get(inode)
        if deferred is not None:
            if deferred.protection is not None:
                protection = deferred.protection
            if deferred.date is not None:
                date = deferred.date
        mode = self._modes.get((protection, st.kind))
        if mode is None:
            if len(self._modes) > 1024:  # a hostile disk: every object different
                self._modes.clear()
            mode = self._modes[(protection, st.kind)] = mapping.protection_to_mode(
                protection, st.kind, self.options.umask
            )
        a.st_mode = mode
        # Directories: 1, the "not counted" convention (as btrfs): find & co. then never
        # infer the number of subdirectories from it.
        a.st_nlink = 1 if st.kind is Kind.DIR else max(1, st.nlink)
        a.st_uid = self.options.uid
        a.st_gid = self.options.gid
        a.st_rdev = 0
        if st.kind is Kind.SOFTLINK:
            entry = self.table.resolve(inode)
            parent = entry.parent if entry is not None else None
            a.st_size = len(self._link_text(slot, st.link_target or "", parent))
        else:
            a.st_size = st.size
        a.st_blksize = BLKSIZE
        a.st_blocks = (st.disk_blocks * self._block_sizes[slot] + 511) // 512
        ns = date.to_unix_ns()
        a.st_atime_ns = ns
        a.st_mtime_ns = ns
        a.st_ctime_ns = ns
        return a

    def _top_attrs(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT_INODE
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = _stat.S_IFDIR | (0o555 & ~self.options.umask)
        a.st_nlink = 1
        a.st_uid = self.options.uid
        a.st_gid = self.options.gid
        a.st_size = 0
        a.st_blksize = BLKSIZE
        a.st_blocks = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._mount_time_ns
        return a

    def _entry(self, slot: int, st: Stat, parent: int) -> pyfuse3.EntryAttributes:
        """Reply for a request that gives the kernel a new reference to ``st``."""
        inode = self.table.ref(slot, st.object_id, parent=parent)
        return self._attrs(slot, st, inode)

    def _find_volume_by_name(self, raw: bytes) -> int | None:
        try:
            name = raw.decode("utf-8").upper()
        except UnicodeDecodeError:
            return None
        for slot, mv in enumerate(self.volumes):
            if mv.name.upper() == name:
                return slot
        return None

    async def _invalidate_attrs(self, inode: int) -> None:
        def run() -> None:
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError:
                log.debug("invalidate_inode(%d) failed", inode, exc_info=True)

        await trio.to_thread.run_sync(run)

    # ------------------------------------------------------------------ queries
    async def lookup(self, parent_inode: Any, name: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        with _translate("lookup", parent_inode, name):
            slot, object_id = self._resolve(parent_inode)
            if name == b".":
                return await self.getattr(parent_inode, ctx)
            if name == b"..":
                entry = self.table.resolve(parent_inode)
                up = entry.parent if entry is not None and entry.parent is not None else ROOT_INODE
                return await self.getattr(up, ctx)
            if slot == TOP_SLOT:
                found = self._find_volume_by_name(name)
                if found is None:
                    raise FUSEError(errno.ENOENT)
                mv = self.volumes[found]
                st = await mv.volume.getattr(mv.volume.root_id)
                return self._entry(found, st, ROOT_INODE)
            volume = self.volumes[slot].volume
            st = await volume.lookup(object_id, self._name(slot, name))
            attrs = self._entry(slot, st, parent_inode)
            if mapping.name_to_fuse(st.name) != name:
                # Found under another case ("FOO" for "foo"): the kernel must not cache
                # this second name, or it would outlive an unlink/rename of the real one.
                attrs.entry_timeout = 0
            return attrs

    async def forget(self, inode_list: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("forget(%r)", list(inode_list))
        for inode, count in inode_list:
            self.table.forget(inode, count)

    async def getattr(self, inode: Any, ctx: Any = None) -> pyfuse3.EntryAttributes:
        with _translate("getattr", inode):
            slot, object_id = self._resolve(inode)
            if slot == TOP_SLOT:
                return self._top_attrs()
            st = await self.volumes[slot].volume.getattr(object_id)
            return self._attrs(slot, st, inode)

    async def setattr(self, inode: Any, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        named = _fields_named(fields) if log.isEnabledFor(logging.DEBUG) else ()
        with _translate("setattr", inode, *named):
            slot, object_id = self._resolve(inode)
            if fields.update_uid and attr.st_uid != self.options.uid:
                raise FUSEError(errno.EPERM)
            if fields.update_gid and attr.st_gid != self.options.gid:
                raise FUSEError(errno.EPERM)
            if slot == TOP_SLOT:
                if fields.update_size or fields.update_mode or fields.update_mtime:
                    raise FUSEError(errno.EPERM)
                return self._top_attrs()
            if not (fields.update_size or fields.update_mode or fields.update_mtime):
                return await self.getattr(inode, ctx)  # atime/ctime only: nothing to store
            volume = self._writable(slot)
            inode = int(inode)
            deferred = self._deferred.get(inode)
            if deferred is not None and not fields.update_size:
                st = await self._deferred_stat(deferred)
                if fields.update_mode:
                    base = st.protection if deferred.protection is None else deferred.protection
                    deferred.protection = mapping.mode_to_protection(attr.st_mode, base)
                if fields.update_mtime:
                    deferred.date = DateStamp.from_unix_ns(attr.st_mtime_ns)
                return self._attrs(slot, st, inode)
            if fields.update_size:
                await volume.truncate(object_id, attr.st_size)
            old = await volume.getattr(object_id)
            protection = date = None
            if deferred is not None:  # a truncate of an open file: its deferred changes too
                protection, date = deferred.protection, deferred.date
                deferred.protection = deferred.date = deferred.stat = None
            if fields.update_mode:
                base = old.protection if protection is None else protection
                protection = mapping.mode_to_protection(attr.st_mode, base)
            if fields.update_mtime:
                date = DateStamp.from_unix_ns(attr.st_mtime_ns)
            # no engine change (and no dirty header) when nothing changes
            if protection == old.protection:
                protection = None
            if date == old.date:
                date = None
            st = old
            if protection is not None or date is not None:
                st = await volume.setattr(object_id, SetAttrs(protection=protection, date=date))
            return self._attrs(slot, st, inode)

    async def _deferred_stat(self, deferred: _Deferred) -> Stat:
        st = deferred.stat
        if st is None:
            st = deferred.stat = await self.volumes[deferred.slot].volume.getattr(deferred.object_id)
        return st

    def _opened(self, inode: int, slot: int, object_id: int, st: Stat | None = None) -> None:
        """One more handle on ``inode``: its mode/mtime changes wait for the last release."""
        deferred = self._deferred.get(inode)
        if deferred is None:
            self._deferred[inode] = _Deferred(slot, object_id, stat=st)
        else:
            deferred.handles += 1

    async def _settle(self, inode: int) -> None:
        """Hand the engine the changes deferred for ``inode`` in one setattr.  Raises what
        the engine raises; the changes then stay deferred (cancellation too: applying
        them twice is harmless)."""
        deferred = self._deferred.get(inode)
        if deferred is None or (deferred.protection is None and deferred.date is None):
            return
        protection, date = deferred.protection, deferred.date
        # cleared before the await: a change arriving meanwhile waits for the next settle
        deferred.protection = deferred.date = deferred.stat = None
        try:
            await self.volumes[deferred.slot].volume.setattr(
                deferred.object_id, SetAttrs(protection=protection, date=date)
            )
        except BaseException:
            if deferred.protection is None:
                deferred.protection = protection
            if deferred.date is None:
                deferred.date = date
            raise

    async def _settle_quietly(self, inode: int, why: str) -> None:
        try:
            await self._settle(inode)
        except AmigaFuseError as exc:
            deferred = self._deferred.get(inode)
            if deferred is not None:
                deferred.protection = deferred.date = None  # not retried for ever
            level = logging.DEBUG if exc.errno == errno.ENOENT else logging.WARNING
            log.log(level, "inode %d: mode/date change not stored at %s: %s", inode, why, exc.message)

    async def _settle_slot(self, slot: int) -> None:
        """Every deferred change on volume ``slot`` (before its write-back)."""
        for inode in [i for i, d in self._deferred.items() if d.slot == slot]:
            await self._settle_quietly(inode, "write-back")
            deferred = self._deferred.get(inode)
            if deferred is not None and deferred.handles <= 0:
                del self._deferred[inode]  # left by a cancelled release, now settled

    async def readlink(self, inode: Any, ctx: Any) -> Any:
        with _translate("readlink", inode):
            slot, object_id = self._resolve(inode)
            if slot == TOP_SLOT:
                raise FUSEError(errno.EINVAL)
            target = await self.volumes[slot].volume.readlink(object_id)
            entry = self.table.resolve(inode)
            return self._link_text(slot, target, entry.parent if entry is not None else None)

    def _link_text(self, slot: int, target: str, parent: int | None) -> bytes:
        """A soft link's Amiga target as the Unix path shown by readlink."""
        mv = self.volumes[slot]
        depth = self.table.depth(parent, set(self.volume_roots)) if parent is not None else 0
        names = [mv.name, mv.volume.info.label]
        others: dict[str, str] = {}
        if not self.single:
            for other in self.volumes:
                if other is not mv:
                    others[other.name.upper()] = "../" + other.name
                    others.setdefault(other.volume.info.label.upper(), "../" + other.name)
        unix = mapping.amiga_link_to_unix(target, depth=depth or 0, volume_names=names, other_volumes=others)
        return unix.encode("utf-8", "surrogateescape")

    async def opendir(self, inode: Any, ctx: Any) -> Any:
        with _translate("opendir", inode):
            slot, object_id = self._resolve(inode)
            if slot != TOP_SLOT:
                st = await self.volumes[slot].volume.getattr(object_id)
                if st.kind is not Kind.DIR:
                    raise FUSEError(errno.ENOTDIR)
            fh = self._next_dir_handle
            self._next_dir_handle += 1
            self._dir_handles[fh] = _DirHandle(inode)
            return fh

    async def readdir(self, fh: Any, start_id: int, token: Any) -> None:
        with _translate("readdir", fh, start_id):
            handle = self._dir_handles.get(fh)
            if handle is None:
                raise FUSEError(errno.EBADF)
            slot, object_id = self._resolve(handle.inode)
            if handle.entries is None or start_id == 0:
                handle.entries = await self._list(slot, object_id)
            for index in range(start_id, len(handle.entries)):
                raw, st = handle.entries[index]
                st_slot = slot if slot != TOP_SLOT else self._slot_of_root(st)
                inode = self.table.peek(st_slot, st.object_id)
                attrs = self._attrs(st_slot, st, inode)
                if not pyfuse3.readdir_reply(token, raw, attrs, index + 1):
                    return
                self.table.ref(st_slot, st.object_id, parent=handle.inode)

    def _slot_of_root(self, st: Stat) -> int:
        for slot, mv in enumerate(self.volumes):
            if st.object_id == mv.volume.root_id and st.name == mv.name:
                return slot
        raise FUSEError(errno.EIO)

    async def _list(self, slot: int, object_id: int) -> list[tuple[bytes, Stat]]:
        if slot == TOP_SLOT:
            out = []
            for mv in self.volumes:
                st = await mv.volume.getattr(mv.volume.root_id)
                # The directory is named by the device, not the volume label.
                out.append((mv.name.encode("utf-8"), _renamed(st, mv.name)))
            return out
        entries = []
        for st in await self.volumes[slot].volume.readdir(object_id):
            raw = mapping.name_to_fuse(st.name)
            if raw is None:
                log.warning("skipping a directory entry Linux cannot show: %r", st.name)
                continue
            entries.append((raw, st))
        return entries

    async def releasedir(self, fh: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("releasedir(%r,)", fh)
        self._dir_handles.pop(fh, None)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        with _translate("statfs"):
            s = pyfuse3.StatvfsData()
            stats = [(mv, await mv.volume.statfs()) for mv in self.volumes]
            # One volume: its own numbers.  A whole disk: the sum, in the smallest block
            # size.  (The kernel names the inode statfs was asked for, but pyfuse3 does
            # not pass it on, so a whole-disk mount cannot answer per partition.)
            bsize = min(st.block_size for _, st in stats)
            s.f_bsize = s.f_frsize = bsize
            s.f_blocks = sum(st.total_blocks * st.block_size // bsize for _, st in stats)
            # free: what the disks hold; available: only on partitions we may write
            s.f_bfree = sum(st.free_blocks * st.block_size // bsize for _, st in stats)
            s.f_bavail = sum(
                (0 if mv.read_only else st.free_blocks) * st.block_size // bsize for mv, st in stats
            )
            s.f_files = sum(st.files for _, st in stats)
            s.f_ffree = sum(st.free_files for _, st in stats)
            s.f_favail = s.f_ffree
            s.f_namemax = min(st.max_name_length for _, st in stats)
            return s

    # ------------------------------------------------------------------ files
    async def open(self, inode: Any, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        with _translate("open", inode, flags):
            slot, object_id = self._resolve(inode)
            if slot == TOP_SLOT:
                raise FUSEError(errno.EISDIR)
            if flags & (os.O_WRONLY | os.O_RDWR):
                self._writable(slot)
            self._hold(inode, slot, object_id)  # before any await: busy from here on
            try:
                if flags & os.O_TRUNC:
                    await self._writable(slot).truncate(object_id, 0)
            except BaseException:
                self._unhold(inode)
                raise
            self._opened(int(inode), slot, object_id)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    def _hold(self, inode: int, slot: int, object_id: int) -> None:
        """One more open handle on ``inode`` (its fh); the first makes the object busy
        in its engine, so the engine does not delete it on its own (fs.api "Busy")."""
        held = self._open_files.get(inode)
        if held is None:
            self._open_files[inode] = [slot, object_id, 1]
            self.volumes[slot].volume.set_busy(object_id, True)
        else:
            held[2] += 1

    def _unhold(self, inode: int) -> None:
        """One handle on ``inode`` fewer; the last one makes the object not busy."""
        held = self._open_files.get(inode)
        if held is None:
            return
        held[2] -= 1
        if held[2] <= 0:
            del self._open_files[inode]
            self.volumes[held[0]].volume.set_busy(held[1], False)

    async def read(self, fh: Any, off: int, size: int) -> memoryview:  # type: ignore[override]
        # Zero copy: the engine may answer with a view of the device's DMA buffer (a
        # lease, see Volume.read_lease).  pyfuse3 passes what we return straight to
        # fuse_reply_buf, which copies it into the kernel, with no await in between
        # (pyfuse3 3.x handlers.pxi, fuse_read_async); the lease is given back only
        # after that: run_sync_soon callbacks run once this task has yielded.
        with _translate("read", fh, off, size):
            slot, object_id = self._resolve(fh)
            lease = await self.volumes[slot].volume.read_lease(object_id, off, size)
        if lease.lent:
            trio.lowlevel.current_trio_token().run_sync_soon(lease.release)
        return lease.view

    async def write(self, fh: Any, off: int, buf: bytes) -> int:
        with _translate("write", fh, off, len(buf)):
            slot, object_id = self._resolve(fh)
            written = await self._writable(slot).write(object_id, off, buf)
            deferred = self._deferred.get(fh)
            if deferred is not None:
                deferred.stat = None  # size and blocks changed
            return written

    # No flush(): pyfuse3 answers ENOSYS and the kernel stops sending FLUSH on every
    # close() (it still writes back its dirty pages first); durability is fsync/umount.

    async def release(self, fh: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("release(%r,)", fh)
        inode = int(fh)
        deferred = self._deferred.get(inode)
        try:
            if deferred is not None and deferred.handles == 1:
                # The last handle.  The entry stays (shown by _attrs) until the engine
                # has the changes, those that arrive during the await (a chmod by path)
                # included; each round either hands them over or drops them (logged).
                while deferred.protection is not None or deferred.date is not None:
                    await self._settle_quietly(inode, "release")
        finally:
            # Runs when cancelled too (unmount): the handle is gone either way.  Changes
            # still pending then stay in the entry for the write-back/unmount settle.
            if deferred is not None:
                deferred.handles -= 1  # an open() during the await keeps the entry
                pending = deferred.protection is not None or deferred.date is not None
                if (
                    deferred.handles <= 0
                    and not pending
                    and self._deferred.get(inode) is deferred
                ):
                    del self._deferred[inode]
            self._unhold(inode)

    async def fsync(self, fh: Any, datasync: bool) -> None:
        with _translate("fsync", fh):
            slot, _ = self._resolve(fh)
            if not self.volumes[slot].read_only:
                await self._settle(int(fh))
                await self.volumes[slot].volume.sync()

    async def fsyncdir(self, fh: Any, datasync: bool) -> None:
        with _translate("fsyncdir", fh):
            handle = self._dir_handles.get(fh)
            if handle is None:
                return
            slot, _ = self._resolve(handle.inode)
            if slot != TOP_SLOT and not self.volumes[slot].read_only:
                await self._settle_slot(slot)
                await self.volumes[slot].volume.sync()

    # ------------------------------------------------------------------ changes
    async def create(self, parent_inode: Any, name: Any, mode: int, flags: int, ctx: Any) -> Any:
        with _translate("create", parent_inode, name, oct(mode)):
            slot, dir_id = self._resolve(parent_inode)
            volume = self._writable(slot)
            protection = mapping.mode_to_protection(mode & ~ctx.umask, 0)
            st = await volume.create(dir_id, self._name(slot, name), protection=protection)
            attrs = self._entry(slot, st, parent_inode)
            self._hold(attrs.st_ino, slot, st.object_id)
            self._opened(attrs.st_ino, slot, st.object_id, st)
            return pyfuse3.FileInfo(fh=attrs.st_ino, keep_cache=True), attrs

    async def mknod(self, parent_inode: Any, name: Any, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        with _translate("mknod", parent_inode, name, oct(mode)):
            if not _stat.S_ISREG(mode):
                raise FUSEError(errno.EPERM)  # no devices, FIFOs or sockets on Amiga volumes
            slot, dir_id = self._resolve(parent_inode)
            volume = self._writable(slot)
            protection = mapping.mode_to_protection(mode & ~ctx.umask, 0)
            st = await volume.create(dir_id, self._name(slot, name), protection=protection)
            return self._entry(slot, st, parent_inode)

    async def mkdir(self, parent_inode: Any, name: Any, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        with _translate("mkdir", parent_inode, name):
            slot, dir_id = self._resolve(parent_inode)
            volume = self._writable(slot)
            st = await volume.mkdir(dir_id, self._name(slot, name))
            return self._entry(slot, st, parent_inode)

    async def symlink(self, parent_inode: Any, name: Any, target: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        with _translate("symlink", parent_inode, name, target):
            slot, dir_id = self._resolve(parent_inode)
            volume = self._writable(slot)
            try:
                text = bytes(target).decode("utf-8")
            except UnicodeDecodeError:
                raise FUSEError(errno.EINVAL) from None
            if any(ord(c) > 0xFF for c in text):
                raise FUSEError(errno.EINVAL)
            mv = self.volumes[slot]
            prefixes = []
            if self.mountpoint:
                prefixes.append(self.mountpoint if self.single else os.path.join(self.mountpoint, mv.name))
            amiga = None
            if not self.single:
                depth = self.table.depth(int(parent_inode), set(self.volume_roots))
                amiga = mapping.cross_volume_link(
                    text, depth=depth or 0, volume_dirs=[v.name for v in self.volumes if v is not mv]
                )
            if amiga is None:
                amiga = mapping.unix_link_to_amiga(
                    text, volume_label=mv.volume.info.label, mount_prefixes=prefixes
                )
            st = await volume.symlink(dir_id, self._name(slot, name), amiga)
            return self._entry(slot, st, parent_inode)

    async def link(self, inode: Any, new_parent_inode: Any, new_name: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        with _translate("link", inode, new_parent_inode, new_name):
            slot, object_id = self._resolve(inode)
            dslot, dir_id = self._resolve(new_parent_inode)
            if slot != dslot:
                raise FUSEError(errno.EXDEV)
            volume = self._writable(slot)
            st = await volume.link(object_id, dir_id, self._name(slot, new_name))
            return self._entry(slot, st, new_parent_inode)

    async def _lookup_quiet(self, slot: int, dir_id: int, name: str) -> Stat | None:
        try:
            return await self.volumes[slot].volume.lookup(dir_id, name)
        except AmigaFuseError:
            return None

    async def _stored_spelling(self, slot: int, dir_id: int, name: str) -> str | None:
        """The on-disk spelling of ``name`` when the volume compares names without case
        (None on case-sensitive volumes and for missing names)."""
        if self._case_sensitive[slot]:
            return None
        st = await self._lookup_quiet(slot, dir_id, name)
        return st.name if st is not None else None

    def _forget_stored_name(self, parent_inode: int, given: bytes, stored: str | None) -> None:
        """After an unlink, rmdir or rename of ``given``, the kernel may still cache the
        on-disk spelling ``stored`` (``foo`` when ``rm FOO`` was asked): that entry would
        go on naming the removed or moved object until its timeout.  It is dropped
        asynchronously (the kernel holds the directory's lock until we reply), so a
        lookup racing with the notification may still see it for a moment."""
        if stored is None:
            return
        raw = mapping.name_to_fuse(stored)
        if raw is not None and raw != given:
            pyfuse3.invalidate_entry_async(parent_inode, raw, ignore_enoent=True)

    async def unlink(self, parent_inode: Any, name: Any, ctx: Any) -> None:
        with _translate("unlink", parent_inode, name):
            slot, dir_id = self._resolve(parent_inode)
            volume = self._writable(slot)
            amiga = self._name(slot, name)
            stored = await self._stored_spelling(slot, dir_id, amiga)
            await volume.unlink(dir_id, amiga)
            self._forget_stored_name(int(parent_inode), name, stored)

    async def rmdir(self, parent_inode: Any, name: Any, ctx: Any) -> None:
        with _translate("rmdir", parent_inode, name):
            slot, dir_id = self._resolve(parent_inode)
            volume = self._writable(slot)
            amiga = self._name(slot, name)
            stored = await self._stored_spelling(slot, dir_id, amiga)
            await volume.rmdir(dir_id, amiga)
            self._forget_stored_name(int(parent_inode), name, stored)

    async def rename(
        self, parent_inode_old: Any, name_old: Any, parent_inode_new: Any, name_new: Any, flags: int, ctx: Any
    ) -> None:
        with _translate("rename", parent_inode_old, name_old, parent_inode_new, name_new, flags):
            slot, src_dir = self._resolve(parent_inode_old)
            dslot, dst_dir = self._resolve(parent_inode_new)
            if slot != dslot:
                raise FUSEError(errno.EXDEV)
            volume = self._writable(slot)
            if flags & pyfuse3.RENAME_EXCHANGE:
                raise FUSEError(errno.EINVAL)
            src = self._name(slot, name_old)
            dst = self._name(slot, name_new)
            st_src = await self._lookup_quiet(slot, src_dir, src)
            moved = self.table.find(slot, st_src.object_id) if st_src is not None else None
            st_dst = await self._lookup_quiet(slot, dst_dir, dst)
            same = st_src is not None and st_dst is not None and st_src.object_id == st_dst.object_id
            if flags & pyfuse3.RENAME_NOREPLACE and st_dst is not None and not (same and src_dir == dst_dir):
                raise FUSEError(errno.EEXIST)
            await volume.rename(src_dir, src, dst_dir, dst)
            if moved is not None:
                entry = self.table.resolve(moved)
                if entry is not None:
                    entry.parent = int(parent_inode_new)
            if not self._case_sensitive[slot]:
                self._forget_stored_name(int(parent_inode_old), name_old, st_src.name if st_src else None)
                if st_dst is not None and not same:
                    self._forget_stored_name(int(parent_inode_new), name_new, st_dst.name)

    # ------------------------------------------------------------------ xattrs
    async def getxattr(self, inode: Any, name: Any, ctx: Any) -> bytes:
        if name not in _XATTRS:
            # Answered first, before any inode lookup, engine call or log line: the
            # kernel asks security.capability before the first write of every new file
            # (cp -a: once per file), ls -l asks security.selinux and
            # system.posix_acl_access until told the namespace is unsupported (it then
            # stops for this mount).  ENOTSUP, not ENOATTR: the kernel caches neither
            # for a FUSE inode, so both cost one request, and ENOTSUP stops ls asking.
            # Never ENOSYS: the kernel would refuse every getxattr, user.amiga.* too,
            # for the rest of the mount.
            _refused("getxattr", inode, name)
            raise FUSEError(pyfuse3.ENOATTR if name.startswith(b"user.") else errno.ENOTSUP)
        with _translate("getxattr", inode, name):
            slot, object_id = self._resolve(inode)
            if slot == TOP_SLOT:
                raise FUSEError(pyfuse3.ENOATTR)
            mv = self.volumes[slot]
            st = await mv.volume.getattr(object_id)
            if name == XATTR_COMMENT:
                if not st.comment:
                    raise FUSEError(pyfuse3.ENOATTR)
                return st.comment.encode("utf-8")
            if name == XATTR_PROTECTION:
                deferred = self._deferred.get(int(inode))
                if deferred is not None and deferred.protection is not None:
                    return mapping.protection_to_string(deferred.protection).encode()
                return mapping.protection_to_string(st.protection).encode()
            if object_id == mv.volume.root_id and name == XATTR_VOLUME:
                return mv.volume.info.label.encode("utf-8")
            if object_id == mv.volume.root_id and name == XATTR_DOSTYPE:
                return dostype_to_str(mv.volume.info.dostype).encode()
            if name == XATTR_NAME and object_id != mv.volume.root_id:
                return st.name.encode("utf-8", "surrogateescape")
            raise FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: Any, ctx: Any) -> Any:
        with _translate("listxattr", inode):
            slot, object_id = self._resolve(inode)
            if slot == TOP_SLOT:
                return []
            mv = self.volumes[slot]
            st = await mv.volume.getattr(object_id)
            names = [XATTR_PROTECTION]
            if st.comment:
                names.append(XATTR_COMMENT)
            if object_id == mv.volume.root_id:
                names += [XATTR_VOLUME, XATTR_DOSTYPE]
            return names

    async def setxattr(self, inode: Any, name: Any, value: Any, ctx: Any) -> None:
        if name not in _XATTRS:
            # system.posix_acl_access (cp -a, once per file), security.*: not supported,
            # answered first (no inode lookup, no engine work, no lock).  cp then falls
            # back to a chmod, a setattr the adapter defers (see "Deferred metadata").
            # Not ENOSYS: the kernel would then refuse user.amiga.* too, for the rest
            # of the mount.
            _refused("setxattr", inode, name, value)
            raise FUSEError(errno.ENOTSUP)
        with _translate("setxattr", inode, name, value):
            slot, object_id = self._resolve(inode)
            volume = self._writable(slot)
            mv = self.volumes[slot]
            await self._settle(int(inode))  # the engine's protection and date are current
            try:
                text = bytes(value).decode("utf-8").rstrip("\0")
            except UnicodeDecodeError:
                raise FUSEError(errno.EINVAL) from None
            if name == XATTR_COMMENT:
                _latin1(text)
                if len(text) > mv.volume.info.max_comment_length:
                    raise FUSEError(errno.E2BIG)
                await volume.setattr(object_id, SetAttrs(comment=text))
            elif name == XATTR_PROTECTION:
                old = await volume.getattr(object_id)
                protection = mapping.string_to_protection(text, old.protection)
                await volume.setattr(object_id, SetAttrs(protection=protection))
                await self._invalidate_attrs(int(inode))
            elif name == XATTR_VOLUME and object_id == mv.volume.root_id:
                _latin1(text)
                if not text or ":" in text or "/" in text:
                    raise FUSEError(errno.EINVAL)
                await volume.set_label(text)
            elif name == XATTR_DOSTYPE and object_id == mv.volume.root_id:
                raise FUSEError(errno.EPERM)
            elif name == XATTR_NAME:
                await self._set_case(slot, object_id, int(inode), text)
            else:
                raise FUSEError(errno.ENOTSUP)

    async def _set_case(self, slot: int, object_id: int, inode: int, text: str) -> None:
        """Store ``text`` as the name of the entry ``inode`` was last seen under, when it
        names that same entry (another case of it).  EINVAL when it is another name (use
        mv), EEXIST when it names another entry, EPERM for a volume's top directory.

        Not atomic with the kernel's own renames (they hold the directory's lock, this
        does not): a rename of the entry between the check and the change makes the
        change fail with ENOENT, never hit another entry (the engine renames by name)."""
        mv = self.volumes[slot]
        volume = mv.volume
        entry = self.table.resolve(inode)
        if object_id == volume.root_id or entry is None or entry.parent is None:
            raise FUSEError(errno.EPERM)
        new = self._name(slot, text.encode("utf-8"))
        dslot, dir_id = self._resolve(entry.parent)
        if dslot != slot:
            raise FUSEError(errno.EPERM)
        st = await volume.getattr(object_id)
        if st.name == new:
            return
        current = await volume.lookup(dir_id, st.name)
        if current.object_id != object_id:
            raise FUSEError(errno.EINVAL)  # a hard link seen under another name
        try:
            target = await volume.lookup(dir_id, new)
        except AmigaFuseError:
            raise FUSEError(errno.EINVAL) from None  # not another case of the name: use mv
        if target.object_id != object_id:
            raise FUSEError(errno.EEXIST)
        await volume.rename(dir_id, st.name, dir_id, new)

    async def removexattr(self, inode: Any, name: Any, ctx: Any) -> None:
        with _translate("removexattr", inode, name):
            slot, object_id = self._resolve(inode)
            volume = self._writable(slot)
            if name == XATTR_COMMENT:
                await volume.setattr(object_id, SetAttrs(comment=""))
            elif name in (XATTR_PROTECTION, XATTR_VOLUME, XATTR_DOSTYPE, XATTR_NAME):
                raise FUSEError(errno.EPERM)
            else:
                raise FUSEError(pyfuse3.ENOATTR)

    # ------------------------------------------------------------------ shutdown
    async def commit_changed(self) -> None:
        """Write back every writable volume changed since its last commit (``sync``).

        Run periodically by the session (``-o commit=SECONDS``): without it, changes
        would reach the disk only on fsync or unmount, since a plain sync(1) never
        reaches a FUSE daemon.  Errors are logged, not raised: the next commit, fsync or
        unmount retries.  Runs beside other requests; the engines serialise their own
        state.  Cancellation: a cancelled sync leaves the volume as the engine's
        contract says (changes kept for the next write-back).
        """
        for mv in self.volumes:
            if mv.read_only or mv.changes == mv.committed:
                continue
            seen = mv.changes  # requests after this point are left for the next round
            try:
                await self._settle_slot(self.volumes.index(mv))
                await mv.volume.sync()
            except AmigaFuseError as exc:
                log.warning("%s: periodic write-back failed: %s", mv.name, exc.message)
                continue
            mv.committed = seen

    async def close_volumes(self) -> list[str]:
        """Close every volume (flush, mark clean).  Returns error messages (empty when fine)."""
        problems = []
        for inode in list(self._deferred):
            await self._settle_quietly(inode, "unmount")
        for mv in self.volumes:
            try:
                await mv.volume.close()
            except AmigaFuseError as exc:
                problems.append(f"{mv.name}: {exc.message}")
            except Exception as exc:
                log.exception("closing %s failed", mv.name)
                problems.append(f"{mv.name}: {exc!r}")
        return problems


_SETATTR_FIELDS = ("size", "mode", "uid", "gid", "atime", "mtime", "ctime")


def _fields_named(fields: Any) -> tuple[str, ...]:
    """The names of the attributes a setattr changes (for the -d log)."""
    return tuple(f for f in _SETATTR_FIELDS if getattr(fields, "update_" + f, False))


def _refused(op: str, *args: object) -> None:
    """The -d log line of a request answered before :class:`_translate` (the request
    counts of tests and benchmarks read it)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s%r", op, args)


def _latin1(text: str) -> None:
    if any(ord(c) > 0xFF for c in text):
        raise FUSEError(errno.EINVAL)


def _renamed(st: Stat, name: str) -> Stat:
    from dataclasses import replace

    return replace(st, name=name)
