"""SFS reads in the device's buffers, outside the volume lock (SfsVolume.read_lease).

The extents are walked holding the lock; the data is read outside it, one request per
contiguous run, a one-run read lent as the device's own buffer.  What must hold: the
bytes equal the copying ``read`` (fragmented files, any offset and length, pending
changes of a writable volume); every lease the device lent is given back; and no
operation that changes blocks runs while such a read is at the device (it waits)."""

from __future__ import annotations

import random

import pytest
import trio

from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.blockdev.base import ReadLease
from amigafuse.fs.sfs import check_volume, format_volume, open_volume
from amigafuse.fs.sfs.volume import SfsVolume
from tests.conftest import content


class LendingDevice(MemoryBlockDevice):
    """Lends copies as leases and counts them; ``gate``, when set, holds every lent
    read until it is set (so a test can act while a read is at the device)."""

    def __init__(self, blocks: int) -> None:
        super().__init__(blocks, 512)
        self.out = 0
        self.lent = 0
        self.gate: trio.Event | None = None
        self.at_device = trio.Event()

    async def read_lease(self, lba: int, count: int) -> ReadLease:
        data = await self.read(lba, count)
        if self.gate is not None:
            self.at_device.set()
            await self.gate.wait()
        self.out += 1
        self.lent += 1

        def give_back() -> None:
            self.out -= 1

        return ReadLease(memoryview(bytearray(data)), give_back)


async def volume(dostype: int = SFS0, bs: int = 512) -> tuple[LendingDevice, VolumeGeometry, SfsVolume]:
    dev = LendingDevice((4 << 20) // 512)
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs)
    await format_volume(dev, geo, "Lease")
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol, SfsVolume)
    return dev, geo, vol


async def lease_bytes(vol: SfsVolume, oid: int, off: int, n: int) -> bytes:
    lease = await vol.read_lease(oid, off, n)
    try:
        return bytes(lease.view)
    finally:
        lease.release()


@pytest.mark.parametrize(("dostype", "bs"), [(SFS0, 512), (SFS2, 1024)])
async def test_leased_reads_equal_copied_reads_on_fragmented_files(dostype: int, bs: int) -> None:
    dev, geo, vol = await volume(dostype, bs)
    files: dict[int, bytes] = {}
    # interleaved appends make the files fragmented (many extents each)
    ids = [(await vol.create(vol.root_id, f"f{i}")).object_id for i in range(3)]
    for step in range(12):
        for i, oid in enumerate(ids):
            chunk = content(f"f{i}/{step}", 7000 + 1000 * i)
            await vol.write(oid, step * len(chunk), chunk)
            files[oid] = files.get(oid, b"") + chunk
    await vol.sync()
    rnd = random.Random(5)
    for _ in range(150):
        oid = rnd.choice(ids)
        size = len(files[oid])
        off = rnd.randrange(0, size + 10)
        n = rnd.choice([1, 511, 512, 4096, 65536, 1 << 20, rnd.randrange(0, size + 1)])
        got = await lease_bytes(vol, oid, off, n)
        assert got == files[oid][off : off + n] == await vol.read(oid, off, n)
    assert dev.lent > 0 and dev.out == 0
    await vol.close()
    assert (await check_volume(dev, geo, False)).clean


async def test_pending_changes_are_read_not_the_old_blocks() -> None:
    dev, _geo, vol = await volume()
    f = (await vol.create(vol.root_id, "f")).object_id
    await vol.write(f, 0, content("old", 40_000))
    await vol.sync()
    # an overwrite in place stays pending (written at the next commit)
    await vol.write(f, 10_000, b"N" * 5000)
    want = content("old", 40_000)[:10_000] + b"N" * 5000 + content("old", 40_000)[15_000:]
    assert await lease_bytes(vol, f, 0, 40_000) == want
    await vol.sync()
    assert await lease_bytes(vol, f, 0, 40_000) == want
    assert dev.out == 0
    await vol.close()


async def test_a_change_waits_for_a_read_at_the_device_and_the_read_gets_the_old_bytes() -> None:
    dev, geo, vol = await volume()
    f = (await vol.create(vol.root_id, "f")).object_id
    old = content("old", 100_000)
    await vol.write(f, 0, old)
    await vol.sync()
    dev.gate = trio.Event()
    order: list[str] = []
    result: list[bytes] = []

    async def reader() -> None:
        result.append(await lease_bytes(vol, f, 0, 100_000))
        order.append("read")

    async def changer() -> None:
        await dev.at_device.wait()
        # delete the file and write a new one that may take its blocks
        await vol.unlink(vol.root_id, "f")
        g = (await vol.create(vol.root_id, "g")).object_id
        await vol.write(g, 0, b"X" * 100_000)
        await vol.sync()
        order.append("changed")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(changer)
        await dev.at_device.wait()
        for _ in range(50):
            await trio.lowlevel.checkpoint()
        assert order == []  # the change is waiting for the read
        dev.gate.set()
    assert order == ["read", "changed"]
    assert result == [old]
    assert dev.out == 0
    await vol.close()
    assert (await check_volume(dev, geo, False)).clean


async def test_a_cancelled_read_gives_its_lease_back_and_lets_changes_run() -> None:
    dev, _geo, vol = await volume()
    f = (await vol.create(vol.root_id, "f")).object_id
    await vol.write(f, 0, content("c", 50_000))
    await vol.sync()
    dev.gate = trio.Event()
    with trio.move_on_after(0.05):
        await vol.read_lease(f, 0, 50_000)
    dev.gate = None
    assert dev.out == 0
    with trio.fail_after(5):  # a change does not wait for the cancelled read for ever
        await vol.write(f, 0, b"after")
    assert await lease_bytes(vol, f, 0, 5) == b"after"
    await vol.close()
