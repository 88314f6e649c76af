"""One error hierarchy for the whole project.

Every exception amigafuse raises on purpose derives from :class:`AmigaFuseError` and
carries an ``errno`` that the FUSE layer returns to the kernel and the CLI turns into a
message and an exit status.  ``FUSEError`` appears only in ``amigafuse/fuse``.

Messages say what went wrong and, where there is one, what to do about it.  Errors about
on-disk structures name the block and the field (``CorruptError(block=..., field=...)``).
"""

from __future__ import annotations

import errno as _errno


class AmigaFuseError(Exception):
    """Base of every deliberate amigafuse error.  ``errno`` is the POSIX errno to report."""

    errno: int = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


# --------------------------------------------------------------------------- usage


class UsageError(AmigaFuseError):
    """The user asked for something impossible or malformed (CLI exit status 2)."""

    errno = _errno.EINVAL


class NotAvailable(AmigaFuseError):
    """A required tool, kernel facility or permission is missing (e.g. QEMU, /dev/fuse)."""

    errno = _errno.ENOSYS


# --------------------------------------------------------------------------- devices


class DeviceError(AmigaFuseError):
    """An I/O request to a block device failed."""

    errno = _errno.EIO


class MediumError(DeviceError):
    """The device reported a media error (SCSI MEDIUM ERROR): a bad sector."""

    errno = _errno.EIO


class HardwareError(DeviceError):
    """The device reported a hardware error or an unexpected transport failure."""

    errno = _errno.EIO


class WriteProtected(DeviceError):
    """The device or image refuses writes (SCSI DATA PROTECT, read-only image)."""

    errno = _errno.EROFS


class NoMedium(DeviceError):
    """The unit is not ready or has no medium (SCSI NOT READY)."""

    errno = _errno.ENOMEDIUM


class IllegalRequest(DeviceError):
    """The device rejected the command (SCSI ILLEGAL REQUEST)."""

    errno = _errno.EIO


class DiskChanged(DeviceError):
    """The medium changed under us (SCSI UNIT ATTENTION that persisted past retries)."""

    errno = _errno.EIO


class DeviceGone(DeviceError):
    """The device or its backend vanished (QEMU died, socket closed, VFIO device reset)."""

    errno = _errno.EIO


class OutOfRange(DeviceError):
    """A request lies (partly) outside the device or partition window."""

    errno = _errno.EIO


# --------------------------------------------------------------------------- on-disk data


class CorruptError(AmigaFuseError):
    """An on-disk structure is invalid.  Names the block and the field when known."""

    errno = _errno.EIO

    def __init__(
        self,
        message: str,
        *,
        block: int | None = None,
        field: str | None = None,
        errno: int | None = None,
    ) -> None:
        where = []
        if block is not None:
            where.append(f"block {block}")
        if field is not None:
            where.append(f"field {field}")
        full = f"{message} ({', '.join(where)})" if where else message
        super().__init__(full, errno=errno)
        self.block = block
        self.field = field


class ChecksumError(CorruptError):
    """A block's checksum does not verify."""


class ChainLoopError(CorruptError):
    """A chain of blocks (hash chain, extension list, PART list...) loops or is too long."""


# --------------------------------------------------------------------------- filesystems


class FsError(AmigaFuseError):
    """A filesystem operation cannot be done as asked."""


class NotFound(FsError):
    errno = _errno.ENOENT


class Exists(FsError):
    errno = _errno.EEXIST


class NotADirectory(FsError):
    errno = _errno.ENOTDIR


class IsADirectory(FsError):
    errno = _errno.EISDIR


class DirectoryNotEmpty(FsError):
    errno = _errno.ENOTEMPTY


class NoSpace(FsError):
    errno = _errno.ENOSPC


class NameTooLong(FsError):
    errno = _errno.ENAMETOOLONG


class InvalidName(FsError):
    errno = _errno.EINVAL


class ReadOnlyFilesystem(FsError):
    errno = _errno.EROFS


class NotSupported(FsError):
    errno = _errno.ENOTSUP


class PermissionDenied(FsError):
    errno = _errno.EPERM


class InvalidArgument(FsError):
    errno = _errno.EINVAL


class CrossDevice(FsError):
    errno = _errno.EXDEV


class Busy(FsError):
    errno = _errno.EBUSY


class TooManyLinks(FsError):
    errno = _errno.EMLINK


class FileTooLarge(FsError):
    errno = _errno.EFBIG
