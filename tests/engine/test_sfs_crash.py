"""Crash safety: the device stops after N writes, at every N of an operation sequence
and its commit; the volume must reopen (journal replayed, or read-only with the journal
applied in memory) with no corruption, holding either the old or the new tree."""

from __future__ import annotations

import struct

import pytest

from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.blockdev.base import BlockDevice
from amigafuse.errors import AmigaFuseError, DeviceGone, NoSpace
from amigafuse.fs.api import Kind, Volume
from amigafuse.fs.sfs import check_volume, codec, format_volume, open_volume, transactions


class CrashingDevice(BlockDevice):
    """A memory device that dies (DeviceGone, write not done) after ``limit`` writes."""

    def __init__(self, data: bytes, limit: int | None = None) -> None:
        self.mem = MemoryBlockDevice(data=data)
        self.limit = limit
        self.writes = 0

    @property
    def block_size(self) -> int:
        return self.mem.block_size

    @property
    def block_count(self) -> int:
        return self.mem.block_count

    async def read(self, lba: int, count: int) -> bytes:
        return await self.mem.read(lba, count)

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        if self.limit is not None and self.writes >= self.limit:
            raise DeviceGone("simulated crash")
        self.writes += 1
        await self.mem.write(lba, data)


async def snapshot(vol: Volume) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}

    async def walk(dir_id: int, prefix: str) -> None:
        for s in await vol.readdir(dir_id):
            p = f"{prefix}/{s.name}"
            if s.kind is Kind.DIR:
                out[p] = None
                await walk(s.object_id, p)
            else:
                out[p] = await vol.read(s.object_id, 0, s.size)

    await walk(vol.root_id, "")
    return out


async def workload(vol: Volume) -> None:
    d = await vol.lookup(vol.root_id, "dir")
    for i in range(12):
        st = await vol.create(d.object_id, f"new_{i:02d}")
        await vol.write(st.object_id, 0, bytes([i]) * (700 * i + 1))
    old = await vol.lookup(vol.root_id, "old.bin")
    await vol.truncate(old.object_id, 3000)
    await vol.write(old.object_id, 100, b"in place" * 200)  # overwrites committed blocks
    await vol.write(old.object_id, 10000, b"tail" * 100)
    await vol.unlink(vol.root_id, "gone.txt")
    await vol.rename(vol.root_id, "keep.txt", d.object_id, "kept.txt")
    await vol.mkdir(vol.root_id, "fresh")
    await vol.sync()


async def base_image(dostype: int, bs: int) -> tuple[bytes, VolumeGeometry]:
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs)
    dev = MemoryBlockDevice((2 << 20) // 512, 512)
    await format_volume(dev, geo, "Crash")
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "dir")
    for i in range(30):
        st = await vol.create(d.object_id, f"base_{i:02d}")
        await vol.write(st.object_id, 0, bytes([i]) * 300)
    for name, size in (("old.bin", 40000), ("gone.txt", 5000), ("keep.txt", 10)):
        st = await vol.create(vol.root_id, name)
        await vol.write(st.object_id, 0, b"o" * size)
    await vol.close()
    return bytes(dev.data), geo


@pytest.mark.parametrize(("dostype", "bs"), [(SFS0, 512), (SFS2, 1024)])
async def test_crash_at_every_write(dostype: int, bs: int) -> None:
    image, geo = await base_image(dostype, bs)
    vol = await open_volume(MemoryBlockDevice(data=image), geo, True)
    before = await snapshot(vol)
    dry = CrashingDevice(image)
    vol = await open_volume(dry, geo, False)
    await workload(vol)
    after = await snapshot(vol)
    assert after != before
    total = dry.writes
    assert total >= 20
    replayed = 0
    for limit in range(total + 1):
        dev = CrashingDevice(image, limit)
        try:
            vol = await open_volume(dev, geo, False)
            await workload(vol)
        except DeviceGone:
            pass
        crashed = bytes(dev.mem.data)
        # Read-only first: a pending journal is applied in memory only.
        ro = await open_volume(MemoryBlockDevice(data=crashed, read_only=True), geo, True)
        state_ro = await snapshot(ro)
        assert state_ro in (before, after), limit
        # Read-write: the journal is replayed; the checker finds nothing wrong.
        mem = MemoryBlockDevice(data=crashed)
        rw = await open_volume(mem, geo, False)
        if any("replayed" in n for n in rw.info.notes):
            replayed += 1
        assert await snapshot(rw) == state_ro, limit
        await rw.close()
        rep = await check_volume(mem, geo, False)
        assert rep.clean, (limit, rep.errors)
    assert replayed > 0


