"""Windows onto block devices: partitions, and filesystem-block access.

:class:`PartitionDevice` is a BlockDevice covering ``[first_lba, first_lba+block_count)``
of a parent; every request is range-checked against the window before it reaches the
parent, so an engine cannot write outside its partition.

:class:`FsBlockIO` addresses a device in filesystem blocks (512..32768 bytes), which may
be larger than the device's logical block (several sectors per block) or smaller (a
512-byte filesystem block on a 4096-byte-sector disk: read-modify-write, serialised).
"""

from __future__ import annotations

import trio

from amigafuse.blockdev.base import BlockDevice, DeviceInfo, ReadLease
from amigafuse.errors import OutOfRange, WriteProtected


class PartitionDevice(BlockDevice):
    """A window of a parent device.  ``read_only`` may be forced on a writable parent."""

    def __init__(
        self, parent: BlockDevice, first_lba: int, block_count: int, *, read_only: bool = False
    ) -> None:
        if first_lba < 0 or block_count < 0 or first_lba + block_count > parent.block_count:
            raise OutOfRange(
                f"partition blocks {first_lba}..{first_lba + block_count - 1} lie outside "
                f"the device (0..{parent.block_count - 1})"
            )
        self.parent = parent
        self.first_lba = first_lba
        self._block_count = block_count
        self._read_only = read_only or parent.read_only

    @property
    def block_size(self) -> int:
        return self.parent.block_size

    @property
    def block_count(self) -> int:
        return self._block_count

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def max_transfer_blocks(self) -> int:
        return self.parent.max_transfer_blocks

    @property
    def requests_in_flight(self) -> int:
        return self.parent.requests_in_flight

    @property
    def info(self) -> DeviceInfo:
        return self.parent.info

    async def read(self, lba: int, count: int) -> bytes:
        self.check_range(lba, count)
        return await self.parent.read(self.first_lba + lba, count)

    async def read_lease(self, lba: int, count: int) -> ReadLease:
        if type(self).read is not PartitionDevice.read:  # a subclass's read stays in the path
            return ReadLease.of(await self.read(lba, count))
        self.check_range(lba, count)
        return await self.parent.read_lease(self.first_lba + lba, count)

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        self.check_write(lba, data)
        await self.parent.write(self.first_lba + lba, data)

    async def flush(self) -> None:
        await self.parent.flush()


class FsBlockIO:
    """Filesystem-block addressing over a BlockDevice.

    ``fs_block_size`` must be a power of two from 512 to 32768.  ``block_count`` is the
    number of whole filesystem blocks the device holds.
    """

    def __init__(self, device: BlockDevice, fs_block_size: int) -> None:
        if fs_block_size < 256 or fs_block_size > 65536 or fs_block_size & (fs_block_size - 1):
            raise ValueError(f"filesystem block size {fs_block_size} is not a power of two in 256..65536")
        self.device = device
        self.fs_block_size = fs_block_size
        dev_bs = device.block_size
        if fs_block_size >= dev_bs:
            self._per = fs_block_size // dev_bs  # device blocks per fs block
            self._sub = 1
            self.block_count = device.block_count // self._per
        else:
            self._per = 0
            self._sub = dev_bs // fs_block_size  # fs blocks per device block
            self.block_count = device.block_count * self._sub
        self._rmw_lock = trio.Lock()

    @property
    def read_only(self) -> bool:
        return self.device.read_only

    @property
    def requests_in_flight(self) -> int:
        """The device's hint (see BlockDevice.requests_in_flight)."""
        return self.device.requests_in_flight

    @property
    def max_transfer_blocks(self) -> int:
        """Filesystem blocks the device takes in one request (at least 1; larger
        requests are split by the device)."""
        if self._per:
            return max(1, self.device.max_transfer_blocks // self._per)
        return self.device.max_transfer_blocks * self._sub

    def _check(self, block: int, count: int) -> None:
        if block < 0 or count < 0 or block + count > self.block_count:
            raise OutOfRange(
                f"filesystem blocks {block}..{block + count - 1} lie outside the volume "
                f"(0..{self.block_count - 1})"
            )

    async def read(self, block: int, count: int = 1) -> bytes:
        """Read ``count`` filesystem blocks starting at ``block``."""
        self._check(block, count)
        if count == 0:
            return b""
        if self._per:
            return await self.device.read(block * self._per, count * self._per)
        first = block // self._sub
        last = (block + count - 1) // self._sub
        raw = await self.device.read(first, last - first + 1)
        start = (block - first * self._sub) * self.fs_block_size
        return raw[start : start + count * self.fs_block_size]

    async def read_lease(self, block: int, count: int = 1) -> ReadLease:
        """:meth:`read` into a buffer the device may lend (BlockDevice.read_lease: the
        caller releases the lease).  A subclass that overrides :meth:`read` (to overlay
        data it holds, say) but not this method gets a lease on what its ``read``
        returns: never bytes that bypass its override."""
        if type(self).read is not FsBlockIO.read:
            return ReadLease.of(await self.read(block, count))
        return await self._device_read_lease(block, count)

    async def _device_read_lease(self, block: int, count: int) -> ReadLease:
        """The device's lease of filesystem blocks ``block``... as they are on the
        device, whatever a subclass's :meth:`read` overlays (for subclasses that lend
        and overlay themselves).  Raises OutOfRange, DeviceError."""
        self._check(block, count)
        if count == 0:
            return ReadLease.of(b"")
        if self._per:
            return await self.device.read_lease(block * self._per, count * self._per)
        first = block // self._sub
        last = (block + count - 1) // self._sub
        lease = await self.device.read_lease(first, last - first + 1)
        start = (block - first * self._sub) * self.fs_block_size
        return lease.narrowed(start, start + count * self.fs_block_size)

    async def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole filesystem blocks starting at ``block``."""
        if self.device.read_only:
            raise WriteProtected("the volume's device is read-only")
        if len(data) % self.fs_block_size:
            raise ValueError(f"write of {len(data)} bytes is not whole {self.fs_block_size}-byte blocks")
        count = len(data) // self.fs_block_size
        self._check(block, count)
        if count == 0:
            return
        if self._per:
            await self.device.write(block * self._per, data)
            return
        # Sub-sector blocks: read-modify-write under a lock so two writers of
        # neighbouring fs blocks in one sector cannot lose each other's update.
        async with self._rmw_lock:
            first = block // self._sub
            last = (block + count - 1) // self._sub
            raw = bytearray(await self.device.read(first, last - first + 1))
            start = (block - first * self._sub) * self.fs_block_size
            raw[start : start + len(data)] = data
            await self.device.write(first, raw)

    async def flush(self) -> None:
        await self.device.flush()
