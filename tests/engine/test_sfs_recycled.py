"""Deleting into ``.recycled`` as the SmartFilesystem handler does (docs/sfs.md,
"Deleting: .recycled"): which objects go there, names on collision, the root info's
counters, Info/statfs counting them as free, and the purges (beyond 35 files, and
whenever space runs out)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.errors import NoSpace, NotFound
from amigafuse.fs.api import SetAttrs
from amigafuse.fs.sfs import check_volume, codec, format_volume, open_volume
from amigafuse.fs.sfs.volume import SfsVolume
from tests.engine.test_sfs_support import first_partition

REC = codec.RECYCLEDNODE


async def fresh(blocks: int = 8192, bs: int = 512, dostype: int = SFS0) -> tuple[MemoryBlockDevice, VolumeGeometry, SfsVolume]:
    dev = MemoryBlockDevice(blocks * bs // 512, 512)
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs)
    await format_volume(dev, geo, "Rec")
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol, SfsVolume)
    return dev, geo, vol


async def counters(vol: SfsVolume) -> tuple[int, int]:
    ri = await vol.r.root_info()
    return ri.deletedfiles, ri.deletedblocks


async def assert_clean(dev: MemoryBlockDevice, geo: VolumeGeometry) -> None:
    rep = await check_volume(dev, geo, False)
    assert rep.clean, rep.errors
    assert not rep.warnings, rep.warnings


@pytest.mark.parametrize("dostype", [SFS0, SFS2])
async def test_a_deleted_file_moves_into_recycled(dostype: int) -> None:
    dev, geo, vol = await fresh(dostype=dostype)
    d = await vol.mkdir(vol.root_id, "d")
    st = await vol.create(d.object_id, "doc.txt")
    await vol.write(st.object_id, 0, b"x" * 1300)
    await vol.setattr(st.object_id, SetAttrs(comment="kept", protection=0x10))
    before = await vol.getattr(st.object_id)
    free = (await vol.statfs()).free_blocks
    await vol.unlink(d.object_id, "doc.txt")
    with pytest.raises(NotFound):
        await vol.lookup(d.object_id, "doc.txt")
    # Still hidden from the root's listing, reachable by name; node, data, comment,
    # protection and date kept.
    assert ".recycled" not in [s.name for s in await vol.readdir(vol.root_id)]
    moved = await vol.lookup(REC, "doc.txt")
    assert moved.object_id == st.object_id
    assert (moved.size, moved.comment, moved.protection, moved.date) == (1300, "kept", before.protection, before.date)
    assert await vol.read(moved.object_id, 0, 2000) == b"x" * 1300
    assert await counters(vol) == (1, 3)
    # The handler's Info counts them as free: statfs grows as for a real delete.
    assert (await vol.statfs()).free_blocks == free + 3
    # Directories and soft links are deleted at once; so is a file in .recycled.
    await vol.symlink(vol.root_id, "ln", "d")
    await vol.unlink(vol.root_id, "ln")
    await vol.rmdir(vol.root_id, "d")
    assert [s.name for s in await vol.readdir(REC)] == ["doc.txt"]
    await vol.unlink(REC, "doc.txt")
    assert await counters(vol) == (0, 0)
    assert await vol.readdir(REC) == []
    await vol.close()
    await assert_clean(dev, geo)


async def test_name_collisions_get_the_handlers_suffix() -> None:
    dev, geo, vol = await fresh()
    for _ in range(3):
        st = await vol.create(vol.root_id, "same")
        await vol.write(st.object_id, 0, b"s")
        await vol.unlink(vol.root_id, "same")
    long = "L" * 107
    for _ in range(2):
        await vol.create(vol.root_id, long)
        await vol.unlink(vol.root_id, long)
    names = sorted(s.name for s in await vol.readdir(REC))
    assert names == sorted(["same", "same$AAA", "same$AAB", long, "L" * 103 + "$AAA"])
    # Names compare without case, as everywhere on the volume.
    await vol.create(vol.root_id, "SAME")
    await vol.unlink(vol.root_id, "SAME")
    assert "SAME$AAC" in [s.name for s in await vol.readdir(REC)]
    assert await counters(vol) == (6, 3)
    await vol.close()
    await assert_clean(dev, geo)


async def test_more_than_35_files_start_a_purge() -> None:
    dev, geo, vol = await fresh()
    order = []
    for i in range(60):
        name = f"f{i:02d}"
        st = await vol.create(vol.root_id, name)
        await vol.write(st.object_id, 0, bytes([i]) * 100)
        await vol.unlink(vol.root_id, name)
        order.append(name)
        held = [s.name for s in await vol.readdir(REC)]
        files, _ = await counters(vol)
        assert files == len(held) <= 35
        if i == 35:
            # The 36th deletion purged the oldest (the handler takes the first object
            # of the last container of the chain; new containers go to the front).
            assert "f00" not in held and "f35" in held
    held = {s.name for s in await vol.readdir(REC)}
    assert order[-1] in held
    await vol.close()
    await assert_clean(dev, geo)


async def test_space_held_in_recycled_is_given_back_before_enospc() -> None:
    """A volume never answers ENOSPC while .recycled holds files: they are purged
    (the handler's freeupspace) and the write goes through."""
    dev, geo, vol = await fresh(blocks=4096)
    made = []
    i = 0
    with pytest.raises(NoSpace):
        while True:
            st = await vol.create(vol.root_id, f"big{i}")
            made.append(f"big{i}")
            await vol.write(st.object_id, 0, b"b" * 100_000)
            i += 1
    for name in made:
        await vol.unlink(vol.root_id, name)
    files, blocks = await counters(vol)
    assert files == len(made) and blocks > 2000
    st = await vol.statfs()
    assert st.free_blocks > 2000  # what the handler's Info would report
    new = await vol.create(vol.root_id, "fits")
    await vol.write(new.object_id, 0, b"n" * (blocks * 512 // 2))
    assert (await counters(vol))[0] < files
    await vol.close()
    await assert_clean(dev, geo)
    # With .recycled empty and the volume full, ENOSPC is the answer.
    vol2 = await open_volume(dev, geo, False)
    with pytest.raises(NoSpace):
        for k in range(10_000):
            s = await vol2.create(vol2.root_id, f"more{k}")
            await vol2.write(s.object_id, 0, b"m" * 50_000)
    await vol2.close()
    await assert_clean(dev, geo)


async def test_volume_without_recycled_deletes_at_once() -> None:
    dev = MemoryBlockDevice(8192, 512)
    geo = VolumeGeometry(dostype=SFS0)
    await format_volume(dev, geo, "NoRec", recycled=False)
    vol = await open_volume(dev, geo, False)
    free = (await vol.statfs()).free_blocks
    st = await vol.create(vol.root_id, "f")
    await vol.write(st.object_id, 0, b"f" * 5000)
    await vol.unlink(vol.root_id, "f")
    assert (await vol.statfs()).free_blocks == free
    with pytest.raises(NotFound):
        await vol.lookup(vol.root_id, ".recycled")
    await vol.close()
    await assert_clean(dev, geo)


async def test_on_a_handler_image(image_copy: Callable[[str], Path]) -> None:
    """Deleting the live /special/recreated.bin next to the handler's recycled copy
    of its predecessor: the suffix, the counters, and a clean check."""
    path = image_copy("handler/sfs0_v1277.hdf.gz")
    dev, geo = first_partition(path, read_only=False)
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol, SfsVolume)
    special = await vol.lookup(vol.root_id, "special")
    live = await vol.lookup(special.object_id, "recreated.bin")
    data = await vol.read(live.object_id, 0, live.size)
    await vol.unlink(special.object_id, "recreated.bin")
    assert await counters(vol) == (2, 137 + 1)
    assert sorted(s.name for s in await vol.readdir(REC)) == ["recreated.bin", "recreated.bin$AAA"]
    again = await vol.lookup(REC, "recreated.bin$AAA")
    assert again.object_id == live.object_id and await vol.read(again.object_id, 0, 1000) == data
    await vol.close()
    rep = await check_volume(dev, geo, False)
    assert rep.clean and not rep.warnings, (rep.errors, rep.warnings)
    assert rep.stats["recycled_files"] == 2


async def test_deleting_a_huge_file_on_a_full_volume() -> None:
    """The volume is full (one file spanning every bitmap block, then small files):
    deleting the big file still works (no room to move it into .recycled: it is
    deleted at once), its records fit in the reserved blocks, and the space is back."""
    import trio

    dev, geo, vol = await fresh(blocks=32768)
    big = await vol.create(vol.root_id, "big")
    written = 0
    with pytest.raises(NoSpace):
        while True:
            await vol.write(big.object_id, written, b"B" * (1 << 20))
            written += 1 << 20
    with pytest.raises(NoSpace):
        for i in range(100_000):
            await vol.create(vol.root_id, f"s{i:05d}")
    with trio.fail_after(120):
        await vol.unlink(vol.root_id, "big")
    assert (await vol.statfs()).free_blocks * 512 >= written
    s0 = await vol.lookup(vol.root_id, "s00000")
    await vol.write(s0.object_id, 0, b"a" * 1_000_000)
    await vol.close()
    assert vol.w is not None and vol.w.unrecorded_commits == 0
    await assert_clean(dev, geo)
