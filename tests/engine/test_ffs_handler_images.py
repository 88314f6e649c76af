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


async def test_our_dircache_records_are_byte_identical_to_the_handlers() -> None:
    """Every dircache block FFS 40.1/47.4 wrote re-encodes to the same bytes, and the
    record we would write for each header equals the handler's (bar the known quirk)."""
    from amigafuse.fs.ffs.layout import DirCacheBlock
    from amigafuse.fs.ffs.volume import dircache_record

    for name in ("ffs_dos5_v40", "ffs_dos5_v47"):
        path = shared_image(f"handler/{name}.hdf.gz")
        (part,) = rdb_partitions(path)
        vol = await open_volume(partition_device(path, part, read_only=True), part.geometry, True)
        dirs = [vol.root_block]
        blocks = 0
        stale = []
        while dirs:
            d = dirs.pop()
            entries = {b: e for b, e in await vol._entries(d)}
            for b, e in entries.items():
                if e.sec_type == 2:
                    dirs.append(b)
            for blk, dc in await vol._dircache_chain(d):
                raw = await vol.io.read(blk)
                records = dc.decode_records()
                again = DirCacheBlock.build(512, blk, dc.parent, dc.next_dirc, records).packed_with_checksum()
                assert again == raw, (name, blk)
                blocks += 1
                for r in records:
                    e = entries[r.header]
                    if dircache_record(r.header, e, await vol._comment(r.header, e)) != r:
                        stale.append(e.name)
        assert blocks > 19
        assert stale == [b"truncated.bin"]  # FFS keeps the pre-truncate size (docs/ffs.md)


@pytest.mark.parametrize("name", IMAGES)
async def test_writing_on_handler_images_keeps_them_clean(name: str, image_copy) -> None:  # type: ignore[no-untyped-def]
    path = image_copy(f"handler/{name}.hdf.gz")
    (part,) = rdb_partitions(path)
    m = manifest(name)
    vol = await open_volume(partition_device(path, part), part.geometry, False)
    many = await vol.lookup(vol.root_id, "many")
    listing = await vol.readdir(many.object_id)
    for st in listing[:40]:
        await vol.unlink(many.object_id, st.name)
    new = await vol.mkdir(vol.root_id, "ours")
    for i in range(30):
        f = await vol.create(new.object_id, f"new file {i}")
        await vol.write(f.object_id, 0, bytes([i]) * (i * 997))
    sizes = await vol.lookup(vol.root_id, "sizes")
    await vol.rename(sizes.object_id, "size_0000513.bin", new.object_id, "moved_513.bin")
    links = await vol.lookup(vol.root_id, "links")
    await vol.unlink(links.object_id, "hard_to_100000")
    await vol.close()
    report = await ENGINE.check_volume(partition_device(path, part), part.geometry, False)
    assert report.errors == []
    gone = {f"/many/{s.name}" for s in listing[:40]} | {"/sizes/size_0000513.bin", "/links/hard_to_100000"}
    kept = {**m, "entries": [e for e in m["entries"] if e["path"] not in gone and not e["path"].startswith("/links/hard_to_size_513")]}
    vol = await open_volume(partition_device(path, part, read_only=True), part.geometry, True)
    problems = await compare_manifest(vol, kept)
    extra = {p.split(": ")[0] for p in problems if p.endswith("not in the manifest")}
    touched_dirs = ("/links: date", "/many: date", "/sizes: date")  # changed, so re-dated
    assert [p for p in problems if not p.endswith("not in the manifest") and not p.startswith(touched_dirs)] == []
    assert "/ours/moved_513.bin" in extra and "/links/hard_to_size_513" in extra
    moved = await vol.lookup((await vol.lookup(vol.root_id, "ours")).object_id, "moved_513.bin")
    hard = await vol.lookup(links.object_id, "hard_to_size_513")
    assert moved.object_id == hard.object_id and moved.nlink == 2
