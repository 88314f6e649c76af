"""The FFS engine against disks written by the real FastFileSystem 40.1 and 47.4."""

from __future__ import annotations

import json

import pytest

from amigafuse.fs.api import Kind
from amigafuse.fs.ffs import ENGINE, open_volume
from tests.conftest import HANDLER, shared_image
from tests.engine.test_ffs_common import compare_manifest, partition_device, rdb_partitions

IMAGES = ["ffs_dos3_v40", "ffs_dos5_v40", "ffs_dos5_v47", "ofs_dos0_v40", "ffs_dos7_v47"]


def manifest(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((HANDLER / f"{name}.manifest.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", IMAGES)
async def test_manifest_exact(name: str) -> None:
    path = shared_image(f"handler/{name}.hdf.gz")
    (part,) = rdb_partitions(path)
    assert (part.first_sector, part.sectors) == (256, 130816)
    m = manifest(name)
    assert part.geometry.dostype == int(m["dostype"], 16)
    vol = await open_volume(partition_device(path, part, read_only=True), part.geometry, True)
    assert vol.info.label == m["volume"]
    assert vol.info.dostype == int(m["dostype"], 16)
    assert await compare_manifest(vol, m) == []
    root = await vol.getattr(vol.root_id)
    assert [root.date.days, root.date.minutes, root.date.ticks] == m["root_fib"]["date"]
    st = await vol.statfs()
    assert st.total_blocks == m["disk_info"]["num_blocks"]
    assert st.total_blocks - st.free_blocks == m["disk_info"]["num_blocks_used"]
    await vol.close()


async def test_lookup_is_case_insensitive_intl() -> None:
    path = shared_image("handler/ffs_dos3_v40.hdf.gz")
    (part,) = rdb_partitions(path)
    vol = await open_volume(partition_device(path, part, read_only=True), part.geometry, True)
    names = await vol.lookup(vol.root_id, "NAMES")
    assert names.kind == Kind.DIR and names.name == "names"
    listing = {s.name for s in await vol.readdir(names.object_id)}
    accented = next(n for n in listing if "ø" in n or "æ" in n or "å" in n)
    # upper case as INTL has it: ß and ÿ have no Latin-1 capital and stay as they are
    shouted = "".join(c if c in "ßÿ" else c.upper() for c in accented)
    assert shouted != accented
    st = await vol.lookup(names.object_id, shouted)
    assert st.name == accented
    link = await vol.lookup(vol.root_id, "links")
    hard = await vol.lookup(link.object_id, "hard_to_size_513")
    sizes = await vol.lookup(vol.root_id, "sizes")
    target = await vol.lookup(sizes.object_id, "size_0000513.bin")
    assert hard.object_id == target.object_id and hard.nlink == target.nlink == 2
    soft = await vol.lookup(link.object_id, "to_size_512")
    assert soft.kind == Kind.SOFTLINK
    assert await vol.readlink(soft.object_id) == "sizes/size_0000512.bin"


@pytest.mark.parametrize("name", ["ffs_dos3_v40", "ffs_dos5_v40", "ofs_dos0_v40", "ffs_dos7_v47", "ffs_dos5_v47"])
async def test_handler_images_check_clean(name: str) -> None:
    path = shared_image(f"handler/{name}.hdf.gz")
    (part,) = rdb_partitions(path)
    report = await ENGINE.check_volume(partition_device(path, part, read_only=True), part.geometry, False)
    assert report.errors == []
    assert report.stats["files"] >= 369
