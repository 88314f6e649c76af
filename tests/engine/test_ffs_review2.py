"""Review of issue 4 (the FFS write paths): full volumes, crash images and
cancellation.  Each test here failed before the fix named in its docstring."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import NoSpace
from amigafuse.fs.api import SetAttrs
from amigafuse.fs.ffs import ENGINE, open_volume
from tests.conftest import content
from tests.engine.test_ffs_cancel import CancellingDevice

DOS5 = 0x444F5305
DOS7 = 0x444F5307


async def fresh(dostype: int, blocks: int, bs: int = 512) -> tuple[MemoryBlockDevice, VolumeGeometry]:
    dev = MemoryBlockDevice(blocks * (bs // 512))
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs, fs_block_count=blocks, reserved=2)
    await ENGINE.format_volume(dev, geo, "Review2")
    return dev, geo


async def fill(vol: Any, dir_id: int, leave: int = 0) -> None:
    """Write filler files until exactly ``leave`` (0 or 1) blocks are free: the one
    left is a one-block file's data, freed at the end."""
    spacer = await vol.create(dir_id, "zz_spacer") if leave else None
    if spacer is not None:
        await vol.write(spacer.object_id, 0, b"s")
    f = await vol.create(dir_id, "zz_filler")
    size = 0
    step = vol.block_size * 16
    while step >= 1 and (await vol.statfs()).free_blocks:
        try:
            await vol.write(f.object_id, size, bytes(step))
            size += step
        except NoSpace:
            step //= 2
    assert (await vol.statfs()).free_blocks == 0
    if spacer is not None:
        await vol.truncate(spacer.object_id, 0)
        assert (await vol.statfs()).free_blocks == 1


async def clean(dev: MemoryBlockDevice, geo: VolumeGeometry) -> list[str]:
    """The checker's errors on what is on ``dev`` now (a copy, opened read-only),
    except the bitmap-valid flag a live read-write volume keeps clear."""
    snap = MemoryBlockDevice(data=bytes(dev.data), read_only=True)
    report = await ENGINE.check_volume(snap, geo, False)
    return [e for e in report.errors if "bitmap-valid flag" not in e]


# ------------------------------------------------------------------ full volumes
async def test_dcfs_comment_that_needs_a_new_dircache_block_on_a_full_volume() -> None:
    """setattr(comment) on DOS\\5 whose record no longer fits its dircache block, on a
    full volume: the record was removed, the new block could not be found, NoSpace left
    the directory without a record of the file (check: "dircache lacks entry")."""
    dev, geo = await fresh(DOS5, 400)
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "d")
    ids = [(await vol.create(d.object_id, f"file_with_a_name_{i:02}")).object_id for i in range(10)]
    await fill(vol, vol.root_id)
    assert (await vol.statfs()).free_blocks == 0
    refused = 0
    for oid in ids:
        try:
            await vol.setattr(oid, SetAttrs(comment="c" * 79))
        except NoSpace:
            refused += 1
            assert (await vol.getattr(oid)).comment == ""
        await vol.sync()
        assert await clean(dev, geo) == []
    assert refused  # the dircache block did overflow
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


async def _full_dircache_dir(vol: Any, parent: int, name: str) -> int:
    """A new directory whose dircache blocks are all full: files are created until a
    record needs a new block, then the last one is removed again (its block goes)."""
    d: int = (await vol.mkdir(parent, name)).object_id
    block = vol._block_for(d)
    for i in range(200):
        await vol.create(d, f"a_rather_long_file_name_{i:03}")
        if len(vol._dc_blocks(block)) == 2:
            await vol.unlink(d, f"a_rather_long_file_name_{i:03}")
            assert len(vol._dc_blocks(block)) == 1
            return d
    raise AssertionError("the dircache never grew")


