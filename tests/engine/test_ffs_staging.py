"""FFS writer: small data writes are staged in memory and written out, coalesced, before
the metadata that points at them (writer.py "Staged data")."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import DeviceError, MediumError
from amigafuse.fs.ffs import ENGINE, open_volume
from amigafuse.fs.ffs.writer import STAGE_LIMIT_BYTES, StagedBlockIO

DOSTYPES = [0x444F5300, 0x444F5301, 0x444F5303, 0x444F5305, 0x444F5307]


class RecordingDevice(MemoryBlockDevice):
    """Records (lba, count) of every write; can be told to fail writes."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.log: list[tuple[int, int]] = []
        self.fail_writes = False

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        if self.fail_writes:
            raise MediumError(f"write at block {lba} failed (test)")
        self.log.append((lba, len(data) // self.block_size))
        await super().write(lba, data)


async def fresh(dostype: int, bs: int = 512, blocks: int = 8000) -> tuple[RecordingDevice, VolumeGeometry]:
    dev = RecordingDevice(blocks * (bs // 512))
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs, fs_block_count=blocks, reserved=2)
    await ENGINE.format_volume(dev, geo, "Test")
    return dev, geo


def payload(i: int) -> bytes:
    return bytes((i * 7 + k) & 0xFF for k in range(100 + 37 * i))


@pytest.mark.parametrize("dostype", DOSTYPES)
async def test_small_files_are_staged_then_written_coalesced_before_metadata(dostype: int) -> None:
    dev, geo = await fresh(dostype)
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol.io, StagedBlockIO)
    dev.log.clear()
    ids = []
    for i in range(40):
        st = await vol.create(vol.root_id, f"f{i:02d}")
        await vol.write(st.object_id, 0, payload(i))
        ids.append(st.object_id)
    assert dev.log == []  # nothing reached the device yet
    for i, oid in enumerate(ids):  # reads see the staged data
        assert await vol.read(oid, 0, 1 << 16) == payload(i)
    headers = {vol._block_for(oid) for oid in ids}
    data_blocks = {b for oid in ids for b in vol._blists[vol._block_for(oid)][0]}
    await vol.sync()
    # far fewer device writes than files; every data block goes out no later than the
    # header pointing at it (same request or before), the bitmap and root after both
    assert len(dev.log) <= 10
    def first_write(block: int) -> int:
        return min(i for i, (lba, n) in enumerate(dev.log) if lba <= block < lba + n)
    for oid in ids:
        h = vol._block_for(oid)
        assert all(first_write(d) <= first_write(h) for d in vol._blists[h][0])
    last_data_or_header = max(first_write(b) for b in headers | data_blocks)
    root_lba = (geo.reserved + geo.fs_block_count - 1) // 2 * (geo.fs_block_size // 512)
    assert first_write(root_lba) > last_data_or_header
    assert vol.io.staged_bytes == 0
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).clean
    again = await open_volume(dev, geo, True)
    for i in range(40):
        st = await again.lookup(again.root_id, f"f{i:02d}")
        assert await again.read(st.object_id, 0, 1 << 16) == payload(i)


async def test_freed_staged_blocks_are_not_written_and_write_through_wins() -> None:
    dev, geo = await fresh(0x444F5303)
    vol = await open_volume(dev, geo, False)
    gone = await vol.create(vol.root_id, "gone")
    await vol.write(gone.object_id, 0, b"G" * 3000)
    gone_blocks = list(vol._blists[vol._block_for(gone.object_id)][0])
    await vol.unlink(vol.root_id, "gone")
    f = await vol.create(vol.root_id, "grows")
    await vol.write(f.object_id, 0, b"s" * 1000)  # staged
    big = bytes(range(256)) * 1024  # 256 KiB: written through, over the staged blocks
    await vol.write(f.object_id, 0, big)
    assert await vol.read(f.object_id, 0, 1 << 20) == big
    dev.log.clear()
    await vol.sync()
    written = {b for lba, n in dev.log for b in range(lba, lba + n)}
    # the unlinked file's data blocks were not written unless reused by the new file
    reused = set(vol._blists[vol._block_for(f.object_id)][0])
    assert not (set(gone_blocks) - reused) & written
    await vol.close()
    again = await open_volume(dev, geo, True)
    st = await again.lookup(again.root_id, "grows")
    assert await again.read(st.object_id, 0, 1 << 20) == big


async def test_staged_data_beyond_the_limit_is_written_at_once() -> None:
    dev, geo = await fresh(0x444F5301, bs=4096, blocks=4000)
    vol = await open_volume(dev, geo, False)
    dev.log.clear()
    n = STAGE_LIMIT_BYTES // 32768 + 4
    for i in range(n):
        st = await vol.create(vol.root_id, f"p{i}")
        await vol.write(st.object_id, 0, bytes([i & 0xFF]) * 32768)
    assert isinstance(vol.io, StagedBlockIO)
    assert vol.io.staged_bytes <= STAGE_LIMIT_BYTES
    assert dev.log  # some went out before any sync
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).clean


