"""Many trio tasks at once, and cancellation at every I/O of a mutation: the volume
stays consistent and every operation happened entirely or not at all."""

from __future__ import annotations

import trio

from amigafuse.amiga.dostype import SFS0
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.blockdev.base import BlockDevice
from amigafuse.errors import NotFound
from amigafuse.fs.sfs import check_volume, format_volume, open_volume


class YieldingDevice(BlockDevice):
    """A memory device whose every request is a checkpoint, and which cancels a scope
    at its ``cancel_at``-th request."""

    def __init__(self, mem: MemoryBlockDevice) -> None:
        self.mem = mem
        self.requests = 0
        self.cancel_at: int | None = None
        self.scope: trio.CancelScope | None = None

    @property
    def block_size(self) -> int:
        return self.mem.block_size

    @property
    def block_count(self) -> int:
        return self.mem.block_count

    async def _tick(self) -> None:
        self.requests += 1
        if self.scope is not None and self.requests == self.cancel_at:
            self.scope.cancel()
        await trio.sleep(0)

    async def read(self, lba: int, count: int) -> bytes:
        await self._tick()
        return await self.mem.read(lba, count)

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        await self._tick()
        await self.mem.write(lba, data)


GEO = VolumeGeometry(dostype=SFS0, fs_block_size=512)


async def test_concurrent_tasks() -> None:
    mem = MemoryBlockDevice((4 << 20) // 512, 512)
    await format_volume(mem, GEO, "Busy")
    vol = await open_volume(YieldingDevice(mem), GEO, False)

    async def worker(n: int) -> None:
        d = await vol.mkdir(vol.root_id, f"w{n}")
        for i in range(15):
            st = await vol.create(d.object_id, f"f{i}")
            await vol.write(st.object_id, 0, bytes([n]) * (1000 + 300 * i))
            if i % 4 == 0:
                await vol.sync()

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(worker, n)
    await vol.close()
    assert (await check_volume(mem, GEO, False)).clean
    vol = await open_volume(mem, GEO, True)
    for n in range(8):
        d = await vol.lookup(vol.root_id, f"w{n}")
        for i in range(15):
            st = await vol.lookup(d.object_id, f"f{i}")
            assert await vol.read(st.object_id, 0, 10**6) == bytes([n]) * (1000 + 300 * i)


async def test_cancel_at_every_request() -> None:
    mem = MemoryBlockDevice((2 << 20) // 512, 512)
    await format_volume(mem, GEO, "Cancel")
    vol = await open_volume(mem, GEO, False)
    d = await vol.mkdir(vol.root_id, "d")
    for i in range(60):
        await vol.create(d.object_id, f"base{i:02d}")
    target = await vol.create(vol.root_id, "target")
    await vol.write(target.object_id, 0, b"a" * 20000)
    await vol.close()
    image = bytes(mem.data)

    async def op(vol2: object) -> None:
        from amigafuse.fs.api import Volume

        assert isinstance(vol2, Volume)
        dd = await vol2.lookup(vol2.root_id, "d")
        await vol2.write(target.object_id, 20000, b"b" * 30000)
        await vol2.create(dd.object_id, "new")
        await vol2.rename(vol2.root_id, "target", dd.object_id, "moved")

    # Count the requests of the whole operation once.
    probe = YieldingDevice(MemoryBlockDevice(data=image))
    v = await open_volume(probe, GEO, False)
    start = probe.requests
    await op(v)
    total = probe.requests - start
    assert total >= 5, total
    for k in range(1, total + 1):
        dev = YieldingDevice(MemoryBlockDevice(data=image))
        v = await open_volume(dev, GEO, False)
        dev.cancel_at = dev.requests + k
        with trio.CancelScope() as scope:
            dev.scope = scope
            await op(v)
        dev.scope = None
        await v.close()
        assert (await check_volume(dev.mem, GEO, False)).clean, k
        v = await open_volume(dev.mem, GEO, True)
        dd = await v.lookup(v.root_id, "d")
        names = {s.name for s in await v.readdir(dd.object_id)}
        assert len(names) in (60, 61, 62), k
        st = None
        for where, name in ((v.root_id, "target"), (dd.object_id, "moved")):
            try:
                st = await v.lookup(where, name)
            except NotFound:
                continue
        assert st is not None, k
        assert st.size in (20000, 50000), k
        assert await v.read(st.object_id, 0, 20000) == b"a" * 20000
