"""The filesystem interface the FUSE layer (and the CLI) sees.  Engines implement it.

Every engine (``fs/ffs``, ``fs/sfs``) provides a :class:`Volume`.  The FUSE layer knows
nothing else about the engines.

Identity
    Every object has an ``object_id`` (int > 0), stable for the object's lifetime within
    one open :class:`Volume`, even if the engine moves its header on disk (an FFS
    hard-link promotion, say): the engine keeps the indirection.  An id is never reused
    for another object while the Volume is open: once its object is deleted, the id
    raises NotFound even if the object's storage (header block, SFS object node) now
    belongs to a new object, which gets another id.  So a stale reference (an open file
    unlinked and deleted, a FUSE inode the kernel still holds) can never reach another
    object.  ``root_id`` is the root directory.  A hard link and its target have the
    *same* object_id (``nlink`` counts the names), as on Unix.

Busy objects
    The FUSE layer calls ``set_busy(object_id, True)`` when an object is first opened
    and ``set_busy(object_id, False)`` when its last handle is released.  Engines that
    delete objects on their own (SFS purging ``.recycled``) never delete a busy one;
    the default does nothing.

Names
    ``str`` names are the Latin-1 decoding of the on-disk bytes.  Engines compare them as
    AmigaOS does for the volume's DosType (case-insensitive, INTL rules where they apply;
    case-sensitive SFS volumes exactly).  Names with characters outside Latin-1, or ``/``
    or ``:``, or empty, raise :class:`~amigafuse.errors.InvalidName`; longer than
    ``max_name_length`` raise :class:`~amigafuse.errors.NameTooLong`.

Errors
    Every method raises only :class:`~amigafuse.errors.AmigaFuseError` subclasses (each
    carries its errno): NotFound, Exists, NotADirectory, IsADirectory, DirectoryNotEmpty,
    NoSpace, ReadOnlyFilesystem, CorruptError (EIO, for damaged structures), DeviceError.

Concurrency and cancellation
    Methods may be called from many trio tasks at once; the engine serialises what must be
    serialised.  A mutating call that is cancelled leaves the volume consistent (the
    change happened entirely or not at all, as far as a later ``check`` can tell).

Durability
    Mutations may stay in the engine's cache until ``sync()`` or ``close()``; ``close()``
    writes everything, marks the volume clean (FFS bitmap-valid flag) and releases it.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field

from amigafuse.amiga.dates import DateStamp
from amigafuse.blockdev.base import ReadLease


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SOFTLINK = "softlink"


# Amiga protection bits (the long in fib_Protection).  The low four are *inverted*:
# a set bit means the action is NOT allowed.
FIBF_DELETE = 1 << 0
FIBF_EXECUTE = 1 << 1
FIBF_WRITE = 1 << 2
FIBF_READ = 1 << 3
FIBF_ARCHIVE = 1 << 4
FIBF_PURE = 1 << 5
FIBF_SCRIPT = 1 << 6
FIBF_HOLD = 1 << 7
FIBF_GRP_DELETE = 1 << 8
FIBF_GRP_EXECUTE = 1 << 9
FIBF_GRP_WRITE = 1 << 10
FIBF_GRP_READ = 1 << 11
FIBF_OTR_DELETE = 1 << 12
FIBF_OTR_EXECUTE = 1 << 13
FIBF_OTR_WRITE = 1 << 14
FIBF_OTR_READ = 1 << 15


@dataclass(frozen=True)
class Stat:
    """What Examine() would tell about one object."""

    object_id: int
    name: str
    kind: Kind
    size: int  # bytes (0 for directories)
    protection: int  # raw Amiga protection long
    date: DateStamp  # last modification
    comment: str = ""
    nlink: int = 1
    uid: int = 0  # Amiga owner ids (muFS); 0 when the format has none
    gid: int = 0
    link_target: str | None = None  # soft links only
    disk_blocks: int = 0  # filesystem blocks the object occupies (data + headers)


@dataclass(frozen=True)
class StatFs:
    block_size: int
    total_blocks: int
    free_blocks: int
    max_name_length: int
    files: int = 0  # objects in use when cheaply known, else 0
    free_files: int = 0


@dataclass(frozen=True)
class VolumeInfo:
    """Static facts about a mounted volume."""

    label: str  # the volume name
    dostype: int
    block_size: int
    read_only: bool
    max_name_length: int
    max_comment_length: int
    case_sensitive: bool = False
    created: DateStamp | None = None
    notes: tuple[str, ...] = field(default=())  # e.g. "mounted read-only: bitmap invalid"


@dataclass(frozen=True)
class SetAttrs:
    """Attributes to change; ``None`` leaves one as it is."""

    protection: int | None = None
    date: DateStamp | None = None
    comment: str | None = None
    uid: int | None = None
    gid: int | None = None


class Volume(abc.ABC):
    """An open Amiga volume.  See the module docstring for the shared contract."""

    @property
    @abc.abstractmethod
    def info(self) -> VolumeInfo: ...

    @property
    @abc.abstractmethod
    def root_id(self) -> int: ...

    # -------------------------------------------------------------- queries
    @abc.abstractmethod
    async def getattr(self, object_id: int) -> Stat:
        """Stat of an object.  Raises NotFound if it no longer exists."""

    @abc.abstractmethod
    async def lookup(self, dir_id: int, name: str) -> Stat:
        """The entry ``name`` in directory ``dir_id`` (links resolved to their target's id
        for hard links; soft links returned as SOFTLINK).  Raises NotFound, NotADirectory."""

    @abc.abstractmethod
    async def readdir(self, dir_id: int) -> list[Stat]:
        """Every entry of a directory, in the order AmigaOS ExamineNext gives them."""

    @abc.abstractmethod
    async def read(self, object_id: int, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (short at end of file).  IsADirectory for dirs."""

    async def read_lease(self, object_id: int, offset: int, length: int) -> ReadLease:
        """:meth:`read` into a buffer the device may lend (zero-copy), as a
        :class:`~amigafuse.blockdev.base.ReadLease` the caller must release, soon (it
        may hold one of the device's request buffers).  Raises as :meth:`read`.
        Default: a lease on :meth:`read`'s bytes."""
        return ReadLease.of(await self.read(object_id, offset, length))

    @abc.abstractmethod
    async def readlink(self, object_id: int) -> str:
        """A soft link's target as stored (Amiga path syntax).  InvalidArgument if not a link."""

    @abc.abstractmethod
    async def statfs(self) -> StatFs: ...

    # -------------------------------------------------------------- mutations
    @abc.abstractmethod
    async def create(self, dir_id: int, name: str, *, protection: int = 0) -> Stat:
        """A new empty file.  Raises Exists, NoSpace, InvalidName, NameTooLong, ReadOnlyFilesystem."""

    @abc.abstractmethod
    async def mkdir(self, dir_id: int, name: str) -> Stat: ...

    @abc.abstractmethod
    async def symlink(self, dir_id: int, name: str, target: str) -> Stat: ...

    @abc.abstractmethod
    async def link(self, object_id: int, dir_id: int, name: str) -> Stat:
        """A hard link named ``name`` in ``dir_id`` to the file or directory ``object_id``."""

    @abc.abstractmethod
    async def write(self, object_id: int, offset: int, data: bytes) -> int:
        """Write at any offset (a gap past EOF reads as zeros).  Returns bytes written."""

    @abc.abstractmethod
    async def truncate(self, object_id: int, size: int) -> None: ...

    @abc.abstractmethod
    async def unlink(self, dir_id: int, name: str) -> None:
        """Remove a file, soft link or hard link.  IsADirectory for directories."""

    @abc.abstractmethod
    async def rmdir(self, dir_id: int, name: str) -> None:
        """Remove an empty directory.  DirectoryNotEmpty, NotADirectory."""

    @abc.abstractmethod
    async def rename(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str) -> None:
        """Move/rename.  An existing destination file is replaced (POSIX); an existing
        destination directory must be empty.  Moving a directory into itself: InvalidArgument."""

    @abc.abstractmethod
    async def setattr(self, object_id: int, attrs: SetAttrs) -> Stat: ...

    @abc.abstractmethod
    async def set_label(self, label: str) -> None:
        """Rename the volume."""

    @abc.abstractmethod
    async def sync(self) -> None:
        """Write every cached change to the device and flush it."""

    def set_busy(self, object_id: int, busy: bool) -> None:
        """Object ``object_id`` is open (``busy``) or its last handle was released.
        The caller counts handles: one ``True`` per first open, one ``False`` per last
        release.  Plain bookkeeping: no I/O, never raises (an id whose object is gone is
        ignored).  Default: nothing (engines that never delete objects on their own)."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """sync(), mark the volume clean, release it.  Idempotent."""