async def test_dcfs_create_and_rename_when_the_dircache_block_is_full_on_a_full_volume() -> None:
    """create/rename into a DOS\\5 directory whose dircache blocks are full, on a full
    volume: the header was hooked into its hash chain before the dircache block for its
    record was looked for; NoSpace then left an entry without a record."""
    dev, geo = await fresh(DOS5, 400)
    vol = await open_volume(dev, geo, False)
    e = await vol.mkdir(vol.root_id, "e")
    for i in range(2):
        await vol.create(e.object_id, f"moving_{i}")
    d = await _full_dircache_dir(vol, vol.root_id, "d")
    before = {s.name for s in await vol.readdir(d)}
    await fill(vol, vol.root_id, leave=1)
    assert (await vol.statfs()).free_blocks == 1
    with pytest.raises(NoSpace):  # the header fits, its dircache record does not
        await vol.create(d, "one_more")
    assert {s.name for s in await vol.readdir(d)} == before
    await vol.sync()
    assert await clean(dev, geo) == []
    spacer = await vol.lookup(vol.root_id, "zz_spacer")
    await vol.write(spacer.object_id, 0, b"s")  # the last block
    assert (await vol.statfs()).free_blocks == 0
    with pytest.raises(NoSpace):
        await vol.rename(e.object_id, "moving_0", d, "moved_0")
    assert {s.name for s in await vol.readdir(e.object_id)} == {"moving_0", "moving_1"}
    await vol.sync()
    assert await clean(dev, geo) == []
    await vol.rename(e.object_id, "moving_1", e.object_id, "renamed_1")  # room in its own
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


async def test_lnfs_rename_that_moves_the_comment_to_a_block_on_a_full_volume() -> None:
    """rename on DOS\\7 to a longer name that pushes the comment out of the shared field
    into a T_COMMENT block, on a full volume: the entry had been taken out of its hash
    chain before the comment block was allocated; NoSpace then lost the file."""
    dev, geo = await fresh(DOS7, 400)
    vol = await open_volume(dev, geo, False)
    f = await vol.create(vol.root_id, "short")
    await vol.write(f.object_id, 0, b"keep me")
    await vol.setattr(f.object_id, SetAttrs(comment="k" * 70))  # 2+5+70 fits the field
    await fill(vol, vol.root_id)
    assert (await vol.statfs()).free_blocks == 0
    with pytest.raises(NoSpace):
        await vol.rename(vol.root_id, "short", vol.root_id, "n" * 60)  # 2+60+70 does not
    st = await vol.lookup(vol.root_id, "short")
    assert st.comment == "k" * 70 and await vol.read(st.object_id, 0, 100) == b"keep me"
    await vol.sync()
    assert await clean(dev, geo) == []
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


# ------------------------------------------------------------------ crash images
async def test_blocks_freed_since_the_last_write_back_are_not_reused_before_it() -> None:
    """The image as it is on the device between write-backs (a crash): deleted headers
    still hang in their hash chains on the disk until the next write-back, so their
    blocks must not take new data before it.  They did (freed at once in the bitmap):
    a big file's data landed on them, the tree on the disk had checksum errors, and the
    next mount could not validate the volume (read-only, check --repair refused)."""
    dev, geo = await fresh(0x444F5303, 3000)
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "d")
    for i in range(12):
        f = await vol.create(d.object_id, f"f{i}")
        await vol.write(f.object_id, 0, content(f"f{i}", 1000))
    await vol.sync()
    for i in range(12):
        await vol.unlink(d.object_id, f"f{i}")
    big = await vol.create(vol.root_id, "big")
    await vol.write(big.object_id, 0, content("big", 300_000))  # written through, not staged
    crash = MemoryBlockDevice(data=bytes(dev.data))  # no write-back since the deletes
    await vol.close()
    after = await open_volume(crash, geo, False)
    assert not after.read_only, after.info.notes
    assert any("validated" in n for n in after.info.notes)
    dd = await after.lookup(after.root_id, "d")
    names = sorted(s.name for s in await after.readdir(dd.object_id))
    assert names == sorted(f"f{i}" for i in range(12))  # the old state
    st = await after.lookup(dd.object_id, "f3")
    assert await after.read(st.object_id, 0, 2000) == content("f3", 1000)
    await after.close()
    assert (await ENGINE.check_volume(crash, geo, False)).errors == []
    # and what was closed is the new state
    vol = await open_volume(dev, geo, True)
    assert await vol.readdir((await vol.lookup(vol.root_id, "d")).object_id) == []
    st = await vol.lookup(vol.root_id, "big")
    assert await vol.read(st.object_id, 0, 400_000) == content("big", 300_000)
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


