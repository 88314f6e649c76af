"""How many FUSE requests everyday commands cost on a real mount (from the ``-d`` log).

Every request costs tens of microseconds in pyfuse3, so these numbers are the FUSE
layer's speed: ``cp -a`` of small files costs 9 requests a file (docs/mounting.md, Speed,
says which, why none can be cut, and what was tried: accepting cp's ACL instead of its
chmod only trades that setattr for one the kernel sends at close), ``ls -lR`` none per
entry (readdirplus carries the attributes and the kernel caches them).  What amigafuse
controls is the work per request: the three setattrs of a copied file cost no engine
call until its release (tests/fuse/test_deferred_metadata.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, shared_image
from tests.fuse.conftest import amigafuse, force_unmount, fuse_usable, is_mounted

pytestmark = pytest.mark.fuse


class DebugMount:
    """``amigafuse mount -d`` in a subprocess, its log in a file."""

    def __init__(self, image: Path, mnt: Path, log: Path, options: str) -> None:
        self.mnt = mnt
        self.log = log
        mnt.mkdir(exist_ok=True)
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "amigafuse", "mount", "-d", "-o", options, str(image), str(mnt)],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the -d mount did not come up"
            time.sleep(0.05)

    def mark(self) -> int:
        return len(self.log.read_text().splitlines())

    def requests_since(self, mark: int) -> Counter[str]:
        ops: Counter[str] = Counter()
        for line in self.log.read_text().splitlines()[mark:]:
            text = line.removeprefix("amigafuse: ")
            if " -> " not in text and "(" in text:
                ops[text.split("(", 1)[0]] += 1
        return ops

    def close(self) -> None:
        if is_mounted(self.mnt):
            amigafuse("umount", str(self.mnt))
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        force_unmount(self.mnt)


@pytest.fixture
def debug_mount(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    reason = fuse_usable()
    if reason:
        pytest.fail(f"FUSE is not usable here: {reason}")
    mounts: list[DebugMount] = []

    def start(image: Path, options: str = "backend=file") -> DebugMount:
        m = DebugMount(image, tmp_path / f"mnt{len(mounts)}", tmp_path / f"log{len(mounts)}.txt", options)
        mounts.append(m)
        return m

    try:
        yield start
    finally:
        for m in mounts:
            m.close()


def test_cp_a_of_small_files_costs_nine_requests_each(debug_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/ffs_dos3_v40.hdf.gz"), image)
    src = tmp_path / "src"
    src.mkdir()
    files = 60
    for i in range(files):
        (src / f"f{i:03d}.txt").write_bytes(os.urandom(100 + 61 * i))
    m = debug_mount(image)
    start = m.mark()
    subprocess.run(["cp", "-a", str(src), str(m.mnt / "DH0" / "copy")], check=True)
    subprocess.run(["sync", "-f", str(m.mnt / "DH0")], check=True)
    ops = m.requests_since(start)
    assert sum(ops.values()) / files <= 9.2, ops
    # per file: one create, one write (the writeback cache holds the data until the
    # times are set), one release, one capability probe, one refused ACL copy, up to 3
    # setattrs, one lookup; the copied directory itself adds a few
    assert ops["create"] == ops["write"] == ops["release"] == files, ops
    assert files <= ops["getxattr"] <= files + 2 and files <= ops["setxattr"] <= files + 2, ops
    assert ops["setattr"] <= 3 * files + 3 and ops["lookup"] <= files + 5, ops
    assert ops["getattr"] <= 2 and "open" not in ops and "flush" not in ops, ops
    for i in (0, files - 1):
        assert (m.mnt / "DH0" / "copy" / f"f{i:03d}.txt").read_bytes() == (src / f"f{i:03d}.txt").read_bytes()


def test_ls_lR_makes_no_request_per_entry(debug_mount) -> None:  # type: ignore[no-untyped-def]
    m = debug_mount(shared_image("handler/ffs_dos3_v40.hdf.gz"), "backend=file,ro")
    root = m.mnt / "DH0"
    start = m.mark()
    out = subprocess.run(["ls", "-lR", str(root)], capture_output=True, text=True, check=True).stdout
    ops = m.requests_since(start)
    entries = sum(1 for line in out.splitlines() if line[:1] in "-dl" and not line.startswith("total"))
    dirs = sum(1 for line in out.splitlines() if line.startswith("d"))
    assert entries > 300 and dirs > 5
    # per directory: opendir, readdir (a few batches), releasedir; a few lookups of the
    # path and ls's own xattr probes; nothing per entry
    assert ops["opendir"] <= dirs + 2 and ops["releasedir"] <= dirs + 2, ops
    per_entry = ops["lookup"] + ops["getattr"] + ops["getxattr"] + ops["readlink"]
    assert per_entry <= 10, ops
