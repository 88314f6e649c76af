"""Random sequences of file operations through a real mount, compared with a model (a dict
of paths -> bytes).  Runs on the adapter over the in-memory test volume and on the SFS
and FFS engines (handler-written images, each checked clean afterwards), each served by
a subprocess."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import shared_image

pytestmark = pytest.mark.fuse

NAMES = ["a", "B", "cé", "d d"]
op = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(NAMES), st.integers(0, 70000), st.binary(max_size=3000)),
    st.tuples(st.just("truncate"), st.sampled_from(NAMES), st.integers(0, 90000)),
    st.tuples(st.just("unlink"), st.sampled_from(NAMES)),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("mkdir"), st.sampled_from(NAMES)),
    st.tuples(st.just("rmdir"), st.sampled_from(NAMES)),
)
_counter = itertools.count()


def run_ops(base: Path, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    work = base / f"r{next(_counter)}"
    work.mkdir()
    files: dict[str, bytearray] = {}
    dirs: set[str] = set()

    def key(name: str) -> str | None:  # the existing entry a name means (case-insensitive)
        for k in list(files) + list(dirs):
            if k.upper() == name.upper():
                return k
        return None

    for o in ops:
        kind, name = o[0], o[1]
        k = key(name)
        p = work / (k or name)
        if kind == "write":
            off, data = o[2], o[3]
            if k in dirs:
                continue
            with open(p, "r+b" if k else "wb") as f:
                f.seek(off)
                f.write(data)
            buf = files.setdefault(k or name, bytearray())
            if off > len(buf) and data:  # an empty write does not extend
                buf.extend(bytes(off - len(buf)))
            buf[off : off + len(data)] = data
        elif kind == "truncate":
            if k not in files:
                continue
            os.truncate(p, o[2])
            buf = files[k]
            del buf[o[2]:]
            buf.extend(bytes(o[2] - len(buf)))
        elif kind == "unlink":
            if k in files:
                os.unlink(p)
                del files[k]
            elif k is None:
                with pytest.raises(FileNotFoundError):
                    os.unlink(p)
        elif kind == "rename":
            dst = o[2]
            kd = key(dst)
            if k is None or k in dirs or kd in dirs or (kd is not None and kd.upper() == k.upper()):
                continue
            os.rename(p, work / dst)
            data = files.pop(k)
            if kd is not None:
                files.pop(kd)
            files[dst] = data
        elif kind == "mkdir":
            if k is not None:
                with pytest.raises(FileExistsError):
                    os.mkdir(p)
                continue
            os.mkdir(p)
            dirs.add(name)
        elif kind == "rmdir":
            if k in dirs:
                os.rmdir(p)
                dirs.discard(k)
            elif k in files:
                with pytest.raises(OSError) as exc:
                    os.rmdir(p)
                assert exc.value.errno == errno.ENOTDIR
        # after every step the mount agrees with the model
        assert sorted(os.listdir(work)) == sorted(list(files) + list(dirs))
    for name, data in files.items():
        assert (work / name).read_bytes() == bytes(data), name
        assert (work / name).stat().st_size == len(data)
    shutil.rmtree(work)


SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def mem_mount(tmp_path_factory):  # type: ignore[no-untyped-def]
    import sys

    from tests.fuse.conftest import Served

    mnt = tmp_path_factory.mktemp("memrandom") / "mnt"
    mnt.mkdir()
    served = Served([sys.executable, "-m", "tests.fuse.serve_memory", str(mnt)], mnt)
    try:
        yield mnt
    finally:
        served.close()


@SETTINGS
@given(st.lists(op, min_size=1, max_size=25))
def test_random_ops_memory_volume(mem_mount, ops) -> None:  # type: ignore[no-untyped-def]
    run_ops(mem_mount, ops)


@pytest.fixture(scope="module", params=[("sfs0_v1277", "SDH0"), ("ffs_dos3_v40", "DH0"),
                                        ("ffs_dos5_v40", "DH0")])
def engine_mount(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    from tests.fuse.conftest import amigafuse, check_image, force_unmount, is_mounted

    name, part = request.param
    tmp = tmp_path_factory.mktemp(f"random_{name}")
    image = tmp / "disk.hdf"
    shutil.copyfile(shared_image(f"handler/{name}.hdf.gz"), image)
    mnt = tmp / "mnt"
    mnt.mkdir()
    proc = amigafuse("mount", "-o", "backend=file", str(image), str(mnt))
    assert proc.returncode == 0, proc.stderr
    try:
        yield mnt / part
        assert amigafuse("umount", str(mnt)).returncode == 0
        assert check_image(image) == {part: []}
    finally:
        if is_mounted(mnt):
            force_unmount(mnt)


@SETTINGS
@given(st.lists(op, min_size=1, max_size=25))
def test_random_ops_engines(engine_mount, ops) -> None:  # type: ignore[no-untyped-def]
    run_ops(engine_mount, ops)
