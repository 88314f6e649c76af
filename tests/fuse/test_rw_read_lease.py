"""Reads on a read-write mount through the QEMU driver: unstaged data comes back in the
device's buffer (StagedBlockIO.read_lease), staged small writes laid over it.  Big
reads of a file must return its bytes after in-place writes that are still staged and
after they are written back, with the kernel's page cache dropped so the reads reach
the engine each time."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from tests.fuse.test_read_path import MIB, drop_cached, make_ffs_disk

pytestmark = [pytest.mark.fuse, pytest.mark.qemu]


def test_big_reads_on_a_rw_mount_see_staged_and_written_back_writes(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rnd = random.Random(4)
    big = rnd.randbytes(6 * MIB + 777)
    image = tmp_path / "disk.hdf"
    src = tmp_path / "src"
    src.mkdir()
    make_ffs_disk(image, {"big.bin": big}, src)
    mnt = cli_mount(image, options="backend=qemu,commit=0")
    path = mnt / "DH0" / "big.bin"
    want = bytearray(big)
    assert path.read_bytes() == bytes(want)  # unstaged: lent buffers
    with open(path, "r+b") as f:  # small in-place writes: staged in the engine
        for _ in range(40):
            off = rnd.randrange(0, len(want) - 3000)
            piece = rnd.randbytes(rnd.randrange(1, 3000))
            f.seek(off)
            f.write(piece)
            want[off : off + len(piece)] = piece
    # closed: the kernel's writeback cache hands the dirty pages to the engine, which
    # stages them (commit=0: nothing is written back before the sync below)
    drop_cached(path)
    assert path.read_bytes() == bytes(want)
    subprocess.run(["sync", str(mnt / "DH0")], check=True)  # the engine writes back
    drop_cached(path)
    assert path.read_bytes() == bytes(want)
