"""The user's path: files copied with the shell into a real FUSE mount of amigafuse, then
judged by SmartFilesystem 1.83.  The expectation comes from the Linux source tree (names,
sizes, bytes, whole-second mtimes), not from our reader."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from amigafuse.amiga.dates import AMIGA_EPOCH_UNIX
from tests.fuse.conftest import amigafuse, force_unmount, fuse_usable, is_mounted, make_tree
from tests.handler.conftest import Handler, run_handler
from tests.handler.tree import check_clean, comparable, diff, make_disk

pytestmark = pytest.mark.fuse


def sh(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"


def amiga_date(unix_seconds: int) -> list[int]:
    seconds = unix_seconds - AMIGA_EPOCH_UNIX
    return [seconds // 86400, seconds % 86400 // 60, seconds % 60 * 50]


def linux_listing(root: Path, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {prefix: {"type": "DIR"}}
    for path in sorted(root.rglob("*")):
        key = prefix + "/" + path.relative_to(root).as_posix()
        if path.is_dir():
            out[key] = {"type": "DIR"}
        else:
            data = path.read_bytes()
            out[key] = {"type": "FILE", "size": len(data), "md5": hashlib.md5(data).hexdigest(),
                        "date": amiga_date(int(path.stat().st_mtime))}  # fmt: skip
    return out


async def test_sfs183_reads_what_cp_wrote_through_fuse(
    handler_python: Path, sfs183: Handler, tmp_path: Path
) -> None:
    reason = fuse_usable()
    if reason:
        pytest.fail(f"FUSE is not usable here: {reason}")
    image = tmp_path / "fuse.hdf"
    make_disk(image, "SFS", handler=sfs183.path)
    src = make_tree(tmp_path / "src")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        proc = amigafuse("mount", "-o", "backend=file", str(image), str(mnt))
        assert proc.returncode == 0 and is_mounted(mnt), proc.stderr
        root = mnt / "DH0"
        sh("cp", "-a", str(src), str(root / "tree"))
        sh("mkdir", str(root / "work"))
        sh("mv", str(root / "tree" / "file9.bin"), str(root / "work" / "moved.bin"))
        sh("rm", str(root / "tree" / "file3.bin"))
        sh("truncate", "-s", "1000", str(root / "tree" / "file8.bin"))
        sh("touch", "-d", "2001-02-03T04:05:06Z", str(root / "tree" / "file8.bin"))
        done = amigafuse("umount", str(mnt), timeout=120)
        assert done.returncode == 0, done.stderr
    finally:
        force_unmount(mnt)
    # The same changes on the Linux side give the expectation.
    os.makedirs(tmp_path / "work")
    os.replace(src / "file9.bin", tmp_path / "work" / "moved.bin")
    (src / "file3.bin").unlink()
    with open(src / "file8.bin", "r+b") as f:
        f.truncate(1000)
    os.utime(src / "file8.bin", (981173106, 981173106))
    want = {**linux_listing(src, "/tree"), **linux_listing(tmp_path / "work", "/work")}
    await check_clean(image)
    run = run_handler(handler_python, image, sfs183.path, [["walk"]], tmp_path)
    got = comparable(run.results[0], want)
    assert got == want, f"SmartFilesystem 1.83 on what cp -a wrote through FUSE:\n{diff(got, want)}"
