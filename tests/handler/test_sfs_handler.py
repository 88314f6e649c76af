"""SmartFilesystem 1.83 (the real m68k handler) on SFS\\0 volumes amigafuse formatted and filled."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.handler.conftest import Handler, run_handler
from tests.handler.tree import (
    Model,
    Writer,
    build_tree,
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
    make_disk(image, "SFS", block_size=block_size, handler=sfs183.path)
    vol, _, geo = await open_rw(image)
    assert geo.fs_block_size == block_size
    model = Model()
    await build_tree(Writer(vol, model), name_limit=SFS18X_NAME_LIMIT, hard_links=False)
    await vol.close()
    await check_clean(image)
    want = expected_listing(model)

    # 1. The real handler lists every object we wrote, with our sizes, bytes and protection.
    run = run_handler(handler_python, image, sfs183.path, [["walk"]], tmp_path)
    got = comparable(run.results[0], want)
    assert got == want, f"SmartFilesystem 1.83 sees our volume differently:\n{diff(got, want)}"
    assert run.requests == [], f"the handler complained: {run.requests}"
    assert run.info is not None and run.info["bytes_per_block"] == block_size

    # 2. The handler changes our volume; our check finds it clean and our reader sees
    #    exactly the handler's change.
    new_bytes = content("from the handler", 70_000)
    ops = [
        ["mkdir", "/fromhandler"],
        ["write", "/fromhandler/new.bin", new_bytes.hex()],
        ["write", "/fromhandler/empty", ""],
        ["delete", "/many/f_0005.dat"],
        ["delete", "/sizes/size_0065537.bin"],
        ["delete", "/nested/empty_dir2"],
        ["rename", "/names/café crème", "/fromhandler/café renamed"],
        ["walk"],
    ]
    run = run_handler(handler_python, image, sfs183.path, ops, tmp_path)
    failed = [
        (op[:2], r) for op, r in zip(ops[:-1], run.results[:-1], strict=True) if not r.get("ok")
    ]
    assert not failed, f"the handler refused operations: {failed}"
    model.objects["/fromhandler"] = "DIR"
    model.objects["/fromhandler/new.bin"] = new_bytes
    model.objects["/fromhandler/empty"] = b""
    model.delete("/many/f_0005.dat")
    model.delete("/sizes/size_0065537.bin")
    model.delete("/nested/empty_dir2")
    model.rename("/names/café crème", "/fromhandler/café renamed")
    want = expected_listing(model)
    got = comparable(run.results[-1], want)
    assert got == want, f"the handler's own view after its changes:\n{diff(got, want)}"
    await check_clean(image)
    vol, _, _ = await open_rw(image, read_only=True)
    try:
        ours = await our_listing(vol)
        recycled = await vol.lookup(vol.root_id, ".recycled")
        in_recycled = sorted(st.name for st in await vol.readdir(recycled.object_id))
    finally:
        await vol.close()
    assert ours == strip_protection(want), (
        f"our reader after the handler's changes:\n{diff(ours, strip_protection(want))}"
    )
    # The handler's deletes went to .recycled, as SFS does.
    assert {"f_0005.dat", "size_0065537.bin"} <= set(in_recycled), in_recycled
