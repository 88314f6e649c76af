"""Cancellation at every device request of a mutation leaves a volume the checker finds
clean, holding either the old or the new state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.fs.ffs import ENGINE, open_volume
from tests.engine.test_ffs_common import content


class CancellingDevice(MemoryBlockDevice):
    """Cancels ``scope`` at its ``cancel_at``-th request (a checkpoint before each)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data=data)
        self.scope: trio.CancelScope | None = None
        self.cancel_at = 0
        self.count = 0

    async def _tick(self) -> None:
        self.count += 1
        if self.scope is not None and self.count == self.cancel_at:
            self.scope.cancel()
        await trio.lowlevel.checkpoint()

    async def read(self, lba: int, count: int) -> bytes:
        await self._tick()
        return await super().read(lba, count)

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        await self._tick()
        await super().write(lba, data)


async def base_image(dostype: int) -> tuple[bytes, VolumeGeometry]:
    dev = MemoryBlockDevice(3000)
    geo = VolumeGeometry(dostype=dostype, fs_block_count=3000, reserved=2)
    await ENGINE.format_volume(dev, geo, "Cancel")
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "dir")
    f = await vol.create(d.object_id, "file")
    await vol.write(f.object_id, 0, content("old", 60_000))
    await vol.link(f.object_id, vol.root_id, "link")
    await vol.close()
    return bytes(dev.data), geo


async def op_write(vol: Any) -> None:
    d = await vol.lookup(vol.root_id, "dir")
    f = await vol.lookup(d.object_id, "file")
    await vol.write(f.object_id, 30_000, content("new", 80_000))


async def op_truncate(vol: Any) -> None:
    d = await vol.lookup(vol.root_id, "dir")
    f = await vol.lookup(d.object_id, "file")
    await vol.truncate(f.object_id, 1000)


async def op_unlink_promotes(vol: Any) -> None:
    d = await vol.lookup(vol.root_id, "dir")
    await vol.unlink(d.object_id, "file")


async def op_rename(vol: Any) -> None:
    d = await vol.lookup(vol.root_id, "dir")
    await vol.rename(d.object_id, "file", vol.root_id, "renamed")


async def op_create_many(vol: Any) -> None:
    d = await vol.lookup(vol.root_id, "dir")
    for i in range(5):
        f = await vol.create(d.object_id, f"n{i}")
        await vol.write(f.object_id, 0, b"x" * 700)


OPS: list[Callable[[Any], Awaitable[None]]] = [op_write, op_truncate, op_unlink_promotes, op_rename, op_create_many]


@pytest.mark.parametrize("dostype", [0x444F5300, 0x444F5305])
@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
async def test_cancel_anywhere(dostype: int, op: Callable[[Any], Awaitable[None]]) -> None:
    raw, geo = await base_image(dostype)
    # how many device requests the operation makes when left alone
    probe = CancellingDevice(raw)
    vol = await open_volume(probe, geo, False)
    start = probe.count
    await op(vol)
    total = probe.count - start
    await vol.close()
    assert total >= 1
    for k in range(1, total + 1):
        dev = CancellingDevice(raw)
        vol = await open_volume(dev, geo, False)
        with trio.CancelScope() as scope:
            dev.scope = scope
            dev.cancel_at = dev.count + k
            await op(vol)
        dev.scope = None
        await vol.close()
        report = await ENGINE.check_volume(dev, geo, False)
        assert report.errors == [], (k, report.errors)
        # what is there reads back whole
        check = await open_volume(dev, geo, True)
        link = await check.lookup(check.root_id, "link")
        data = await check.read(link.object_id, 0, 1 << 20)
        old = content("old", 60_000)
        new = bytearray(old)
        new[30_000:110_000] = content("new", 80_000)
        if op is op_write:
            # data overwritten in place may be partly new (as on any disk); the size and
            # the blocks the write did not reach are old or new as a whole
            assert len(data) in (60_000, 110_000) and data[:30_000] == old[:30_000], k
            assert len(data) == 60_000 or data == bytes(new), k
        else:
            assert data in (old, old[:1000]), k