async def test_bad_handler_transaction_opens_read_only() -> None:
    image, geo = await base_image(SFS0, 512)
    mem = MemoryBlockDevice(data=image)
    tr = bytearray(512)
    struct.pack_into(">I", tr, 12, 40)  # points at a bitmap block, not a TRST chain
    codec.finish_block(tr, codec.TRANSACTIONFAILURE_ID, 5)
    mem.data[5 * 512 : 6 * 512] = tr
    vol = await open_volume(mem, geo, False)
    assert vol.info.read_only
    assert any("TRFA" in n for n in vol.info.notes)
    assert "/dir" in await snapshot(vol)


def handler_crash_image(before: bytes, after: bytes, applied: float, bs: int = 512) -> bytes:
    """``after`` with its changed metadata blocks still as in ``before`` (a fraction
    ``applied`` already new) and the handler's TRFA + TRST records describing them."""
    total = len(after) // bs
    out = bytearray(after)
    ops = []
    changed = []
    for n in range(1, total - 1):
        a, b = before[n * bs : (n + 1) * bs], after[n * bs : (n + 1) * bs]
        if a == b or n == 5:
            continue
        if codec.checksum_ok(b) and struct.unpack_from(">I", b, 8)[0] == n and struct.unpack_from(">I", b, 0)[0]:
            changed.append(n)
            empty = not any(a)
            ops.append(transactions.Operation(n, transactions.OI_EMPTY if empty else 0,
                                              transactions.compress_from_zero(b) if empty else transactions.compress(a, b)))
    for i, n in enumerate(changed):
        if i >= len(changed) * applied:
            out[n * bs : (n + 1) * bs] = before[n * bs : (n + 1) * bs]
    stream = transactions.pack_operations(ops)
    area = bs - transactions.TRANSACTIONSTORAGE_HEADER
    chunks = [stream[i : i + area] for i in range(0, len(stream), area)]
    first = total - 2 - len(chunks)
    for i, chunk in enumerate(chunks):
        blk = bytearray(bs)
        nxt = first + i + 1 if i + 1 < len(chunks) else 0
        struct.pack_into(">I", blk, 12, nxt)
        blk[16 : 16 + len(chunk)] = chunk
        codec.finish_block(blk, codec.TRANSACTIONSTORAGE_ID, first + i)
        out[(first + i) * bs : (first + i + 1) * bs] = blk
    tr = bytearray(bs)
    struct.pack_into(">I", tr, 12, first)
    codec.finish_block(tr, codec.TRANSACTIONFAILURE_ID, 5)
    out[5 * bs : 6 * bs] = tr
    assert len(changed) > 5
    return bytes(out)


@pytest.mark.parametrize("applied", [0.0, 0.5, 1.0])
async def test_handler_transaction_is_replayed(applied: float) -> None:
    image, geo = await base_image(SFS0, 512)
    mem = MemoryBlockDevice(data=image)
    vol = await open_volume(mem, geo, False)
    await workload(vol)
    await vol.close()
    after = bytes(mem.data)
    want = await snapshot(await open_volume(MemoryBlockDevice(data=after), geo, True))
    crashed = handler_crash_image(image, after, applied)
    ro = await open_volume(MemoryBlockDevice(data=crashed), geo, True)
    assert any("applied in memory" in n for n in ro.info.notes)
    assert await snapshot(ro) == want
    dev = MemoryBlockDevice(data=crashed)
    rw = await open_volume(dev, geo, False)
    assert not rw.info.read_only
    assert any("SmartFilesystem transaction" in n and "replayed" in n for n in rw.info.notes)
    assert await snapshot(rw) == want
    await rw.close()
    assert (await check_volume(dev, geo, False)).clean


def test_compression_roundtrip() -> None:
    import random

    rnd = random.Random(5)
    for _ in range(200):
        a = bytes(rnd.choice([0, 1, 255, 7]) for _ in range(512))
        b = bytearray(a)
        for _ in range(rnd.randrange(0, 40)):
            i = rnd.randrange(512)
            b[i] = rnd.choice([0, 255, rnd.randrange(256)])
        if rnd.random() < 0.2:
            b[100:300] = b"\xff" * 200
        packed = transactions.compress(a, bytes(b))
        assert transactions.uncompress(a, packed) == bytes(b)
        assert transactions.uncompress(bytes(b), packed) == bytes(b)
        ops = transactions.parse_operations(transactions.pack_operations([transactions.Operation(9, 0, packed)]))
        assert ops == [transactions.Operation(9, 0, packed)]


