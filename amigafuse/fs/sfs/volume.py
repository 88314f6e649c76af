"""The SFS :class:`~amigafuse.fs.api.Volume`.

Object ids are SFS object-node numbers (the root directory is node 1, ``.recycled``
node 2); they stay stable across renames because SFS never renumbers a node.

Locking: ``self._lock`` serialises every mutation and every read that walks metadata,
because a mutation changes several blocks between awaits (pending overlay, caches).
Reads of file data that was located under the lock may finish outside it.
"""

from __future__ import annotations

import trio

from amigafuse.amiga.dates import DateStamp
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.blockdev.window import FsBlockIO
from amigafuse.errors import (
    CorruptError,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    NotFound,
    ReadOnlyFilesystem,
)
from amigafuse.fs.api import Kind, SetAttrs, Stat, StatFs, Volume, VolumeInfo
from amigafuse.fs.sfs import codec
from amigafuse.fs.sfs.codec import SfsObject
from amigafuse.fs.sfs.reader import Located, SfsReader, read_root

MAX_NAME_LENGTH = 107  # SFS 1.277; 1.8x accepted 100
MAX_COMMENT_LENGTH = 79
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
        self._closed = False
        self._label = ""
        self._created = DateStamp.from_seconds_since_1978(self.root.datecreated)

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
        if root.totalblocks > io.block_count or root.totalblocks < 8:
            raise CorruptError(
                f"the SFS root claims {root.totalblocks} blocks; the partition has {io.block_count}",
                block=0,
                field="totalblocks",
            )
        reader = SfsReader(io, root)
        if device.read_only:
            read_only = True
        notes.append("SFS writing is not supported yet: mounted read-only")
        read_only = True
        vol = cls(io, reader, read_only=read_only, show_recycled=show_recycled, notes=notes)
        root_obj = (await reader.locate(codec.ROOTNODE)).obj
        if not root_obj.is_dir:
            raise CorruptError("the root object is not a directory", block=root.rootobjectcontainer, field="bits")
        vol._label = root_obj.name.decode("latin-1")
        return vol

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
            object_id=obj.objectnode,
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
        async with self._lock:
            return await self._stat_of((await self.r.locate(object_id)).obj)

    async def lookup(self, dir_id: int, name: str) -> Stat:
        raw = encode_name(name)
        async with self._lock:
            d = await self._dir(dir_id)
            loc = await self.r.find_in_dir(d.obj, raw)
            if loc is None:
                raise NotFound(f"{name!r} not found")
            return await self._stat_of(loc.obj)

    async def readdir(self, dir_id: int) -> list[Stat]:
        async with self._lock:
            d = await self._dir(dir_id)
            out = []
            for loc in await self.r.dir_entries(d.obj):
                if loc.obj.bits & codec.OTYPE_HIDDEN and not self.show_recycled:
                    continue
                out.append(await self._stat_of(loc.obj))
            return out

    async def read(self, object_id: int, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument("negative offset or length")
        async with self._lock:
            obj = (await self.r.locate(object_id)).obj
            if obj.is_dir:
                raise IsADirectory(f"object {object_id} is a directory")
            if obj.is_softlink:
                raise InvalidArgument(f"object {object_id} is a soft link")
            return await self.r.read_data(obj, offset, length)

    async def readlink(self, object_id: int) -> str:
        async with self._lock:
            obj = (await self.r.locate(object_id)).obj
            if not obj.is_softlink:
                raise InvalidArgument(f"object {object_id} is not a soft link")
            return (await self.r.softlink_target(obj)).decode("latin-1")

    async def statfs(self) -> StatFs:
        async with self._lock:
            ri = await self.r.root_info()
        return StatFs(
            block_size=self.r.block_size,
            total_blocks=self.root.totalblocks,
            free_blocks=min(ri.freeblocks, self.root.totalblocks),
            max_name_length=MAX_NAME_LENGTH,
        )

    # ------------------------------------------------------------------ mutations
    async def create(self, dir_id: int, name: str, *, protection: int = 0) -> Stat:
        self._check_writable()
        raise AssertionError("unreachable")

    async def mkdir(self, dir_id: int, name: str) -> Stat:
        self._check_writable()
        raise AssertionError("unreachable")

    async def symlink(self, dir_id: int, name: str, target: str) -> Stat:
        self._check_writable()
        raise AssertionError("unreachable")

    async def link(self, object_id: int, dir_id: int, name: str) -> Stat:
        self._check_writable()
        raise AssertionError("unreachable")

    async def write(self, object_id: int, offset: int, data: bytes) -> int:
        self._check_writable()
        raise AssertionError("unreachable")

    async def truncate(self, object_id: int, size: int) -> None:
        self._check_writable()

    async def unlink(self, dir_id: int, name: str) -> None:
        self._check_writable()

    async def rmdir(self, dir_id: int, name: str) -> None:
        self._check_writable()

    async def rename(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str) -> None:
        self._check_writable()

    async def setattr(self, object_id: int, attrs: SetAttrs) -> Stat:
        self._check_writable()
        raise AssertionError("unreachable")

    async def set_label(self, label: str) -> None:
        self._check_writable()

    async def sync(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True
