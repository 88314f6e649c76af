"""A small in-memory ``fs.api.Volume`` for testing the FUSE adapter on its own.

A test double, not an engine: it lets the adapter, the mount lifecycle and the option
handling be tested on a real FUSE mount independently of the FFS/SFS engines (those are
tested through the mount separately, on real images).  It follows the Volume contract:
case-insensitive names, hard links sharing an object id, soft links, protection bits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from amigafuse.amiga.dates import DateStamp
from amigafuse.errors import (
    CorruptError,
    DeviceGone,
    DirectoryNotEmpty,
    Exists,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotFound,
    ReadOnlyFilesystem,
)
from amigafuse.fs.api import Kind, SetAttrs, Stat, StatFs, Volume, VolumeInfo


@dataclass
class _Obj:
    object_id: int
    kind: Kind
    protection: int = 0
    date: DateStamp = field(default_factory=lambda: DateStamp.from_unix(time.time()))
    comment: str = ""
    data: bytearray = field(default_factory=bytearray)
    entries: dict[str, int] = field(default_factory=dict)  # upper-cased name -> id
    names: dict[str, str] = field(default_factory=dict)  # upper-cased -> as written
    target: str | None = None
    nlink: int = 1


class MemoryVolume(Volume):
    def __init__(self, label: str = "Mem", *, read_only: bool = False, max_name: int = 30,
                 total_blocks: int = 4096) -> None:
        self._info = VolumeInfo(label=label, dostype=0x444F5303, block_size=512,
                                read_only=read_only, max_name_length=max_name,
                                max_comment_length=79)
        self._objs: dict[int, _Obj] = {1: _Obj(1, Kind.DIR)}
        self._next = 2
        self._total_blocks = total_blocks
        self.closed = False
        self.close_count = 0

    @property
    def info(self) -> VolumeInfo:
        return self._info

    @property
    def root_id(self) -> int:
        return 1

    def _get(self, object_id: int) -> _Obj:
        obj = self._objs.get(object_id)
        if obj is None:
            raise NotFound(f"object {object_id} not found")
        return obj

    def _dir(self, dir_id: int) -> _Obj:
        obj = self._get(dir_id)
        if obj.kind is not Kind.DIR:
            raise NotADirectory(f"object {dir_id} is not a directory")
        return obj

    def _check_name(self, name: str) -> None:
        if not name or "/" in name or ":" in name or any(ord(c) > 255 for c in name):
            raise InvalidName(f"bad name {name!r}")
        if len(name) > self._info.max_name_length:
            raise NameTooLong(name)

    def _rw(self) -> None:
        if self._info.read_only:
            raise ReadOnlyFilesystem("read-only")

    def _stat(self, obj: _Obj, name: str) -> Stat:
        return Stat(object_id=obj.object_id, name=name, kind=obj.kind,
                    size=len(obj.data) if obj.kind is Kind.FILE else 0,
                    protection=obj.protection, date=obj.date, comment=obj.comment,
                    nlink=obj.nlink, link_target=obj.target,
                    disk_blocks=1 + (len(obj.data) + 511) // 512)

    def _name_of(self, object_id: int) -> str:
        for obj in self._objs.values():
            for key, oid in obj.entries.items():
                if oid == object_id:
                    return obj.names[key]
        return self._info.label

    async def getattr(self, object_id: int) -> Stat:
        return self._stat(self._get(object_id), self._name_of(object_id))

    async def lookup(self, dir_id: int, name: str) -> Stat:
        # Fault injection for the error-mapping tests: these names fail as a damaged disk,
        # a full volume or a bug would.
        if name == "corrupt":
            raise CorruptError("bad checksum", block=5, field="checksum")
        if name == "bug":
            raise RuntimeError("an engine bug")
        if name == "gone":
            raise DeviceGone("QEMU died")
        d = self._dir(dir_id)
        oid = d.entries.get(name.upper())
        if oid is None:
            raise NotFound(f"{name} not found")
        return self._stat(self._objs[oid], d.names[name.upper()])

    async def readdir(self, dir_id: int) -> list[Stat]:
        d = self._dir(dir_id)
        return [self._stat(self._objs[oid], d.names[k]) for k, oid in d.entries.items()]

    async def read(self, object_id: int, offset: int, length: int) -> bytes:
        obj = self._get(object_id)
        if obj.kind is Kind.DIR:
            raise IsADirectory("directory")
        return bytes(obj.data[offset:offset + length])

    async def readlink(self, object_id: int) -> str:
        obj = self._get(object_id)
        if obj.target is None:
            raise InvalidArgument("not a link")
        return obj.target

    async def statfs(self) -> StatFs:
        used = sum(1 + (len(o.data) + 511) // 512 for o in self._objs.values())
        return StatFs(block_size=512, total_blocks=self._total_blocks,
                      free_blocks=max(0, self._total_blocks - used), max_name_length=self._info.max_name_length)

    def _add(self, dir_id: int, name: str, obj: _Obj) -> Stat:
        self._rw()
        self._check_name(name)
        d = self._dir(dir_id)
        if name.upper() in d.entries:
            raise Exists(name)
        self._objs[obj.object_id] = obj
        d.entries[name.upper()] = obj.object_id
        d.names[name.upper()] = name
        return self._stat(obj, name)

    def _new(self, kind: Kind, **kw: object) -> _Obj:
        obj = _Obj(self._next, kind, **kw)  # type: ignore[arg-type]
        self._next += 1
        return obj

    async def create(self, dir_id: int, name: str, *, protection: int = 0) -> Stat:
        if name == "full":
            raise NoSpace("volume full")
        return self._add(dir_id, name, self._new(Kind.FILE, protection=protection))

    async def mkdir(self, dir_id: int, name: str) -> Stat:
        return self._add(dir_id, name, self._new(Kind.DIR))

    async def symlink(self, dir_id: int, name: str, target: str) -> Stat:
        return self._add(dir_id, name, self._new(Kind.SOFTLINK, target=target))

    async def link(self, object_id: int, dir_id: int, name: str) -> Stat:
        self._rw()
        self._check_name(name)
        obj = self._get(object_id)
        d = self._dir(dir_id)
        if name.upper() in d.entries:
            raise Exists(name)
        d.entries[name.upper()] = object_id
        d.names[name.upper()] = name
        obj.nlink += 1
        return self._stat(obj, name)

    async def write(self, object_id: int, offset: int, data: bytes) -> int:
        self._rw()
        obj = self._get(object_id)
        if obj.kind is Kind.DIR:
            raise IsADirectory("directory")
        if offset > len(obj.data):
            obj.data.extend(bytes(offset - len(obj.data)))
        obj.data[offset:offset + len(data)] = data
        obj.date = DateStamp.from_unix(time.time())
        return len(data)

    async def truncate(self, object_id: int, size: int) -> None:
        self._rw()
        obj = self._get(object_id)
        if size < len(obj.data):
            del obj.data[size:]
        else:
            obj.data.extend(bytes(size - len(obj.data)))

    def _remove(self, d: _Obj, name: str) -> None:
        oid = d.entries.pop(name.upper())
        del d.names[name.upper()]
        obj = self._objs[oid]
        obj.nlink -= 1
        if obj.nlink <= 0:
            del self._objs[oid]

    async def unlink(self, dir_id: int, name: str) -> None:
        self._rw()
        d = self._dir(dir_id)
        oid = d.entries.get(name.upper())
        if oid is None:
            raise NotFound(name)
        if self._objs[oid].kind is Kind.DIR:
            raise IsADirectory(name)
        self._remove(d, name)

    async def rmdir(self, dir_id: int, name: str) -> None:
        self._rw()
        d = self._dir(dir_id)
        oid = d.entries.get(name.upper())
        if oid is None:
            raise NotFound(name)
        obj = self._objs[oid]
        if obj.kind is not Kind.DIR:
            raise NotADirectory(name)
        if obj.entries:
            raise DirectoryNotEmpty(name)
        self._remove(d, name)

    async def rename(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str) -> None:
        self._rw()
        self._check_name(dst_name)
        s = self._dir(src_dir)
        d = self._dir(dst_dir)
        oid = s.entries.get(src_name.upper())
        if oid is None:
            raise NotFound(src_name)
        existing = d.entries.get(dst_name.upper())
        if existing is not None and existing != oid:
            if self._objs[existing].kind is Kind.DIR and self._objs[existing].entries:
                raise DirectoryNotEmpty(dst_name)
            self._remove(d, dst_name)
        del s.entries[src_name.upper()]
        del s.names[src_name.upper()]
        d.entries[dst_name.upper()] = oid
        d.names[dst_name.upper()] = dst_name

    async def setattr(self, object_id: int, attrs: SetAttrs) -> Stat:
        self._rw()
        obj = self._get(object_id)
        if attrs.protection is not None:
            obj.protection = attrs.protection
        if attrs.date is not None:
            obj.date = attrs.date
        if attrs.comment is not None:
            obj.comment = attrs.comment
        return await self.getattr(object_id)

    async def set_label(self, label: str) -> None:
        self._rw()
        self._info = replace(self._info, label=label)

    async def sync(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True
        self.close_count += 1
