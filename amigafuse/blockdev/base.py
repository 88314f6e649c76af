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
"""

from __future__ import annotations

import abc
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
