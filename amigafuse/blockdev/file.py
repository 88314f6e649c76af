"""A block device on an image file, without the driver (``--backend file``).

Reads and writes use ``os.preadv``/``os.pwrite`` on the event loop thread: against the
page cache they take microseconds, less than handing them to a worker thread would.

``read_lease`` reads into a reused buffer (up to ``LEND_POOL`` of ``LEND_MAX_BYTES``
kept): a fresh 1 MiB ``bytes`` per read costs its page faults and zeroing every time.
A buffer returns to the pool only when its lease is released, so no lent bytes are
ever overwritten.
"""

from __future__ import annotations

import errno
import os

from amigafuse.blockdev.base import BlockDevice, DeviceInfo, ReadLease
from amigafuse.errors import DeviceError, MediumError, NotAvailable, UsageError

LEND_MAX_BYTES = 1 << 20  # reads up to this size are lent from the pool
LEND_POOL = 8  # buffers kept for reuse


class FileBlockDevice(BlockDevice):
    """An image file as a block device.  A trailing partial block is ignored."""

    def __init__(self, path: str, *, block_size: int = 512, read_only: bool = False) -> None:
        self.path = path
        self._block_size = block_size
        # Root ignores mode bits: an image nobody may write (mode 0444, like the shared
        # test images) is opened read-only even for root, as a write-protected disk.
        try:
            if not read_only and not os.stat(path).st_mode & 0o222:
                read_only = True
        except OSError:
            pass  # the open below reports it
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self._fd = os.open(path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"{path}: no such image file") from None
        except IsADirectoryError:
            raise UsageError(f"{path}: is a directory, not an image file") from None
        except PermissionError:
            if read_only:
                raise NotAvailable(f"{path}: permission denied") from None
            # Writable open refused: fall back to read-only, like a write-protected disk.
            self._fd = self._open_ro(path)
            read_only = True
        except OSError as exc:
            if exc.errno == errno.EROFS and not read_only:
                self._fd = self._open_ro(path)
                read_only = True
            else:
                raise DeviceError(f"{path}: {exc.strerror}") from None
        self._read_only = read_only
        size = os.fstat(self._fd).st_size
        self._block_count = size // block_size
        self._pool: list[bytearray] = []
        self._closed = False

    @staticmethod
    def _open_ro(path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NotAvailable(f"{path}: {exc.strerror}") from None

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def block_count(self) -> int:
        return self._block_count

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def requests_in_flight(self) -> int:
        return 1  # every request completes on the event loop thread, without suspending

    @property
    def info(self) -> DeviceInfo:
        return DeviceInfo(vendor="file", product=os.path.basename(self.path), description=self.path)

    async def read(self, lba: int, count: int) -> bytes:
        self.check_range(lba, count)
        nbytes = count * self._block_size
        try:
            data = os.pread(self._fd, nbytes, lba * self._block_size)
        except OSError as exc:
            raise MediumError(f"{self.path}: read at block {lba} failed: {exc.strerror}") from None
        if len(data) != nbytes:
            raise MediumError(f"{self.path}: short read at block {lba} (file truncated?)")
        return data

    async def read_lease(self, lba: int, count: int) -> ReadLease:
        """:meth:`read` into a pooled buffer (see the module docstring); the caller
        releases the lease.  Raises as :meth:`read`."""
        self.check_range(lba, count)
        nbytes = count * self._block_size
        if nbytes > LEND_MAX_BYTES or nbytes == 0:
            return ReadLease.of(await self.read(lba, count))
        pool = self._pool
        buf = pool.pop() if pool else bytearray(LEND_MAX_BYTES)
        view = memoryview(buf)[:nbytes]
        try:
            got = os.preadv(self._fd, [view], lba * self._block_size)
        except OSError as exc:
            view.release()
            pool.append(buf)
            raise MediumError(f"{self.path}: read at block {lba} failed: {exc.strerror}") from None
        if got != nbytes:
            view.release()
            pool.append(buf)
            raise MediumError(f"{self.path}: short read at block {lba} (file truncated?)")

        def give_back() -> None:
            if len(pool) < LEND_POOL:
                pool.append(buf)

        return ReadLease(view, give_back)

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        self.check_write(lba, data)
        view = memoryview(data)
        offset = lba * self._block_size
        try:
            while view:
                done = os.pwrite(self._fd, view, offset)
                view = view[done:]
                offset += done
        except OSError as exc:
            raise MediumError(f"{self.path}: write at block {lba} failed: {exc.strerror}") from None

    async def flush(self) -> None:
        if not self._read_only:
            os.fsync(self._fd)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