async def test_freed_blocks_come_back_when_the_volume_is_full() -> None:
    """The other side of the rule above: on a full volume, what a delete freed is
    usable by the next write (a write-back first), and statfs counts it at once."""
    dev, geo = await fresh(0x444F5301, 400)
    vol = await open_volume(dev, geo, False)
    g = await vol.create(vol.root_id, "gone")
    await vol.write(g.object_id, 0, bytes(20 * 512))
    await fill(vol, vol.root_id)
    await vol.unlink(vol.root_id, "gone")
    assert (await vol.statfs()).free_blocks >= 21
    h = await vol.create(vol.root_id, "new")
    await vol.write(h.object_id, 0, content("new", 20 * 488))
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


async def test_promotion_on_a_full_dcfs_volume() -> None:
    """Deleting the original name of a hard-linked DOS\\5 file on a full volume: the
    link's dircache record grows by the object's comment and may need a new dircache
    block; the original's header, freed by that same delete, is the one to take."""
    dev, geo = await fresh(DOS5, 400)
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "d")
    f = await vol.create(d.object_id, "orig")
    await vol.write(f.object_id, 0, b"linked data")
    await vol.setattr(f.object_id, SetAttrs(comment="c" * 79))
    full = await _full_dircache_dir(vol, vol.root_id, "full")
    await vol.unlink(full, "a_rather_long_file_name_000")  # room for the link's record only
    await vol.link(f.object_id, full, "the_link")
    await fill(vol, vol.root_id)
    await vol.unlink(d.object_id, "orig")
    st = await vol.lookup(full, "the_link")
    assert st.comment == "c" * 79 and await vol.read(st.object_id, 0, 100) == b"linked data"
    await vol.sync()
    assert await clean(dev, geo) == []
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


# ------------------------------------------------------------------ cancellation
async def test_rename_onto_an_existing_name_is_all_or_nothing_when_cancelled() -> None:
    """rename onto an existing name on DOS\\7, the source's comment in a T_COMMENT
    block not yet read: the destination was deleted, then the comment block was read
    (a checkpoint); cancelled there, the destination was gone and the source not
    moved.  Now, cancelled at any device request: the old state or the new one."""
    dev, geo = await fresh(DOS7, 3000)
    vol = await open_volume(dev, geo, False)
    src = await vol.create(vol.root_id, "s" * 50)
    await vol.write(src.object_id, 0, b"source")
    await vol.setattr(src.object_id, SetAttrs(comment="m" * 79))  # 2+50+79 > 112: a block
    dst = await vol.create(vol.root_id, "dst")
    await vol.write(dst.object_id, 0, b"destination")
    await vol.close()
    raw = bytes(dev.data)

    async def op(v: Any) -> None:
        await v.rename(v.root_id, "s" * 50, v.root_id, "dst")

    probe = CancellingDevice(raw)
    v = await open_volume(probe, geo, False)
    start = probe.count
    await op(v)
    total = probe.count - start
    await v.close()
    assert total >= 2
    for k in range(1, total + 1):
        cdev = CancellingDevice(raw)
        v = await open_volume(cdev, geo, False)
        with trio.CancelScope() as scope:
            cdev.scope = scope
            cdev.cancel_at = cdev.count + k
            await op(v)
        cdev.scope = None
        await v.close()
        assert (await ENGINE.check_volume(cdev, geo, False)).errors == [], k
        after = await open_volume(cdev, geo, True)
        found = {s.name: s for s in await after.readdir(after.root_id)}
        if "s" * 50 in found:  # old state
            assert await after.read(found["dst"].object_id, 0, 100) == b"destination", k
        else:  # new state
            assert await after.read(found["dst"].object_id, 0, 100) == b"source", k
            assert found["dst"].comment == "m" * 79, k
