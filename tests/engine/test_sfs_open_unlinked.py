"""Open-unlinked files and object identity on SFS (issue 6 review).

A file unlinked while open moves to ``.recycled``; the FUSE layer marks it busy
(``Volume.set_busy``) and the engine's purges of ``.recycled`` skip it, so its id keeps
reading and writing it.  An object that is really deleted gives its id up for good:
when its object node is handed to a new object, that one gets another id and the old
id answers NotFound (never the new object's bytes)."""

from __future__ import annotations

import pytest

from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.errors import NoSpace, NotFound
from amigafuse.fs.api import SetAttrs
from amigafuse.fs.sfs import check_volume, codec, format_volume, open_volume
from amigafuse.fs.sfs.volume import FRESH_ID_BASE, RECYCLED_PURGE_FILES, SfsVolume
from tests.conftest import content

REC = codec.RECYCLEDNODE


async def fresh(
    bs: int = 512, dostype: int = SFS0, *, size_bytes: int = 2 << 20, recycled: bool = True
) -> tuple[MemoryBlockDevice, VolumeGeometry, SfsVolume]:
    dev = MemoryBlockDevice(size_bytes // 512, 512)
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs)
    await format_volume(dev, geo, "Open", recycled=recycled)
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol, SfsVolume)
    return dev, geo, vol


async def assert_clean(dev: MemoryBlockDevice, geo: VolumeGeometry, vol: SfsVolume) -> None:
    await vol.sync()
    rep = await check_volume(dev, geo, False)
    assert rep.clean, rep.errors
    assert not rep.warnings, rep.warnings


async def fill(vol: SfsVolume, name: str, chunk: int = 16384) -> int:
    """Write ``name`` until ENOSPC (bounded); the bytes written."""
    st = await vol.create(vol.root_id, name)
    pos = 0
    for i in range(4096):
        try:
            await vol.write(st.object_id, pos, content(f"{name}{i}", chunk))
        except NoSpace:
            return pos
        pos += chunk
    raise AssertionError("the volume never filled up")


@pytest.mark.parametrize(("bs", "dostype"), [(512, SFS0), (1024, SFS2), (4096, SFS0)])
async def test_a_busy_unlinked_file_survives_purges_and_a_full_volume(bs: int, dostype: int) -> None:
    dev, geo, vol = await fresh(bs, dostype)
    st = await vol.create(vol.root_id, "open.bin")
    oid = st.object_id
    vol.set_busy(oid, True)
    body = content("open", 3 * bs + 17)
    await vol.write(oid, 0, body)
    await vol.unlink(vol.root_id, "open.bin")
    assert (await vol.lookup(REC, "open.bin")).object_id == oid
    # 40 more deleted files: the purges (beyond 35 in .recycled) start with the oldest,
    # which is the open one, and must pass it by.
    for i in range(RECYCLED_PURGE_FILES + 5):
        other = await vol.create(vol.root_id, f"gone{i}")
        await vol.write(other.object_id, 0, content(f"gone{i}", 100 + i))
        await vol.unlink(vol.root_id, f"gone{i}")
    held = {s.name for s in await vol.readdir(REC)}
    assert "open.bin" in held
    assert len(held) <= RECYCLED_PURGE_FILES + 1
    # Fill the volume: every other file in .recycled is purged for room, not this one.
    await fill(vol, "filler")
    assert {s.name for s in await vol.readdir(REC)} == {"open.bin"}
    assert await vol.read(oid, 0, len(body) + 10) == body
    # Still writable through its id (the filler gives room back first).
    await vol.unlink(vol.root_id, "filler")
    await vol.unlink(REC, "filler")
    more = content("more", 2 * bs)
    await vol.write(oid, len(body), more)
    assert await vol.read(oid, 0, 10 * bs) == body + more
    await assert_clean(dev, geo, vol)
    # Released: it stays in .recycled, as AmigaOS leaves it.
    vol.set_busy(oid, False)
    assert (await vol.getattr(oid)).size == len(body + more)
    await assert_clean(dev, geo, vol)
    await vol.close()


async def test_only_busy_files_left_in_recycled_gives_enospc_until_released() -> None:
    dev, geo, vol = await fresh(size_bytes=1 << 20)
    ids = []
    for i in range(3):
        st = await vol.create(vol.root_id, f"big{i}")
        await vol.write(st.object_id, 0, content(f"big{i}", 100_000))
        vol.set_busy(st.object_id, True)
        await vol.unlink(vol.root_id, f"big{i}")
        ids.append(st.object_id)
    written = await fill(vol, "filler", 4096)
    assert written > 0
    with pytest.raises(NoSpace):
        await vol.write((await vol.lookup(vol.root_id, "filler")).object_id, written, bytes(200_000))
    await assert_clean(dev, geo, vol)  # the refused write left nothing half done
    for i, oid in enumerate(ids):
        assert await vol.read(oid, 0, 200_000) == content(f"big{i}", 100_000)
    vol.set_busy(ids[0], False)
    # Now the oldest released file may go: the same write finds room.
    await vol.write((await vol.lookup(vol.root_id, "filler")).object_id, written, bytes(90_000))
    with pytest.raises(NotFound):
        await vol.getattr(ids[0])
    for i, oid in enumerate(ids[1:], 1):
        assert await vol.read(oid, 0, 200_000) == content(f"big{i}", 100_000)
    await assert_clean(dev, geo, vol)
    await vol.close()


