"""Review of issue 4 (reads beside reads): a data read planned under the lock and run
outside it must hold off every block-changing operation, and a cancelled read must
release them."""

from __future__ import annotations

import trio

from amigafuse.amiga.dostype import DOS3
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.fs.ffs import ENGINE, open_volume
from tests.conftest import content


class GatedDevice(MemoryBlockDevice):
    """Reads block at ``gate`` while ``gated`` is set; ``entered`` fires when one does."""

    def __init__(self, blocks: int) -> None:
        super().__init__(blocks)
        self.gated = False
        self.gate = trio.Event()
        self.entered = trio.Event()

    async def read(self, lba: int, count: int) -> bytes:
        if self.gated and count > 1:
            self.entered.set()
            await self.gate.wait()
        return await super().read(lba, count)


async def _setup() -> tuple[GatedDevice, object, int]:
    dev = GatedDevice(3000)
    geo = VolumeGeometry(dostype=DOS3, fs_block_count=3000, reserved=2)
    await ENGINE.format_volume(dev, geo, "Review")
    vol = await open_volume(dev, geo, False)
    f = await vol.create(vol.root_id, "a")
    await vol.write(f.object_id, 0, content("a", 200_000))
    await vol.sync()
    return dev, vol, f.object_id


async def test_unlink_and_reuse_wait_for_read_in_flight() -> None:
    dev, vol, fid = await _setup()
    dev.gated = True
    got: list[bytes] = []
    done: list[str] = []

    async def reader() -> None:
        got.append(await vol.read(fid, 0, 200_000))  # type: ignore[attr-defined]

    async def writer() -> None:
        await vol.unlink(vol.root_id, "a")  # type: ignore[attr-defined]
        g = await vol.create(vol.root_id, "b")  # type: ignore[attr-defined]
        await vol.write(g.object_id, 0, content("b", 200_000))  # type: ignore[attr-defined]
        await vol.sync()  # type: ignore[attr-defined]
        done.append("w")

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await dev.entered.wait()
        n.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert not done  # the writer waits for the read in flight
        dev.gated = False
        dev.gate.set()
    assert got == [content("a", 200_000)]
    assert done == ["w"]
    await vol.close()  # type: ignore[attr-defined]


async def test_cancelled_read_releases_writers() -> None:
    dev, vol, fid = await _setup()
    dev.gated = True
    with trio.move_on_after(5):
        async with trio.open_nursery() as n:
            scope = trio.CancelScope()

            async def reader() -> None:
                with scope:
                    await vol.read(fid, 0, 200_000)  # type: ignore[attr-defined]

            n.start_soon(reader)
            await dev.entered.wait()
            scope.cancel()
    dev.gated = False
    with trio.fail_after(5):
        await vol.truncate(fid, 10)  # type: ignore[attr-defined]
        await vol.close()  # type: ignore[attr-defined]
