"""Random operation sequences written by amigafuse, judged by SmartFilesystem 1.83.

Hypothesis draws a sequence of operations (create with data, write at an offset,
truncate, delete, mkdir, rmdir, rename/move); amigafuse applies them to a fresh SFS\\0
volume while a model records the expected tree; after close, our check must be clean
and the real handler must list exactly the model (names, types, sizes, MD5).  Few
examples (each one runs the emulated handler); the engine tier's state machines cover
the volume of sequences against our own reader.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.handler.conftest import Handler, run_handler
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
)

SIZES: list[int] = []  # objects per example (read by the test to confirm the premise)
NAMES = ["alpha", "Beta", "gamma.txt", "delta.bin", "épsilon", "zeta_" + "z" * 40, "eta", "theta"]

create = st.tuples(st.just("create"), st.integers(0, 7), st.integers(0, 7), st.integers(0, 40_000))
mkdir = st.tuples(st.just("mkdir"), st.integers(0, 7), st.integers(0, 7))
op = st.one_of(  # creating weighs more, or most sequences would act on an empty volume
    create,
    create,
    create,
    mkdir,
    mkdir,
    st.tuples(st.just("write"), st.integers(0, 63), st.integers(0, 50_000), st.integers(1, 9000)),
    st.tuples(st.just("truncate"), st.integers(0, 63), st.integers(0, 60_000)),
    st.tuples(st.just("delete"), st.integers(0, 63)),
    st.tuples(st.just("rmdir"), st.integers(0, 7)),
    st.tuples(st.just("rename"), st.integers(0, 63), st.integers(0, 7), st.integers(0, 7)),
)


def taken(model: Model, path: str) -> bool:
    low = path.lower()
    return any(p.lower() == low for p in model.objects)


async def apply(w: Writer, ops: list[tuple[Any, ...]]) -> None:
    model = w.model
    for n, (verb, *args) in enumerate(ops):
        dirs = ["", *sorted(p for p, v in model.objects.items() if v == "DIR")]
        files = sorted(p for p, v in model.objects.items() if isinstance(v, bytes))
        if verb == "create":
            path = f"{dirs[args[0] % len(dirs)]}/{NAMES[args[1]]}{n}"
            if not taken(model, path):
                await w.write_file(path, content(f"{n}", args[2]), pieces=1 + args[2] % 3)
        elif verb == "mkdir":
            path = f"{dirs[args[0] % len(dirs)]}/{NAMES[args[1]]}_d{n}"
            if not taken(model, path):
                await w.mkdir(path)
        elif verb == "rmdir" and len(dirs) > 1:
            path = dirs[1 + args[0] % (len(dirs) - 1)]
            if not any(p.startswith(path + "/") for p in model.objects):
                await w.rmdir(path)
        elif files and verb == "write":
            await w.overwrite(files[args[0] % len(files)], args[1], content(f"w{n}", args[2]))
        elif files and verb == "truncate":
            await w.truncate(files[args[0] % len(files)], args[1])
        elif files and verb == "delete":
            await w.unlink(files[args[0] % len(files)])
        elif files and verb == "rename":
            src = files[args[0] % len(files)]
            dst = f"{dirs[args[1] % len(dirs)]}/{NAMES[args[2]]}_r{n}"
            if not taken(model, dst):
                await w.rename(src, dst)


def test_sfs183_lists_random_sequences(
    handler_python: Path, sfs183: Handler, tmp_path: Path
) -> None:
    blank = {bs: tmp_path / f"blank_{bs}.hdf" for bs in (512, 1024)}
    for bs, path in blank.items():
        make_disk(path, "SFS", size="8M", block_size=bs, handler=sfs183.path)

    @settings(max_examples=20, deadline=None, database=None)
    @given(block_size=st.sampled_from([512, 1024]), ops=st.lists(op, min_size=20, max_size=80))
    def check(block_size: int, ops: list[tuple[Any, ...]]) -> None:
        with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
            image = Path(tmp) / "random.hdf"
            shutil.copyfile(blank[block_size], image)

            async def write() -> Model:
                vol, _, _ = await open_rw(image)
                model = Model()
                try:
                    await apply(Writer(vol, model), ops)
                finally:
                    await vol.close()
                await check_clean(image)
                return model

            model = trio.run(write)
            SIZES.append(len(model.objects))
            want = expected_listing(model)
            run = run_handler(handler_python, image, sfs183.path, [["walk"]], Path(tmp))
            got = comparable(run.results[0], want)
            assert got == want, f"SmartFilesystem 1.83 after {ops}:\n{diff(got, want)}"
            assert run.requests == [], run.requests

    SIZES.clear()
    check()
    assert max(SIZES) >= 8, f"the examples built trees of only {SIZES} objects"