async def _old_id_is_dead(vol: SfsVolume, old: int) -> None:
    for call in (
        vol.getattr(old),
        vol.read(old, 0, 10),
        vol.write(old, 0, b"x"),
        vol.truncate(old, 0),
        vol.setattr(old, SetAttrs(comment="x")),
        vol.readdir(old),
        vol.lookup(old, "x"),
        vol.create(old, "x"),
        vol.unlink(old, "x"),
    ):
        with pytest.raises(NotFound):
            await call


@pytest.mark.parametrize("recycled", [True, False])
async def test_a_deleted_object_s_id_never_names_the_object_on_its_reused_node(recycled: bool) -> None:
    dev, geo, vol = await fresh(recycled=recycled)
    st = await vol.create(vol.root_id, "victim")
    old = st.object_id
    vol.set_busy(old, True)  # open: still deleted at once where there is no .recycled
    await vol.write(old, 0, b"secret" * 100)
    await vol.unlink(vol.root_id, "victim")
    if recycled:
        await vol.unlink(REC, "victim")  # deleted for good from .recycled
    new = await vol.create(vol.root_id, "newcomer")
    await vol.write(new.object_id, 0, b"newcomer data")
    # The handler's allocator hands the freed node to the next object...
    node = (await vol.r.object_node(old)).data
    assert node != 0
    assert (await vol.r.locate(old)).obj.name == b"newcomer"
    # ...which gets another id; the old one is dead, for queries and mutations alike.
    assert new.object_id >= FRESH_ID_BASE
    await _old_id_is_dead(vol, old)
    assert await vol.read(new.object_id, 0, 100) == b"newcomer data"
    assert (await vol.lookup(vol.root_id, "newcomer")).object_id == new.object_id
    assert [s.object_id for s in await vol.readdir(vol.root_id) if s.name == "newcomer"] == [new.object_id]
    await assert_clean(dev, geo, vol)
    # Deleted again and reused again: a third id; both earlier ones are dead.
    await vol.unlink(vol.root_id, "newcomer")
    if recycled:
        await vol.unlink(REC, "newcomer")
    third = await vol.mkdir(vol.root_id, "dir")
    assert third.object_id not in (old, new.object_id)
    await _old_id_is_dead(vol, old)
    await _old_id_is_dead(vol, new.object_id)
    inner = await vol.create(third.object_id, "inner")
    await vol.rename(third.object_id, "inner", vol.root_id, "moved")
    assert (await vol.lookup(vol.root_id, "moved")).object_id == inner.object_id
    await assert_clean(dev, geo, vol)
    await vol.close()
    # A new session starts over: ids are node numbers again.
    vol2 = await open_volume(dev, geo, False)
    assert (await vol2.lookup(vol2.root_id, "dir")).object_id == old
    await vol2.close()


async def test_a_removed_directory_s_id_is_dead_after_its_node_is_reused() -> None:
    """A stale directory inode (a shell's cwd after rmdir) must not create in, list or
    look up in the directory that got its node."""
    dev, geo, vol = await fresh()
    d = await vol.mkdir(vol.root_id, "cwd")
    await vol.rmdir(vol.root_id, "cwd")
    other = await vol.mkdir(vol.root_id, "other")
    await vol.create(other.object_id, "child")
    assert other.object_id != d.object_id
    await _old_id_is_dead(vol, d.object_id)
    assert [s.name for s in await vol.readdir(other.object_id)] == ["child"]
    await assert_clean(dev, geo, vol)
    await vol.close()


async def test_purged_files_ids_are_dead_and_the_busy_one_is_not() -> None:
    dev, geo, vol = await fresh()
    ids = []
    for i in range(RECYCLED_PURGE_FILES + 3):
        st = await vol.create(vol.root_id, f"f{i}")
        await vol.write(st.object_id, 0, content(f"f{i}", 50))
        ids.append(st.object_id)
        if i == 0:
            vol.set_busy(st.object_id, True)
        await vol.unlink(vol.root_id, f"f{i}")
    held = {s.object_id for s in await vol.readdir(REC)}
    purged = [oid for oid in ids if oid not in held]
    assert purged and ids[0] in held
    # New objects take the purged nodes; none of them may answer to a purged id.
    news = [await vol.create(vol.root_id, f"n{i}") for i in range(len(purged))]
    for st in news:
        assert st.object_id not in ids
    for oid in purged:
        with pytest.raises(NotFound):
            await vol.read(oid, 0, 10)
    assert await vol.read(ids[0], 0, 100) == content("f0", 50)
    await assert_clean(dev, geo, vol)
    await vol.close()
