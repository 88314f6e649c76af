"""The scenario every handler runs: we write a volume, the handler reads it, the handler
changes it, we check and read it (shared by the SFS and FFS tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


async def write_read_change(
    handler_python: Path, handler: Handler, image: Path, dostype_name: str, *, block_size: int,
    name_limit: int, hard_links: bool, tmp: Path, handler_truncates: bool = True,
    info_bytes_per_block: int | None = None,
) -> Any:  # fmt: skip
    """Make ``image`` (mkdisk: RDB + ``dostype_name`` filesystem, both by amigafuse), fill
    it with build_tree, let ``handler`` read it and change it, and check it with ours.

    ``handler_truncates=False`` leaves out the handler's SetFileSize (FastFileSystem on
    DOS\\4/5 keeps the old size in the dircache record after it: shared/images/handler
    README).  ``info_bytes_per_block``: what the handler's Info reports as bytes per block
    (default ``block_size``; OFS reports its data bytes, ``block_size - 24``).  Fails with a diff at the first disagreement.  Returns what the caller may check
    further: ``{"recycled": names in SFS's .recycled after the handler's deletes, or None}``."""
    make_disk(image, dostype_name, block_size=block_size, handler=handler.path)
    vol, _, geo = await open_rw(image)
    assert geo.fs_block_size == block_size
    model = Model()
    await build_tree(Writer(vol, model), name_limit=name_limit, hard_links=hard_links)
    await vol.close()
    await check_clean(image)
    want = expected_listing(model)

    # 1. The real handler lists every object we wrote: names, types, sizes, bytes (MD5),
    #    and the protection bits, comments and dates we set.
    run = run_handler(handler_python, image, handler.path, [["walk"]], tmp)
    got = comparable(run.results[0], want)
    assert got == want, f"{handler.version} sees our volume differently:\n{diff(got, want)}"
    assert run.requests == [], f"the handler complained: {run.requests}"
    assert run.info is not None and run.info["bytes_per_block"] == (
        info_bytes_per_block or block_size
    ), run.info

    # 2. The handler changes our volume; our check finds it clean and our reader sees
    #    exactly the handler's change.
    new_bytes = content("from the handler", 70_000)
    patch = b"patched by the handler " * 50
    ops: list[list[Any]] = [
        ["mkdir", "/fromhandler"],
        ["write", "/fromhandler/new.bin", new_bytes.hex()],
        ["write", "/fromhandler/empty", ""],
        ["delete", "/many/f_0005.dat"],
        ["delete", "/sizes/size_0065537.bin"],
        ["delete", "/nested/empty_dir2"],
        ["rename", "/names/café crème", "/fromhandler/café renamed"],
        ["overwrite", "/sizes/size_0100000.bin", 40_000, patch.hex()],
        ["overwrite", "/sizes/size_0000513.bin", 513, patch.hex()],
        ["truncate", "/sizes/size_0300001.bin", 123_456],
        ["walk"],
    ]
    if not handler_truncates:
        del ops[-2]
    run = run_handler(handler_python, image, handler.path, ops, tmp)
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
    for path, offset in (("/sizes/size_0100000.bin", 40_000), ("/sizes/size_0000513.bin", 513)):
        old = bytearray(model.objects[path])
        old[offset : offset + len(patch)] = patch
        model.set_file(path, bytes(old))
    if handler_truncates:
        model.set_file("/sizes/size_0300001.bin", model.objects["/sizes/size_0300001.bin"][:123_456])
    want = expected_listing(model)
    got = comparable(run.results[-1], want)
    assert got == want, f"the handler's own view after its changes:\n{diff(got, want)}"
    await check_clean(image)
    vol, _, _ = await open_rw(image, read_only=True)
    try:
        ours = await our_listing(vol)
        recycled: list[str] | None = None
        if dostype_name.startswith("SFS"):
            rec = await vol.lookup(vol.root_id, ".recycled")
            recycled = sorted(st.name for st in await vol.readdir(rec.object_id))
    finally:
        await vol.close()
    assert ours == strip_protection(want), (
        f"our reader after the handler's changes:\n{diff(ours, strip_protection(want))}"
    )
    return {"recycled": recycled}
