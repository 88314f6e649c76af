"""The SFS reader against images written by the real SmartFilesystem handlers."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from amigafuse.amiga.dates import DateStamp
from amigafuse.errors import CorruptError, NotFound
from amigafuse.fs.api import Kind, Stat, Volume
from amigafuse.fs.sfs import ENGINE, open_volume
from tests.conftest import shared_image
from tests.engine.test_sfs_support import first_partition, load_manifest, walk

IMAGES = ["sfs0_v1277", "sfs0_v1277_bs1024", "sfs0_v1277_cs_norec", "sfs0_v183", "sfs2_v1277"]
KINDS = {"file": Kind.FILE, "dir": Kind.DIR, "softlink": Kind.SOFTLINK}


async def check_entry(vol: Volume, st: Stat, want: dict[str, Any]) -> None:
    assert st.kind is KINDS[want["type"]], want["path"]
    assert st.protection == want["protection"], want["path"]
    assert st.date == DateStamp(*want["date"]), want["path"]
    assert st.comment == want["comment"], want["path"]
    if st.kind is Kind.FILE:
        assert st.size == want["size"], want["path"]
        data = await vol.read(st.object_id, 0, st.size + 100)
        assert hashlib.md5(data).hexdigest() == want["md5"], want["path"]
    if st.kind is Kind.SOFTLINK:
        assert st.link_target == want["link_target"]
        assert await vol.readlink(st.object_id) == want["link_target"]


@pytest.mark.parametrize("name", IMAGES)
async def test_manifest_reproduced_exactly(name: str) -> None:
    manifest = load_manifest(name)
    dev, geo = first_partition(shared_image(f"handler/{name}.hdf.gz"))
    assert geo.dostype in ENGINE.dostypes
    vol = await open_volume(dev, geo, True)
    try:
        assert vol.info.label == manifest["volume"]
        assert vol.info.case_sensitive == manifest["profile"]["casesensitive"]
        found: dict[str, Stat] = {}
        await walk(vol, vol.root_id, "", found)
        want = {e["path"]: e for e in manifest["entries"]}
        assert sorted(found) == sorted(want)
        for path, entry in want.items():
            await check_entry(vol, found[path], entry)
        # .recycled: hidden from readdir, reachable by name (when the volume has one).
        recycled = manifest.get("recycled")
        if recycled:
            rec = await vol.lookup(vol.root_id, ".recycled")
            assert rec.kind is Kind.DIR
            inside = {f"/.recycled/{s.name}": s for s in await vol.readdir(rec.object_id)}
            assert sorted(inside) == sorted(e["path"] for e in recycled)
            for e in recycled:
                await check_entry(vol, inside[e["path"]], e)
        else:
            with pytest.raises(NotFound):
                await vol.lookup(vol.root_id, ".recycled")
        # Name lookups go through the hash tables: every path resolves.
        for path, st in found.items():
            parts = path.strip("/").split("/")
            cur = vol.root_id
            for part in parts:
                cur = (await vol.lookup(cur, part)).object_id
            assert cur == st.object_id
        fs = await vol.statfs()
        assert 0 < fs.free_blocks < fs.total_blocks
    finally:
        await vol.close()


async def test_case_rules() -> None:
    dev, geo = first_partition(shared_image("handler/sfs0_v1277.hdf.gz"))
    vol = await open_volume(dev, geo, True)
    many = await vol.lookup(vol.root_id, "MANY")
    a = await vol.lookup(many.object_id, "f_mixed_case_0010.dat")
    assert a.name == "F_Mixed_Case_0010.DAT"
    dev, geo = first_partition(shared_image("handler/sfs0_v1277_cs_norec.hdf.gz"))
    vol = await open_volume(dev, geo, True)
    with pytest.raises(NotFound):
        await vol.lookup(vol.root_id, "MANY")


async def test_show_recycled_option() -> None:
    dev, geo = first_partition(shared_image("handler/sfs0_v1277.hdf.gz"))
    vol = await open_volume(dev, geo, True, show_recycled=True)
    names = [s.name for s in await vol.readdir(vol.root_id)]
    assert ".recycled" in names


async def test_contiguous_file_is_read_in_one_request() -> None:
    from amigafuse.amiga.dostype import SFS0
    from amigafuse.amiga.geometry import VolumeGeometry
    from amigafuse.blockdev import MemoryBlockDevice
    from amigafuse.fs.sfs import format_volume

    dev = MemoryBlockDevice((16 << 20) // 512, 512)
    geo = VolumeGeometry(dostype=SFS0)
    await format_volume(dev, geo, "One")
    vol = await open_volume(dev, geo, False)
    st = await vol.create(vol.root_id, "big")
    payload = bytes(range(256)) * 4096 * 8  # 8 MiB: one extent of 16384 blocks
    await vol.write(st.object_id, 0, payload)
    await vol.close()
    vol = await open_volume(dev, geo, True)
    await vol.read(st.object_id, 0, 1)  # metadata now cached
    before = dev.reads
    assert await vol.read(st.object_id, 0, len(payload)) == payload
    assert dev.reads - before == 1
    before = dev.reads
    assert await vol.read(st.object_id, 1000, 3_000_000) == payload[1000:3_001_000]
    assert dev.reads - before == 1


async def test_partition_larger_than_the_filesystem() -> None:
    """The second root sits at the filesystem's last block, not the partition's."""
    from amigafuse.amiga.dostype import SFS0
    from amigafuse.amiga.geometry import VolumeGeometry
    from amigafuse.blockdev import MemoryBlockDevice
    from amigafuse.fs.sfs import format_volume

    dev = MemoryBlockDevice(4096, 512)
    geo = VolumeGeometry(dostype=SFS0)
    await format_volume(dev, geo, "Grown")
    bigger = MemoryBlockDevice(data=bytes(dev.data) + bytes(512 * 1000))
    vol = await open_volume(bigger, geo, True)
    assert not vol.info.notes
    bigger.data[0:512] = bytes(512)  # first root gone: the end of the partition has none
    with pytest.raises(CorruptError):
        await open_volume(bigger, geo, True)