async def test_full_volume_gives_nospace_and_stays_consistent() -> None:
    geo = VolumeGeometry(dostype=SFS0, fs_block_size=512)
    dev = MemoryBlockDevice((1 << 20) // 512, 512)
    await format_volume(dev, geo, "Full")
    vol = await open_volume(dev, geo, False)
    big = await vol.create(vol.root_id, "big")
    written = 0
    with pytest.raises(NoSpace):
        while True:
            await vol.write(big.object_id, written, b"z" * 65536)
            written += 65536
    # Many small files until metadata space runs out as well.
    made = 0
    with pytest.raises(NoSpace):
        for i in range(100000):
            await vol.create(vol.root_id, f"small_{i:05d}")
            made += 1
    st = await vol.getattr(big.object_id)
    assert st.size == written
    await vol.close()
    # Every commit, even on the full volume, wrote its records (TRST chain) first.
    assert vol.w is not None and vol.w.unrecorded_commits == 0  # type: ignore[attr-defined]
    rep = await check_volume(dev, geo, False)
    assert rep.clean, rep.errors
    vol = await open_volume(dev, geo, False)
    assert len(await vol.readdir(vol.root_id)) == made + 1
    assert await vol.read(big.object_id, written - 10, 100) == b"z" * 10
    # Freeing space makes room again.
    await vol.unlink(vol.root_id, "big")
    st = await vol.create(vol.root_id, "after")
    await vol.write(st.object_id, 0, b"ok" * 1000)
    await vol.close()
    assert vol.w is not None and vol.w.unrecorded_commits == 0  # type: ignore[attr-defined]
    assert (await check_volume(dev, geo, False)).clean


async def test_errors_are_amigafuse_errors() -> None:
    image, geo = await base_image(SFS0, 512)
    vol = await open_volume(MemoryBlockDevice(data=image), geo, False)
    d = await vol.lookup(vol.root_id, "dir")
    for coro in (
        vol.create(vol.root_id, "dir"),
        vol.rmdir(vol.root_id, "dir"),
        vol.unlink(vol.root_id, "dir"),
        vol.rename(vol.root_id, "dir", d.object_id, "inside"),
        vol.link(d.object_id, vol.root_id, "hard"),
        vol.lookup(vol.root_id, "x" * 200),
        vol.create(vol.root_id, "bad/name"),
        vol.read(d.object_id, 0, 10),
    ):
        with pytest.raises(AmigaFuseError):
            await coro


@pytest.mark.parametrize(
    "damage",
    ["none", "duplicate", "short_record", "empty_with_skip", "chain_loop", "trst_checksum", "targets_chain"],
)
async def test_damaged_transaction_records_open_read_only(damage: str) -> None:
    """A TRFA whose records are damaged or ambiguous is never applied: the volume opens
    read-only, unchanged, with a note (and the handler's own reading is left to AmigaOS)."""
    image, geo = await base_image(SFS0, 512)
    bs = 512
    good = transactions.compress(image[8 * bs : 9 * bs], image[8 * bs : 9 * bs])  # all unchanged
    ops = [transactions.Operation(8, 0, good)]
    chain = [1000, 1001]
    if damage == "duplicate":
        ops = [transactions.Operation(8, 0, good), transactions.Operation(8, 0, good)]
    elif damage == "short_record":
        ops = [transactions.Operation(8, 0, b"\x40")]  # describes 1 of 128 longs
    elif damage == "empty_with_skip":
        ops = [transactions.Operation(8, transactions.OI_EMPTY, good)]
    elif damage == "targets_chain":
        ops = [transactions.Operation(1000, 0, good)]
    stream = transactions.pack_operations(ops)
    chain = chain[: transactions.storage_block_count(len(stream), bs)]
    blocks = dict(transactions.storage_blocks(stream, chain, bs, False))
    if damage == "chain_loop":
        # One record longer than any chain (65535 bytes): a reader must follow ``next``,
        # and the chain comes back to its first block.
        chain = [1000, 1001, 1002]
        blocks = {}
        for i, b in enumerate(chain):
            raw = bytearray(bs)
            struct.pack_into(">I", raw, 12, chain[(i + 1) % 3])
            if i == 0:
                raw[16:18] = b"\xff\xff"
            blocks[b] = bytes(codec.finish_block(raw, codec.TRANSACTIONSTORAGE_ID, b))
    if damage == "trst_checksum":
        raw = bytearray(blocks[1000])
        raw[40] ^= 1
        blocks[1000] = bytes(raw)
    data = bytearray(image)
    for b, content in blocks.items():
        data[b * bs : (b + 1) * bs] = content
    data[5 * bs : 6 * bs] = transactions.failure_block(5, chain[0], bs, False)
    before = bytes(data)
    mem = MemoryBlockDevice(data=before)
    vol = await open_volume(mem, geo, False)
    if damage == "none":  # the control: the same record, undamaged, is replayed
        assert not vol.info.read_only
        assert any("replayed" in n for n in vol.info.notes), vol.info.notes
        assert bytes(mem.data[5 * bs : 5 * bs + 4]) == b"TROK"
        return
    assert vol.info.read_only
    assert any("TRFA" in n for n in vol.info.notes), vol.info.notes
    assert "/dir" in await snapshot(vol)
    assert bytes(mem.data) == before  # nothing was written
