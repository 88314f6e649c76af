"""format_volume against the layout of the real handler's images, and check_volume."""

from __future__ import annotations

import pytest

from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.errors import UsageError
from amigafuse.fs.sfs import ENGINE, check_volume, codec, format_volume, open_volume
from tests.conftest import shared_image
from tests.engine.test_sfs_support import first_partition


async def test_empty_volume_matches_handler_layout() -> None:
    for name, dostype, bs in (("sfs0_v1277", SFS0, 512), ("sfs2_v1277", SFS2, 512), ("sfs0_v1277_bs1024", SFS0, 1024)):
        path = shared_image(f"handler/{name}.hdf.gz")
        _, geo = first_partition(path)
        raw = path.read_bytes()[256 * 512 :]
        mine = MemoryBlockDevice(130816, 512)
        await format_volume(mine, geo, "X")
        sfs2 = dostype == SFS2

        def theirs(n: int, raw: bytes = raw, bs: int = bs) -> bytes:
            return raw[n * bs : (n + 1) * bs]

        def ours(n: int, mine: MemoryBlockDevice = mine, bs: int = bs) -> bytes:
            return bytes(mine.data[n * bs : (n + 1) * bs])

        total = 130816 * 512 // bs
        for n in (0, total - 1):
            a, b = codec.RootBlock.unpack(theirs(n)), codec.RootBlock.unpack(ours(n))
            for f in ("id", "ownblock", "version", "sequencenumber", "firstbyteh", "firstbyte", "lastbyteh",
                      "lastbyte", "totalblocks", "blocksize", "bitmapbase", "adminspacecontainer",
                      "rootobjectcontainer", "extentbnoderoot", "objectnoderoot", "bits"):  # fmt: skip
                assert getattr(a, f) == getattr(b, f), (name, n, f)
        # The same block types at the same places (blocks 0..8, the bitmap).
        per = codec.blocks_per_bitmap(bs)
        nbitmap = (total + per - 1) // per
        for n in [*range(0, 9), *range(34, 34 + nbitmap)]:
            assert theirs(n)[:4] == ours(n)[:4], (name, n)
            if n != 1:  # block 1 is reserved and zero in both
                assert codec.checksum_ok(ours(n), sfs2)
        # ADMC header bits, TROK exactly, bitmap words past the handler's allocations.
        assert ours(2)[:24][12:] == theirs(2)[:24][12:]
        assert ours(5) == theirs(5)
        # Reserved nodes 3..6 and the recycled node.
        leaf_t = codec.NodeContainer.unpack(theirs(7))
        while leaf_t.nodes != 1:
            leaf_t = codec.NodeContainer.unpack(theirs(leaf_t.node[0] >> codec.node_shift(bs, sfs2)))
        leaf_o = codec.NodeContainer.unpack(ours(7))
        assert leaf_o.objectnodes[1].hash16 == leaf_t.objectnodes[1].hash16
        assert [n.data for n in leaf_o.objectnodes[2:6]] == [n.data for n in leaf_t.objectnodes[2:6]]
        # The empty B-tree root uses the handler's node size.
        assert codec.BNodeContainer.unpack(ours(6)).nodesize == (16 if sfs2 else 14)
        # .recycled object as the handler writes it (bits, protection).
        rec_t = codec.ObjectContainer.unpack(theirs(8), sfs2).objects[0]
        rec_o = codec.ObjectContainer.unpack(ours(8), sfs2).objects[0]
        assert (rec_o.name, rec_o.bits, rec_o.protection, rec_o.objectnode) == (
            rec_t.name, rec_t.bits, rec_t.protection, rec_t.objectnode)  # fmt: skip
        # Blocks the handler marks used at format are used in ours too (last bitmap word).
        rep = await check_volume(mine, geo, False)
        assert rep.clean, rep.errors


@pytest.mark.parametrize("dostype", [SFS0, SFS2])
@pytest.mark.parametrize("bs", [512, 1024, 4096, 32768])
async def test_format_open_check(dostype: int, bs: int) -> None:
    dev = MemoryBlockDevice((8 << 20) // 512, 512)
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs)
    await format_volume(dev, geo, "Empty")
    vol = await open_volume(dev, geo, False)
    assert vol.info.label == "Empty"
    assert vol.info.dostype == dostype
    assert [s.name for s in await vol.readdir(vol.root_id)] == []
    assert (await vol.lookup(vol.root_id, ".recycled")).object_id == 2
    fs = await vol.statfs()
    assert fs.block_size == bs and fs.total_blocks == (8 << 20) // bs
    # Fill enough to grow every tree: many objects, many extents.
    d = await vol.mkdir(vol.root_id, "d")
    files = []
    for i in range(150):
        st = await vol.create(d.object_id, f"n{i:03d}")
        files.append(st.object_id)
    for rnd in range(3):
        for i, oid in enumerate(files[:60]):
            await vol.write(oid, rnd * bs, bytes([i]) * bs)
    await vol.close()
    rep = await check_volume(dev, geo, False)
    assert rep.clean, rep.errors
    assert not rep.warnings, rep.warnings
    vol = await open_volume(dev, geo, True)
    for i, oid in enumerate(files[:60]):
        assert await vol.read(oid, 0, 4 * bs) == bytes([i]) * (3 * bs)
    assert rep.stats["free_blocks"] == (await vol.statfs()).free_blocks


async def test_format_refuses_bad_input() -> None:
    dev = MemoryBlockDevice(48, 512)
    with pytest.raises(UsageError):
        await format_volume(dev, VolumeGeometry(dostype=SFS0), "tiny")
    with pytest.raises(UsageError):
        await format_volume(MemoryBlockDevice(4096, 512), VolumeGeometry(dostype=0x444F5303), "ffs")
    assert ENGINE.format_volume is format_volume


async def test_check_finds_and_repairs_bitmap_damage() -> None:
    dev = MemoryBlockDevice(4096, 512)
    geo = VolumeGeometry(dostype=SFS0)
    await format_volume(dev, geo, "Vol")
    vol = await open_volume(dev, geo, False)
    st = await vol.create(vol.root_id, "f")
    await vol.write(st.object_id, 0, b"x" * 5000)
    await vol.close()
    assert (await check_volume(dev, geo, False)).clean
    # Mark the file's first data block free in the bitmap (block 34 holds bits 0..3999).
    loc = codec.ObjectContainer.unpack(bytes(dev.data[8 * 512 : 9 * 512]), False)
    first = next(o for o in loc.objects if o.name == b"f").data
    blk = bytearray(dev.data[34 * 512 : 35 * 512])
    blk[12 + first // 8] |= 0x80 >> (first % 8)
    codec.set_checksum(blk)
    dev.data[34 * 512 : 35 * 512] = blk
    rep = await check_volume(dev, geo, False)
    assert not rep.clean and any("marked free" in e for e in rep.errors)
    rep = await check_volume(dev, geo, True)
    assert rep.repaired and rep.clean
    assert (await check_volume(dev, geo, False)).clean


@pytest.mark.parametrize("name", ["sfs0_v1277", "sfs2_v1277", "sfs0_v1277_bs1024", "sfs0_v183", "sfs0_v1277_cs_norec"])
async def test_handler_images_check_clean(name: str) -> None:
    dev, geo = first_partition(shared_image(f"handler/{name}.hdf.gz"))
    rep = await check_volume(dev, geo, False)
    assert rep.clean, rep.errors
    assert rep.stats["files"] > 370
