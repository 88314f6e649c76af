"""The async block-device contract every layer above the driver uses.

A :class:`BlockDevice` is addressed in logical blocks (``lba``) of ``block_size`` bytes
(512 or 4096 for SCSI disks).  Implementations: the VirtIO SCSI disk
(``amigafuse.driver``), image files (:mod:`.file`), memory (:mod:`.memory`) and partition
windows onto any of them (:mod:`.window`).

Contract, for every implementation:

* ``read(lba, count)`` returns exactly ``count * block_size`` bytes or raises a
  :class:`~amigafuse.errors.DeviceError` subclass; ``write(lba, data)`` takes a multiple
  of ``block_size``; requests outside ``[0, block_count)`` raise
  :class:`~amigafuse.errors.OutOfRange` before any I/O.
* Any number of trio tasks may call concurrently.  Ordering between *concurrent* requests
  to overlapping blocks is unspecified (as on a real disk): callers that need ordering
  await one request before issuing the next.  A write that returned is visible to every
  later read.  ``flush()`` returns once every write that returned before it was called is
  on stable storage.
* Cancellation: a cancelled ``read``/``write`` may or may not have reached the medium;
  the implementation keeps any buffer it handed to hardware until the hardware is done
  with it, whatever happens to the caller.
* ``read_only`` devices raise :class:`~amigafuse.errors.WriteProtected` from ``write``.
* ``read_lease(lba, count)`` is ``read`` without the copy where a device can lend its
  own buffer (the VirtIO SCSI disk lends the request's DMA buffer): it returns a
  :class:`ReadLease` whose ``view`` holds the bytes until ``release()``.  The caller
  must release every lease it got (``with lease:`` or try/finally); until then the
  buffer is withheld from the device (a slot of the queue stays taken), so hold leases
  briefly.  Devices that cannot lend return a lease on fresh bytes (the default).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from amigafuse.errors import OutOfRange, WriteProtected


@dataclass(frozen=True)
class DeviceInfo:
    """What a device says about itself (SCSI INQUIRY for driver disks)."""

    vendor: str = ""
    product: str = ""
    revision: str = ""
    serial: str = ""
    description: str = ""


class ReadLease:
    """Bytes read from a device, in a buffer the device may have lent (see
    ``BlockDevice.read_lease``).

    ``view`` is valid until :meth:`release`; after it the buffer may be reused by the
    device, so nobody may keep ``view`` (or a slice of it) past the release: copy what
    must outlive it (``bytes(lease.view)``).  :meth:`release` is idempotent, never
    raises and never awaits, so it may run from ``finally`` blocks and from
    ``trio.lowlevel.current_trio_token().run_sync_soon``.  A lease is also a context
    manager that releases on exit.
    """

    __slots__ = ("_release", "view")

    def __init__(self, view: memoryview, release: Callable[[], None] | None = None) -> None:
        self.view = view
        self._release = release

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> ReadLease:
        """A lease on bytes the caller owns (nothing to give back)."""
        return cls(memoryview(data))

    def narrowed(self, start: int, stop: int) -> ReadLease:
        """A lease on ``view[start:stop]`` that takes over this one's release (this
        lease must not be released any more)."""
        release, self._release = self._release, None
        return ReadLease(self.view[start:stop], release)

    @property
    def lent(self) -> bool:
        """Whether releasing gives a buffer back to its device."""
        return self._release is not None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            # a use of this view after the release fails loudly instead of reading
            # bytes the device may have replaced (views taken from it stay usable:
            # their owners must not keep them past the release either)
            view, self.view = self.view, memoryview(b"")
            with contextlib.suppress(BufferError):  # someone holds a buffer export
                view.release()
            release()

    def __enter__(self) -> ReadLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class BlockDevice(abc.ABC):
    """An async block device; see the module docstring for the contract."""

    @property
    @abc.abstractmethod
    def block_size(self) -> int:
        """Bytes per logical block."""

    @property
    @abc.abstractmethod
    def block_count(self) -> int:
        """Number of logical blocks."""

    @property
    def read_only(self) -> bool:
        return False

    @property
    def max_transfer_blocks(self) -> int:
        """Largest request the device takes at once; larger ones are split by it."""
        return 1 << 30

    @property
    def requests_in_flight(self) -> int:
        """How many requests are worth having in flight at once (a hint for callers
        that could issue several): 1 for devices that finish a request without
        suspending (files, memory), where concurrency only adds overhead; the default,
        8, for devices with a real queue.  Correctness never depends on it."""
        return 8

    @property
    def info(self) -> DeviceInfo:
        return DeviceInfo()

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.block_count

    @abc.abstractmethod
    async def read(self, lba: int, count: int) -> bytes:
        """Read ``count`` blocks from ``lba``.  Raises DeviceError subclasses."""

    async def read_lease(self, lba: int, count: int) -> ReadLease:
        """``read`` into a buffer the device may lend (see :class:`ReadLease`; the
        caller releases it).  The default wraps :meth:`read`.  Raises as :meth:`read`."""
        return ReadLease.of(await self.read(lba, count))

    @abc.abstractmethod
    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``len(data) // block_size`` blocks at ``lba``.  Raises DeviceError subclasses."""

    async def flush(self) -> None:  # noqa: B027 - a no-op is a valid flush for some devices
        """Make every completed write durable."""

    async def aclose(self) -> None:  # noqa: B027
        """Release the device.  Idempotent."""

    # ------------------------------------------------------------------ helpers
    def check_range(self, lba: int, count: int) -> None:
        """Raise OutOfRange unless ``[lba, lba+count)`` lies inside the device."""
        if count < 0 or lba < 0 or lba + count > self.block_count:
            raise OutOfRange(
                f"request for blocks {lba}..{lba + count - 1} is outside the device "
                f"(0..{self.block_count - 1})"
            )

    def check_write(self, lba: int, data: bytes | bytearray | memoryview) -> int:
        """Validate a write; returns the block count.  Raises WriteProtected/OutOfRange."""
        if self.read_only:
            raise WriteProtected("the device is read-only")
        nbytes = len(data)
        if nbytes % self.block_size:
            raise ValueError(f"write of {nbytes} bytes is not a multiple of {self.block_size}")
        count = nbytes // self.block_size
        self.check_range(lba, count)
        return count
