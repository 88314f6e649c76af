"""The FFS large-file read path: data-block runs found from the raw extension chain
(read ahead, checked like every other block), against the block lists the writer and
checker use; the metadata cache taking precedence over the disk; damage mid-chain."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import trio

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import ReadLease
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import ChainLoopError, ChecksumError, CorruptError, MediumError
from amigafuse.fs.api import SetAttrs
from amigafuse.fs.ffs import ENGINE, open_volume
from amigafuse.fs.ffs.layout import FileExtBlock, with_checksum
from amigafuse.fs.ffs.volume import FfsVolumeBase
from tests.engine.test_ffs_common import content

DOS3 = 0x444F5303
PIECE = 64 * 1024


async def build(block_size: int, blocks: int, big_bytes: int) -> tuple[MemoryBlockDevice, VolumeGeometry, int, int]:
    """A volume with two files written in alternating pieces (so both are fragmented)
    and one written at once.  Returns (device, geometry, fragmented id, whole id)."""
    dev = MemoryBlockDevice(blocks * block_size // 512)
    geo = VolumeGeometry(dostype=DOS3, fs_block_size=block_size, fs_block_count=blocks, reserved=2)
    await ENGINE.format_volume(dev, geo, "Reads")
    vol = await open_volume(dev, geo, False)
    a = await vol.create(vol.root_id, "a")
    b = await vol.create(vol.root_id, "b")
    data_a, data_b = content("a", big_bytes), content("b", big_bytes // 2)
    for off in range(0, big_bytes, PIECE):
        await vol.write(a.object_id, off, data_a[off : off + PIECE])
        if off < len(data_b):
            await vol.write(b.object_id, off, data_b[off : off + PIECE])
    whole = await vol.create(vol.root_id, "whole")
    await vol.write(whole.object_id, 0, content("w", big_bytes))
    await vol.close()
    return dev, geo, a.object_id, whole.object_id


async def read_all(vol: object, object_id: int, size: int, piece: int) -> bytes:
    out = bytearray()
    for off in range(0, size, piece):
        out += await vol.read(object_id, off, piece)  # type: ignore[attr-defined]
    return bytes(out)


@pytest.mark.parametrize("block_size", [512, 4096])
async def test_cold_reads_match_the_block_lists(block_size: int) -> None:
    big = 3 * 1024 * 1024 + 1234
    dev, geo, frag, whole = await build(block_size, 6 * 1024 * 1024 // block_size * 2, big)
    for oid, name in ((frag, "a"), (whole, "w")):
        vol = await open_volume(dev, geo, True)
        assert isinstance(vol, FfsVolumeBase)
        assert await read_all(vol, oid, big, 1 << 20) == content(name, big)
        e = await vol._entry(oid)
        extents = vol._extents[oid]
        fresh = await open_volume(dev, geo, True)
        assert isinstance(fresh, FfsVolumeBase)
        data, _ = await fresh._block_lists(oid, e)
        assert extents == FfsVolumeBase._extents_of(data)
        assert sum(count for _, _, count in extents) == len(data)
    # odd offsets and lengths, cold
    vol = await open_volume(dev, geo, True)
    want = content("a", big)
    for off, length in ((0, 1), (511, 2), (big - 5, 100), (block_size * 73 + 7, 300_000), (big, 10)):
        assert await vol.read(frag, off, length) == want[off : off + length]


async def test_the_extension_chain_is_read_ahead() -> None:
    big = 4 * 1024 * 1024  # 8192 data blocks: 113 extension blocks of 72
    dev, geo, _, whole = await build(512, 24_000, big)
    vol = await open_volume(dev, geo, True)
    await vol.getattr(whole)
    before = dev.reads
    assert await vol.read(whole, 0, 4096) == content("w", big)[:4096]
    # the header's extension pointer, then the rest in one or two requests, then data
    assert dev.reads - before <= 5


async def test_cached_unwritten_tables_take_precedence() -> None:
    dev, geo, frag, _ = await build(512, 24_000, 2 * 1024 * 1024)
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol, FfsVolumeBase)
    more = content("more", 300_000)
    size = 2 * 1024 * 1024
    await vol.write(frag, size, more)  # new extension blocks, in the cache only
    want = content("a", size) + more
    # forget the lists, as after eviction: the walk must take the cached blocks
    vol._blists.clear()
    vol._extents.clear()
    assert await read_all(vol, frag, len(want), 1 << 20) == want
    await vol.truncate(frag, 100_000)
    vol._blists.clear()
    vol._extents.clear()
    assert await read_all(vol, frag, 200_000, 65536) == want[:100_000]
    await vol.close()


async def _ext_blocks(dev: MemoryBlockDevice, geo: VolumeGeometry, oid: int) -> list[int]:
    vol = await open_volume(dev, geo, True)
    assert isinstance(vol, FfsVolumeBase)
    _, exts = await vol._block_lists(oid, await vol._entry(oid))
    return exts


async def test_damage_mid_chain_is_eio_for_that_file_only() -> None:
    dev, geo, frag, whole = await build(512, 24_000, 2 * 1024 * 1024)
    exts = await _ext_blocks(dev, geo, whole)
    assert len(exts) > 10
    good = bytes(dev.data)

    async def fails(exc: type[Exception], offset: int) -> CorruptError:
        vol = await open_volume(dev, geo, True)
        with pytest.raises(exc) as info:
            await vol.read(whole, offset, 4096)
        assert await vol.read(frag, 0, 100) == content("a", 100)  # the rest reads
        assert isinstance(info.value, CorruptError)
        return info.value

    # a flipped bit in the sixth extension block: checksum error naming it
    x = exts[5]
    dev.data[x * 512 + 100] ^= 0x04
    err = await fails(ChecksumError, 0)
    assert err.block == x
    # the seventh points back at the third: a loop
    dev.data[:] = good
    blk = FileExtBlock.unpack(good[exts[6] * 512 : exts[6] * 512 + 512])
    dev.data[exts[6] * 512 : exts[6] * 512 + 512] = with_checksum(replace(blk, extension=exts[2]).pack())
    await fails(ChainLoopError, 0)
    # a data pointer outside the volume (good checksum)
    dev.data[:] = good
    blk = FileExtBlock.unpack(good[exts[3] * 512 : exts[3] * 512 + 512])
    table = (24_000 + 5, *blk.table[1:])
    dev.data[exts[3] * 512 : exts[3] * 512 + 512] = with_checksum(replace(blk, table=table).pack())
    err = await fails(CorruptError, 0)
    assert "outside the volume" in str(err)
    # an extension pointer to a data block (not T_LIST)
    dev.data[:] = good
    blk = FileExtBlock.unpack(good[exts[0] * 512 : exts[0] * 512 + 512])
    dev.data[exts[0] * 512 : exts[0] * 512 + 512] = with_checksum(replace(blk, extension=blk.table[-1]).pack())
    await fails(CorruptError, 0)


class SlowDevice(MemoryBlockDevice):
    """A memory device whose reads take ``delay`` seconds and return the blocks as
    they are at the end (as a real transfer would); counts reads in flight."""

    def __init__(self, data: bytes | bytearray, delay: float) -> None:
        super().__init__(data=data)
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def requests_in_flight(self) -> int:
        return 16  # it suspends: concurrency pays

    async def read(self, lba: int, count: int) -> bytes:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(self.delay)
            return await super().read(lba, count)
        finally:
            self.in_flight -= 1


async def test_reads_overlap_at_the_device() -> None:
    big = 2 * 1024 * 1024
    dev, geo, _frag, whole = await build(512, 24_000, big)
    slow = SlowDevice(dev.data, 0.02)
    vol = await open_volume(slow, geo, True)
    await vol.read(whole, 0, 1)  # the file's block lists, read once
    slow.max_in_flight = 0
    want = content("w", big)
    got: dict[int, bytes] = {}

    async def one(off: int) -> None:
        got[off] = await vol.read(whole, off, 128 * 1024)

    async with trio.open_nursery() as nursery:
        for off in range(0, big, 128 * 1024):
            nursery.start_soon(one, off)
    assert all(got[off] == want[off : off + 128 * 1024] for off in got) and len(got) == 16
    assert slow.max_in_flight >= 8  # not one at a time


async def test_changes_wait_for_reads_in_flight() -> None:
    big = 1024 * 1024
    dev, geo, _frag, whole = await build(512, 24_000, big)
    slow = SlowDevice(dev.data, 0)
    vol = await open_volume(slow, geo, False)
    assert isinstance(vol, FfsVolumeBase)
    await vol._block_lists(whole, await vol._entry(whole))  # the changes need no reads
    await vol.read(whole, 0, 1)
    old = content("w", big)
    new = content("new", big)
    results: list[bytes] = []
    order: list[str] = []

    async def reader() -> None:
        results.append(await vol.read(whole, 0, big))
        order.append("read")

    async def changer() -> None:
        await trio.sleep(0.01)  # the read is at the device now
        await vol.truncate(whole, 0)  # frees every block the read is reading...
        await vol.write(whole, 0, new)  # ...and this reuses and overwrites them
        order.append("changed")

    slow.delay = 0.05
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(changer)
    assert results == [old] and order == ["read", "changed"]
    slow.delay = 0
    assert await vol.read(whole, 0, big) == new
    await vol.close()


async def test_a_cancelled_read_does_not_block_later_changes() -> None:
    big = 256 * 1024
    dev, geo, _, whole = await build(512, 24_000, big)
    slow = SlowDevice(dev.data, 0.01)
    vol = await open_volume(slow, geo, False)
    await vol.read(whole, 0, 1)
    slow.delay = 10
    with trio.move_on_after(0.05):
        await vol.read(whole, 0, big)
    slow.delay = 0
    with trio.fail_after(5):
        await vol.truncate(whole, 10)
        assert await vol.read(whole, 0, 100) == content("w", 10)
    await vol.close()


# ------------------------------------------------------------ directory listings


async def small_files(count: int, dostype: int = DOS3) -> tuple[MemoryBlockDevice, VolumeGeometry, int]:
    dev = MemoryBlockDevice(8000)
    geo = VolumeGeometry(dostype=dostype, fs_block_count=8000, reserved=2)
    await ENGINE.format_volume(dev, geo, "Dir")
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "d")
    for i in range(count):
        f = await vol.create(d.object_id, f"f{i:04d}")
        await vol.write(f.object_id, 0, content(str(i), 100 + 37 * i % 1500))
    await vol.close()
    return dev, geo, d.object_id


@pytest.mark.parametrize("dostype", [DOS3, 0x444F5305, 0x444F5307])
async def test_a_listing_reads_headers_in_few_requests(dostype: int) -> None:
    dev, geo, d = await small_files(400, dostype)
    vol = await open_volume(dev, geo, True)
    await vol.getattr(d)
    before = dev.reads
    names = sorted(st.name for st in await vol.readdir(d))
    assert names == [f"f{i:04d}" for i in range(400)]
    assert dev.reads - before < 40  # one request per entry before
    # the listing left every header cached: lookups and getattrs read nothing
    before = dev.reads
    for i in range(0, 400, 7):
        st = await vol.lookup(d, f"F{i:04d}")
        assert st.size == 100 + 37 * i % 1500
    assert dev.reads == before


async def test_a_listing_shows_unwritten_changes_and_not_deleted_headers() -> None:
    dev, geo, d = await small_files(60)
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol, FfsVolumeBase)
    f3 = await vol.lookup(d, "f0003")
    f5 = await vol.lookup(d, "f0005")
    await vol.unlink(d, "f0005")  # its header stays on the disk, unlinked
    await vol.close()
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol, FfsVolumeBase)
    await vol.setattr(f3.object_id, SetAttrs(protection=0x0F, comment="changed"))
    await vol.rename(d, "f0007", d, "renamed")
    vol._index.clear()
    vol._maybe_evict()
    listing = {st.name: st for st in await vol.readdir(d)}
    assert "f0005" not in listing and "renamed" in listing and "f0007" not in listing
    assert len(listing) == 59
    assert listing["f0003"].protection == 0x0F and listing["f0003"].comment == "changed"
    await vol.close()
    vol = await open_volume(dev, geo, True)
    assert isinstance(vol, FfsVolumeBase)
    listing = {st.name: st for st in await vol.readdir(d)}
    assert "f0005" not in listing and "renamed" in listing and len(listing) == 59
    assert f5.object_id not in vol._meta  # read ahead, but free: not taken for a header
    assert listing["f0003"].comment == "changed"


class BadSectorDevice(MemoryBlockDevice):
    """Reads that include block ``bad`` fail, as with an unreadable sector."""

    def __init__(self, data: bytes | bytearray, bad: int, queue: int = 1) -> None:
        super().__init__(data=data)
        self.bad = bad
        self.queue = queue

    @property
    def requests_in_flight(self) -> int:
        return self.queue

    async def read(self, lba: int, count: int) -> bytes:
        if lba <= self.bad < lba + count:
            raise MediumError(f"block {self.bad} is unreadable")
        return await super().read(lba, count)


async def test_a_bad_block_near_the_headers_does_not_fail_the_listing() -> None:
    dev, geo, d = await small_files(50)
    vol = await open_volume(dev, geo, True)
    assert isinstance(vol, FfsVolumeBase)
    f1 = await vol.lookup(d, "f0001")
    data, _ = await vol._block_lists(f1.object_id, await vol._entry(f1.object_id))
    faulty = BadSectorDevice(dev.data, data[0])
    vol = await open_volume(faulty, geo, True)
    assert len(await vol.readdir(d)) == 50
    with pytest.raises(MediumError):
        await vol.read(f1.object_id, 0, 10)
    assert await vol.read((await vol.lookup(d, "f0002")).object_id, 0, 10) == content("2", 10)


async def test_a_fragmented_read_has_its_ranges_at_the_device_at_once() -> None:
    big = 3 * 1024 * 1024
    dev, geo, frag, _ = await build(512, 24_000, big)
    slow = SlowDevice(dev.data, 0.01)
    vol = await open_volume(slow, geo, True)
    assert isinstance(vol, FfsVolumeBase)
    await vol.read(frag, 0, 1)
    plan = await vol._plan_read(frag, await vol._entry(frag), 0, 1 << 20)
    assert not isinstance(plan, bytes) and len(plan[0]) >= 8  # alternate 64 KiB pieces
    slow.max_in_flight = 0
    assert await vol.read(frag, 0, 1 << 20) == content("a", 1 << 20)
    assert slow.max_in_flight >= 8


@pytest.mark.parametrize("queue", [1, 8])
async def test_a_bad_block_in_a_fragmented_read_is_that_error(queue: int) -> None:
    dev, geo, frag, _ = await build(512, 24_000, 2 * 1024 * 1024)
    vol = await open_volume(dev, geo, True)
    assert isinstance(vol, FfsVolumeBase)
    data, _ = await vol._block_lists(frag, await vol._entry(frag))
    faulty = BadSectorDevice(dev.data, data[700], queue)
    vol = await open_volume(faulty, geo, True)
    with pytest.raises(MediumError):  # the error itself, not an exception group
        await vol.read(frag, 0, 1 << 20)
    assert await vol.read(frag, 400 * 1024, 10) == content("a", 400 * 1024 + 10)[-10:]


async def test_listing_read_ahead_with_requests_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import amigafuse.fs.ffs.volume as volume_module

    dev, geo, d = await small_files(120)
    monkeypatch.setattr(volume_module, "HEADER_GAP_BYTES", 0)  # every header its own request
    slow = SlowDevice(dev.data, 0.002)
    vol = await open_volume(slow, geo, True)
    await vol.getattr(d)
    slow.max_in_flight = 0
    assert sorted(st.name for st in await vol.readdir(d)) == [f"f{i:04d}" for i in range(120)]
    assert slow.max_in_flight >= 4


async def test_the_run_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import amigafuse.fs.ffs.volume as volume_module

    monkeypatch.setattr(volume_module, "BLOCKLIST_CACHE_LIMIT", 10)
    dev, geo, d = await small_files(40)
    vol = await open_volume(dev, geo, True)
    assert isinstance(vol, FfsVolumeBase)
    sizes = []
    for st in await vol.readdir(d):
        assert await vol.read(st.object_id, 0, 50) == content(st.name[1:].lstrip("0") or "0", 50)
        sizes.append(len(vol._extents))
    assert max(sizes) <= 11 and len(sizes) == 40


# ------------------------------------------------------------ OFS data


async def test_ofs_reads_check_every_data_block() -> None:
    from amigafuse.fs.ffs.layout import OfsDataBlock

    dev = MemoryBlockDevice(8000)
    geo = VolumeGeometry(dostype=0x444F5300, fs_block_count=8000, reserved=2)
    await ENGINE.format_volume(dev, geo, "Ofs")
    vol = await open_volume(dev, geo, False)
    f = await vol.create(vol.root_id, "f")
    g = await vol.create(vol.root_id, "g")
    want = content("ofs", 300_000)
    await vol.write(f.object_id, 0, want)
    await vol.write(g.object_id, 0, content("g", 5000))
    await vol.close()
    vol = await open_volume(dev, geo, True)
    assert isinstance(vol, FfsVolumeBase)
    for off, length in ((0, 300_000), (487, 2), (488 * 100 - 3, 70_000), (299_990, 100)):
        assert await vol.read(f.object_id, off, length) == want[off : off + length]
    data, _ = await vol._block_lists(f.object_id, await vol._entry(f.object_id))
    good = bytes(dev.data)
    # a flipped bit in data block 200: checksum error naming it; other ranges read
    dev.data[data[200] * 512 + 300] ^= 1
    vol = await open_volume(dev, geo, True)
    with pytest.raises(ChecksumError) as info:
        await vol.read(f.object_id, 0, 300_000)
    assert info.value.block == data[200]
    assert await vol.read(f.object_id, 0, 1000) == want[:1000]
    # a block claiming another owner (good checksum): not this file's
    dev.data[:] = good
    blk = OfsDataBlock.unpack(good[data[5] * 512 : data[5] * 512 + 512])
    dev.data[data[5] * 512 : data[5] * 512 + 512] = replace(blk, header_key=g.object_id).packed_with_checksum()
    vol = await open_volume(dev, geo, True)
    with pytest.raises(CorruptError) as info:
        await vol.read(f.object_id, 0, 10_000)
    assert info.value.block == data[5] and not isinstance(info.value, ChecksumError)
    assert await vol.read(g.object_id, 0, 5000) == content("g", 5000)


# ---------------------------------------------------------------- zero-copy reads


class LendingDevice(MemoryBlockDevice):
    """Lends buffers as the VirtIO disk does: ``slots`` buffers, each withheld until its
    lease is released, then overwritten with 0xEE (a use after release shows as wrong
    bytes).  Reads suspend (``delay``), so reads overlap and can be cancelled mid-way.
    A read waits while every buffer is lent, as on the real queue; ``requests`` counts
    device reads, ``most`` the most buffers lent at once."""

    def __init__(self, data: bytes | bytearray, slots: int = 16, delay: float = 0.0) -> None:
        super().__init__(data=data)
        self.free = [bytearray() for _ in range(slots)]
        self.slots = slots
        self.delay = delay
        self.requests = 0
        self.most = 0
        self.fail_at: int | None = None
        self.lot = trio.lowlevel.ParkingLot()

    @property
    def requests_in_flight(self) -> int:
        return self.slots

    @property
    def lent_now(self) -> int:
        return self.slots - len(self.free)

    async def read_lease(self, lba: int, count: int) -> ReadLease:
        self.check_range(lba, count)
        while not self.free:
            await self.lot.park()
        buf = self.free.pop()
        self.most = max(self.most, self.lent_now)
        self.requests += 1
        try:
            await trio.sleep(self.delay)
            if self.fail_at is not None and lba <= self.fail_at < lba + count:
                raise MediumError(f"block {self.fail_at} is unreadable")
            data = await super().read(lba, count)
        except BaseException:
            self.free.append(buf)
            self.lot.unpark()
            raise
        if len(buf) < len(data):
            buf = bytearray(len(data))  # a bigger buffer (views of the old one may live on)
        n = len(data)
        buf[:n] = data
        done = [False]

        def release() -> None:
            assert not done[0], "a buffer given back twice"
            done[0] = True
            buf[:n] = b"\xee" * n
            self.free.append(buf)
            self.lot.unpark()

        return ReadLease(memoryview(buf)[:n], release)


async def test_read_lease_is_read_and_lends_contiguous_data() -> None:
    big = 2 * 1024 * 1024 + 999
    dev, geo, frag, whole = await build(512, 24_000, big)
    lending = LendingDevice(dev.data)
    vol = await open_volume(lending, geo, True)
    assert isinstance(vol, FfsVolumeBase)
    rng = random.Random(3)
    cases = [(0, 1 << 20), (big - 100, 1 << 20), (big, 10), (511, 2)]
    cases += [(rng.randrange(big), rng.randrange(1, 1 << 20)) for _ in range(20)]
    for oid, name in ((frag, "a"), (whole, "w")):
        want = content(name, big)
        for off, length in cases:
            lease = await vol.read_lease(oid, off, length)
            with lease:
                assert lease.view == want[off : off + length], (name, off, length)
            assert lending.lent_now == 0
    # a read inside one run of the file's blocks comes back in the device's buffer
    with await vol.read_lease(whole, 0, 4096) as lease:
        assert lease.lent and lending.lent_now == 1
        assert lease.view == content("w", 4096)
    assert lending.lent_now == 0


async def test_a_fragmented_read_bridges_small_gaps_in_few_requests() -> None:
    """The file written whole has an extension block after every 72 data blocks: a MiB
    of it is 29 ranges, read in one or two device requests (gaps included)."""
    big = 3 * 1024 * 1024
    dev, geo, _frag, whole = await build(512, 24_000, big)
    lending = LendingDevice(dev.data)
    vol = await open_volume(lending, geo, True)
    assert isinstance(vol, FfsVolumeBase)
    plan = await vol._plan_read(whole, await vol._entry(whole), 1 << 20, 1 << 20)
    assert not isinstance(plan, bytes) and len(plan[0]) >= 20
    before = lending.requests
    with await vol.read_lease(whole, 1 << 20, 1 << 20) as lease:
        assert lease.view == content("w", 2 << 20)[1 << 20 :]
    assert lending.requests - before <= 2
    assert lending.lent_now == 0


async def test_cancelled_and_failed_lease_reads_give_every_buffer_back() -> None:
    big = 2 * 1024 * 1024
    dev, geo, frag, whole = await build(512, 24_000, big)
    lending = LendingDevice(dev.data, slots=16, delay=0.001)
    vol = await open_volume(lending, geo, True)
    assert isinstance(vol, FfsVolumeBase)
    await vol.read(frag, 0, 1)
    await vol.read(whole, 0, 1)
    cancelled = 0

    async def read_and_release(oid: int, off: int) -> None:
        (await vol.read_lease(oid, off, 1 << 20)).release()

    for i in range(20):
        with trio.move_on_after(0.0005 * i) as scope:
            async with trio.open_nursery() as nursery:
                for oid in (frag, whole, frag):
                    nursery.start_soon(read_and_release, oid, 64 * 1024 * i)
        cancelled += scope.cancelled_caught
        assert lending.lent_now == 0  # whether cancelled or done, nothing kept
    assert cancelled > 0
    # a device error in a fragmented read: that error, no buffer kept
    data, _ = await vol._block_lists(frag, await vol._entry(frag))
    lending.fail_at = data[700]
    with pytest.raises(MediumError):
        await vol.read_lease(frag, 0, 1 << 20)
    assert lending.lent_now == 0
    lending.fail_at = None
    with await vol.read_lease(frag, 0, 1 << 20) as lease:
        assert lease.view == content("a", 1 << 20)
    assert lending.lent_now == 0
    assert lending.most > 8  # the three reads did overlap at the device


async def test_many_concurrent_lease_readers_stay_within_the_devices_buffers() -> None:
    big = 2 * 1024 * 1024
    dev, geo, frag, whole = await build(512, 24_000, big)
    lending = LendingDevice(dev.data, slots=16, delay=0.0005)
    vol = await open_volume(lending, geo, True)
    got: list[bool] = []

    async def reader(oid: int, name: str, off: int) -> None:
        with await vol.read_lease(oid, off, 256 * 1024) as lease:
            got.append(lease.view == content(name, big)[off : off + 256 * 1024])

    # FUSE hands over at most a few reads at once; each holds at most DATA_READS_IN_FLIGHT
    async with trio.open_nursery() as nursery:
        for off in range(0, big, 256 * 1024):
            nursery.start_soon(reader, whole, "w", off)
    assert got and all(got)
    assert lending.lent_now == 0
    got.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, frag, "a", 0)
        nursery.start_soon(reader, frag, "a", 512 * 1024)
    assert got == [True, True] and lending.lent_now == 0


async def test_read_lease_sees_data_staged_but_not_yet_written() -> None:
    """A read-write volume holds small writes in memory (StagedBlockIO overrides read):
    read_lease must return them, not the device's older bytes."""
    dev, geo, _frag, whole = await build(512, 24_000, 256 * 1024)
    lending = LendingDevice(dev.data)
    vol = await open_volume(lending, geo, False)
    await vol.write(whole, 1000, b"new bytes")  # a small write: staged, not on the device
    want = bytearray(content("w", 256 * 1024))
    want[1000:1009] = b"new bytes"
    with await vol.read_lease(whole, 0, 256 * 1024) as lease:
        assert lease.view == want
    assert lending.lent_now == 0
    await vol.truncate(whole, 3)
    with await vol.read_lease(whole, 0, 100) as lease:
        assert lease.view == want[:3]
    await vol.close()
