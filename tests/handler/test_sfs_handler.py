"""SmartFilesystem 1.83 (the real m68k handler) on SFS\\0 volumes amigafuse formatted and filled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from amigafuse.errors import NotFound
from amigafuse.fs.sfs import codec, format_volume
from tests.engine.test_sfs_support import first_partition
from tests.handler.conftest import Handler, run_handler
from tests.handler.scenarios import write_read_change
from tests.handler.tree import (
    Model,
    Writer,
    check_clean,
    comparable,
    content,
    diff,
    expected_listing,
    make_disk,
    open_rw,
    our_listing,
    strip_protection,
)

SFS18X_NAME_LIMIT = 100  # SmartFilesystem 1.8x refuses longer names (1.277 takes 107)


@pytest.mark.parametrize("block_size", [512, 1024])
async def test_sfs183_reads_and_writes_our_volume(
    block_size: int, handler_python: Path, sfs183: Handler, tmp_path: Path
) -> None:
    image = tmp_path / f"sfs0_bs{block_size}.hdf"
    facts = await write_read_change(
        handler_python, sfs183, image, "SFS", block_size=block_size,
        name_limit=SFS18X_NAME_LIMIT, hard_links=False, tmp=tmp_path,
    )  # fmt: skip
    # The handler's deletes went to .recycled, as SFS does, and our reader finds them there.
    assert {"f_0005.dat", "size_0065537.bin"} <= set(facts["recycled"]), facts["recycled"]


async def test_sfs183_reads_our_grown_trees(
    handler_python: Path, sfs183: Handler, tmp_path: Path
) -> None:
    """Enough objects to grow the object-node tree and fill many object containers, and
    two files appended in turns (one extent per piece) to split the extent B-tree."""
    image = tmp_path / "sfs0_trees.hdf"
    make_disk(image, "SFS", block_size=512, handler=sfs183.path)
    vol, _, _ = await open_rw(image)
    model = Model()
    w = Writer(vol, model)
    for d in range(8):
        await w.mkdir(f"/dir{d}")
        for i in range(200):
            await w.write_file(
                f"/dir{d}/object_{i:04d}_with_a_longer_name.txt", content(f"{d}/{i}", i % 700)
            )
    await w.write_file("/fragmented_a", b"")
    await w.write_file("/fragmented_b", b"")
    a, b = await w.resolve("/fragmented_a"), await w.resolve("/fragmented_b")
    data_a, data_b = content("frag a", 600 * 512), content("frag b", 600 * 512)
    for piece in range(600):
        at = piece * 512
        await vol.write(a.object_id, at, data_a[at : at + 512])
        await vol.write(b.object_id, at, data_b[at : at + 512])
    model.objects["/fragmented_a"], model.objects["/fragmented_b"] = data_a, data_b
    for d in range(0, 8, 2):
        for i in range(0, 200, 3):
            await w.unlink(f"/dir{d}/object_{i:04d}_with_a_longer_name.txt")
    await vol.close()
    await check_clean(image)
    # The premise: both trees have an index level now.
    dev, _ = first_partition(image)
    root = codec.RootBlock.unpack(await dev.read(0, 1))
    node_root = codec.NodeContainer.unpack(await dev.read(root.objectnoderoot, 1))
    extent_root = codec.BNodeContainer.unpack(await dev.read(root.extentbnoderoot, 1))
    assert node_root.nodes != 1, "the object-node tree did not grow past one leaf"
    assert not extent_root.isleaf, "the extent B-tree did not split"
    want = expected_listing(model)
    run = run_handler(handler_python, image, sfs183.path, [["walk"]], tmp_path)
    got = comparable(run.results[0], want)
    assert got == want, f"SmartFilesystem 1.83 on our grown trees:\n{diff(got, want)}"
    assert run.requests == [], run.requests


async def test_sfs183_on_our_case_sensitive_volume_without_recycled(
    handler_python: Path, sfs183: Handler, tmp_path: Path
) -> None:
    """Root bits case-sensitive and no .recycled (as `sfs0_v1277_cs_norec`): names that
    differ only in case are distinct objects, and the handler's deletes really delete."""
    image = tmp_path / "sfs0_cs_norec.hdf"
    make_disk(image, "SFS", handler=sfs183.path, formatted=False)
    dev, geo = first_partition(image, read_only=False)
    await format_volume(dev, geo, "CaseSens", case_sensitive=True, recycled=False)
    vol, _, _ = await open_rw(image)
    assert vol.info.case_sensitive
    model = Model()
    w = Writer(vol, model)
    await w.mkdir("/case")
    for name in ("readme", "README", "ReadMe", "rEADME"):
        await w.write_file(f"/case/{name}", content(name, 100 + len(name)))
    await w.mkdir("/case/Dir")
    await w.mkdir("/case/dir")
    await w.write_file("/case/dir/x", b"lower")
    await w.write_file("/case/Dir/x", b"upper")
    await w.unlink("/case/ReadMe")
    await vol.close()
    await check_clean(image)
    ops: list[list[Any]] = [
        ["walk"],
        ["delete", "/case/README"],
        ["write", "/case/Readme", "cafe"],
        ["walk"],
    ]
    run = run_handler(handler_python, image, sfs183.path, ops, tmp_path)
    want = expected_listing(model)
    got = comparable(run.results[0], want)
    assert got == want, f"SmartFilesystem 1.83 on our case-sensitive volume:\n{diff(got, want)}"
    assert [r.get("ok") for r in run.results[1:3]] == [True, True], run.results[1:3]
    model.delete("/case/README")
    model.objects["/case/Readme"] = b"\xca\xfe"
    want = expected_listing(model)
    got = comparable(run.results[3], want)
    assert got == want, f"after the handler's changes:\n{diff(got, want)}"
    await check_clean(image)
    vol, _, _ = await open_rw(image, read_only=True)
    try:
        ours = await our_listing(vol)
        names = [st.name for st in await vol.readdir(vol.root_id)]
        with pytest.raises(NotFound):
            await vol.lookup(vol.root_id, ".recycled")
    finally:
        await vol.close()
    assert ours == strip_protection(want), diff(ours, strip_protection(want))
    assert names == ["case"], names
