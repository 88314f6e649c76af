"""FFS writing on in-memory devices: every DosType, 512- and 4096-byte blocks."""

from __future__ import annotations

import pytest

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import (
    DirectoryNotEmpty,
    Exists,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotFound,
    ReadOnlyFilesystem,
)
from amigafuse.fs.api import FIBF_ARCHIVE, Kind, SetAttrs
from amigafuse.fs.ffs import ENGINE, open_volume
from amigafuse.fs.ffs.layout import BM_INVALID, BM_VALID, RootBlock

DOSTYPES = [0x444F5300 + n for n in range(8)]


async def fresh(dostype: int, bs: int = 512, blocks: int = 8000) -> tuple[MemoryBlockDevice, VolumeGeometry]:
    dev = MemoryBlockDevice(blocks * (bs // 512))
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs, fs_block_count=blocks, reserved=2)
    await ENGINE.format_volume(dev, geo, "Test")
    return dev, geo


def root_of(dev: MemoryBlockDevice, geo: VolumeGeometry) -> RootBlock:
    rb = (geo.reserved + geo.fs_block_count - 1) // 2
    bs = geo.fs_block_size
    return RootBlock.unpack(bytes(dev.data[rb * bs : (rb + 1) * bs]))


@pytest.mark.parametrize("bs", [512, 1024, 4096])
@pytest.mark.parametrize("dostype", DOSTYPES)
async def test_operations_round_trip(dostype: int, bs: int) -> None:
    dev, geo = await fresh(dostype, bs)
    assert (await ENGINE.check_volume(dev, geo, False)).clean
    vol = await open_volume(dev, geo, False)
    assert root_of(dev, geo).bm_flag == BM_INVALID  # cleared on disk while mounted
    r = vol.root_id
    d = await vol.mkdir(r, "Dir")
    f = await vol.create(d.object_id, "file.txt")
    data = bytes(range(256)) * 700
    assert await vol.write(f.object_id, 0, data) == len(data)
    await vol.write(f.object_id, 1000, b"X" * 5000)
    exp = bytearray(data)
    exp[1000:6000] = b"X" * 5000
    assert await vol.read(f.object_id, 0, 1 << 20) == exp
    assert await vol.read(f.object_id, 177_000, 10) == exp[177_000:177_010]
    await vol.truncate(f.object_id, 3333)
    assert await vol.read(f.object_id, 0, 1 << 20) == exp[:3333]
    await vol.write(f.object_id, 4000, b"tail")  # a gap reads as zeros
    assert await vol.read(f.object_id, 3000, 2000) == bytes(exp[3000:3333]) + bytes(667) + b"tail"
    await vol.truncate(f.object_id, 3333)
    link = await vol.link(f.object_id, r, "hard")
    assert link.object_id == f.object_id and link.nlink == 2
    soft = await vol.symlink(r, "soft", "Dir/file.txt")
    assert await vol.readlink(soft.object_id) == "Dir/file.txt"
    st = await vol.setattr(f.object_id, SetAttrs(comment="c" * 79, protection=0x11))
    assert st.comment == "c" * 79 and st.protection == 0x11
    await vol.rename(d.object_id, "file.txt", r, "moved.txt")
    await vol.unlink(r, "moved.txt")  # the hard link is promoted
    st = await vol.lookup(r, "HARD")
    assert (st.object_id, st.nlink, st.size, st.comment) == (f.object_id, 1, 3333, "c" * 79)
    assert await vol.read(st.object_id, 0, 9999) == exp[:3333]
    await vol.close()
    assert root_of(dev, geo).bm_flag == BM_VALID
    report = await ENGINE.check_volume(dev, geo, False)
    assert report.errors == [] and report.warnings == []
    vol = await open_volume(dev, geo, True)
    names = sorted((s.name, s.kind) for s in await vol.readdir(vol.root_id))
    assert names == [("Dir", Kind.DIR), ("hard", Kind.FILE), ("soft", Kind.SOFTLINK)]


async def test_errors() -> None:
    dev, geo = await fresh(0x444F5303)
    vol = await open_volume(dev, geo, False)
    r = vol.root_id
    d = await vol.mkdir(r, "d")
    await vol.create(d.object_id, "f")
    with pytest.raises(Exists):
        await vol.create(r, "D")
    with pytest.raises(DirectoryNotEmpty):
        await vol.rmdir(r, "d")
    with pytest.raises(IsADirectory):
        await vol.unlink(r, "d")
    with pytest.raises(NotADirectory):
        await vol.rmdir(d.object_id, "f")
    with pytest.raises(NotFound):
        await vol.unlink(r, "nope")
    with pytest.raises(InvalidName):
        await vol.create(r, "a/b")
    with pytest.raises(InvalidName):
        await vol.create(r, "€uro")
    with pytest.raises(NameTooLong):
        await vol.create(r, "x" * 31)
    with pytest.raises(InvalidArgument):
        await vol.rename(r, "d", d.object_id, "inside")
    f = await vol.lookup(d.object_id, "f")
    await vol.write(f.object_id, 0, b"abc")
    assert not (await vol.getattr(f.object_id)).protection & FIBF_ARCHIVE
    await vol.close()
    ro = await open_volume(dev, geo, True)
    with pytest.raises(ReadOnlyFilesystem):
        await ro.create(r, "x")


@pytest.mark.parametrize("dostype", [0x444F5300, 0x444F5305])
async def test_full_volume_gives_nospace_and_stays_clean(dostype: int) -> None:
    dev, geo = await fresh(dostype, 512, 400)
    vol = await open_volume(dev, geo, False)
    f = await vol.create(vol.root_id, "big")
    with pytest.raises(NoSpace):
        await vol.write(f.object_id, 0, bytes(400 * 512))
    assert (await vol.getattr(f.object_id)).size == 0
    written = 0
    with pytest.raises(NoSpace):
        for i in range(1000):
            g = await vol.create(vol.root_id, f"f{i}")
            await vol.write(g.object_id, 0, b"y" * 1000)
            written += 1
    assert written > 10
    await vol.close()
    report = await ENGINE.check_volume(dev, geo, False)
    assert report.errors == []


async def test_invalid_bitmap_is_validated_on_open() -> None:
    dev, geo = await fresh(0x444F5301)
    vol = await open_volume(dev, geo, False)
    f = await vol.create(vol.root_id, "f")
    await vol.write(f.object_id, 0, b"z" * 20000)
    await vol.sync()  # not closed: the flag stays clear, as after a crash
    assert root_of(dev, geo).bm_flag == BM_INVALID
    report = await ENGINE.check_volume(dev, geo, False)
    assert any("bitmap-valid" in e for e in report.errors)
    vol2 = await open_volume(dev, geo, False)
    assert any("rebuilt" in n for n in vol2.info.notes)
    await vol2.close()
    assert (await ENGINE.check_volume(dev, geo, False)).clean


async def test_deleted_ids_are_notfound_and_repair_on_read_only_device_says_so() -> None:
    dev, geo = await fresh(0x444F5301)
    vol = await open_volume(dev, geo, False)
    f = await vol.create(vol.root_id, "gone")
    await vol.unlink(vol.root_id, "gone")
    g = await vol.create(vol.root_id, "big")
    await vol.write(g.object_id, 0, b"d" * 50_000)  # may reuse the freed header as data
    with pytest.raises(NotFound):
        await vol.getattr(f.object_id)
    await vol.sync()  # leaves the flag clear: an error the checker reports
    ro = MemoryBlockDevice(data=bytes(dev.data), read_only=True)
    report = await ENGINE.check_volume(ro, geo, True)
    assert report.errors and any("read-only" in w for w in report.warnings)
    fixed = await ENGINE.check_volume(dev, geo, True)
    assert fixed.clean and fixed.repaired


@pytest.mark.parametrize("dostype", [0x444F5301, 0x444F5305, 0x444F5307])
async def test_directory_hard_links(dostype: int) -> None:
    dev, geo = await fresh(dostype)
    vol = await open_volume(dev, geo, False)
    r = vol.root_id
    d = await vol.mkdir(r, "real")
    sub = await vol.mkdir(r, "sub")
    link = await vol.link(d.object_id, sub.object_id, "dirlink")
    assert link.object_id == d.object_id and link.kind == Kind.DIR and link.nlink == 2
    f = await vol.create(link.object_id, "inside")  # through the link
    assert [s.name for s in await vol.readdir(d.object_id)] == ["inside"]
    await vol.unlink(d.object_id, "inside")
    await vol.rmdir(r, "real")  # the link is promoted and keeps the id
    st = await vol.lookup(sub.object_id, "dirlink")
    assert st.object_id == d.object_id and st.nlink == 1 and st.kind == Kind.DIR
    g = await vol.create(st.object_id, "after")
    assert (await vol.getattr(g.object_id)).name == "after"
    with pytest.raises(NotFound):
        await vol.getattr(f.object_id)
    await vol.close()
    report = await ENGINE.check_volume(dev, geo, False)
    assert report.errors == [] and report.warnings == []


async def test_512_byte_blocks_on_a_4k_sector_device() -> None:
    dev = MemoryBlockDevice(1000, block_size=4096)
    geo = VolumeGeometry(dostype=0x444F5303, fs_block_size=512, fs_block_count=8000, reserved=2)
    await ENGINE.format_volume(dev, geo, "Sector4K")
    vol = await open_volume(dev, geo, False)
    f = await vol.create(vol.root_id, "f")
    data = bytes(range(251)) * 1000
    for off in range(0, len(data), 3000):
        await vol.write(f.object_id, off, data[off : off + 3000])
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).clean
    vol = await open_volume(dev, geo, True)
    assert await vol.read(f.object_id, 0, 1 << 20) == data


async def test_many_tasks_at_once() -> None:
    import trio

    dev, geo = await fresh(0x444F5305, 512, 6000)
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "d")
    results: dict[str, bytes] = {}

    async def worker(n: int) -> None:
        f = await vol.create(d.object_id, f"w{n}")
        data = bytes([n]) * (n * 1500)
        for off in range(0, len(data), 700):
            await vol.write(f.object_id, off, data[off : off + 700])
            await trio.lowlevel.checkpoint()
        if n % 3 == 0:
            await vol.rename(d.object_id, f"w{n}", vol.root_id, f"moved{n}")
        results[f"w{n}"] = data

    async def lister() -> None:
        for _ in range(30):
            await vol.readdir(d.object_id)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for n in range(1, 25):
            nursery.start_soon(worker, n)
        nursery.start_soon(lister)
    await vol.close()
    report = await ENGINE.check_volume(dev, geo, False)
    assert report.errors == [] and report.warnings == []
    vol = await open_volume(dev, geo, True)
    for n in range(1, 25):
        where, name = (vol.root_id, f"moved{n}") if n % 3 == 0 else (d.object_id, f"w{n}")
        st = await vol.lookup(where, name)
        assert await vol.read(st.object_id, 0, 1 << 20) == results[f"w{n}"]
