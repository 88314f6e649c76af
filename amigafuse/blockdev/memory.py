"""A block device held in memory: the engines' test bed and a scratch device."""

from __future__ import annotations

from amigafuse.blockdev.base import BlockDevice


class MemoryBlockDevice(BlockDevice):
    """Blocks in a bytearray.  ``data`` is the live buffer (tests may inspect or corrupt it)."""

    def __init__(
        self,
        block_count: int = 0,
        block_size: int = 512,
        *,
        data: bytes | bytearray | None = None,
        read_only: bool = False,
    ) -> None:
        if data is not None:
            if len(data) % block_size:
                raise ValueError(f"{len(data)} bytes is not a multiple of {block_size}")
            self.data = bytearray(data)
        else:
            self.data = bytearray(block_count * block_size)
        self._block_size = block_size
        self._read_only = read_only
        self.reads = 0
        self.writes = 0

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def block_count(self) -> int:
        return len(self.data) // self._block_size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def requests_in_flight(self) -> int:
        return 1  # requests complete without suspending

    async def read(self, lba: int, count: int) -> bytes:
        self.check_range(lba, count)
        self.reads += 1
        start = lba * self._block_size
        return bytes(self.data[start : start + count * self._block_size])

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        self.check_write(lba, data)
        self.writes += 1
        start = lba * self._block_size
        self.data[start : start + len(data)] = data