async def test_a_failing_device_fails_sync_and_keeps_the_data_staged() -> None:
    dev, geo = await fresh(0x444F5303)
    vol = await open_volume(dev, geo, False)
    st = await vol.create(vol.root_id, "f")
    await vol.write(st.object_id, 0, b"kept" * 100)
    dev.fail_writes = True
    with pytest.raises(DeviceError):
        await vol.sync()
    assert await vol.read(st.object_id, 0, 1000) == b"kept" * 100
    dev.fail_writes = False
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).clean
    again = await open_volume(dev, geo, True)
    f = await again.lookup(again.root_id, "f")
    assert await again.read(f.object_id, 0, 1000) == b"kept" * 100


async def test_read_only_volumes_do_not_stage() -> None:
    dev, geo = await fresh(0x444F5303)
    vol = await open_volume(dev, geo, True)
    assert not isinstance(vol.io, StagedBlockIO)



async def test_the_root_altered_date_is_the_last_change_not_the_write_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from amigafuse.amiga.dates import DateStamp
    from amigafuse.fs.ffs.layout import RootBlock

    dev, geo = await fresh(0x444F5303)
    vol = await open_volume(dev, geo, False)
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: 1_700_000_000.5)
        await vol.mkdir(vol.root_id, "changed")
    await vol.close()
    rb = (geo.reserved + geo.fs_block_count - 1) // 2
    root = RootBlock.unpack(bytes(dev.data[rb * 512 : (rb + 1) * 512]))
    assert root.volume_date == DateStamp.from_unix(1_700_000_000.5)


# ---------------------------------------------------------------- StagedBlockIO model

_BS = 512
_BLOCKS = 16  # few blocks: operations collide often
_op = st.one_of(
    st.tuples(st.just("stage"), st.integers(0, _BLOCKS - 4), st.integers(1, 4), st.integers(0, 255)),
    st.tuples(st.just("write"), st.integers(0, _BLOCKS - 4), st.integers(1, 4), st.integers(0, 255)),
    st.tuples(st.just("read"), st.integers(0, _BLOCKS - 8), st.integers(1, 8), st.just(0)),
    st.tuples(st.just("drop"), st.integers(0, _BLOCKS - 4), st.integers(1, 4), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("flush_with"), st.integers(0, _BLOCKS - 2), st.integers(1, 2), st.integers(0, 255)),
)


@settings(max_examples=80)
@given(st.lists(_op, max_size=40))
def test_staged_io_reads_what_was_last_written(ops: list[tuple[str, int, int, int]]) -> None:
    """Against a model: reads see the newest contents (staged or written); after a flush
    the device holds exactly what reads saw; dropped blocks keep their old device
    contents unless written again."""
    import trio

    async def run() -> None:
        dev = MemoryBlockDevice(_BLOCKS)
        io = StagedBlockIO(dev, _BS)
        view = bytearray(_BLOCKS * _BS)  # what reads must return
        disk = bytearray(_BLOCKS * _BS)  # what the device must hold after a flush
        staged: dict[int, bytes] = {}
        for op, block, count, fill in ops:
            data = bytes([fill]) * (count * _BS)
            lo, hi = block * _BS, (block + count) * _BS
            if op == "stage":
                io.stage(block, data)
                view[lo:hi] = data
                for i in range(count):
                    staged[block + i] = data[i * _BS : (i + 1) * _BS]
            elif op == "write":
                await io.write(block, data)
                view[lo:hi] = data
                disk[lo:hi] = data
                for i in range(count):
                    staged.pop(block + i, None)
            elif op == "read":
                assert await io.read(block, count) == bytes(view[lo:hi])
            elif op == "drop":
                io.drop(list(range(block, block + count)))
                for i in range(count):
                    if staged.pop(block + i, None) is not None:  # back to the device's bytes
                        b = block + i
                        view[b * _BS : (b + 1) * _BS] = disk[b * _BS : (b + 1) * _BS]
            else:
                extra = {block + i: bytes([fill]) * _BS for i in range(count)} if op == "flush_with" else {}
                await io.flush_staged(extra)
                for b, d in {**staged, **extra}.items():
                    disk[b * _BS : (b + 1) * _BS] = d
                    view[b * _BS : (b + 1) * _BS] = d
                staged.clear()
                assert io.staged_bytes == 0
                assert bytes(dev.data) == bytes(disk)
        await io.flush()
        for b, d in staged.items():
            disk[b * _BS : (b + 1) * _BS] = d
        assert bytes(dev.data) == bytes(disk) == bytes(view)

    trio.run(run)
