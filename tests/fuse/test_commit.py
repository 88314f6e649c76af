"""``-o commit=SECONDS``: changes reach the disk on their own while the volume stays
mounted (a plain sync(1) never reaches a FUSE daemon), checked by amitools reading the
image file behind the live mount; ``commit=0`` leaves them in memory until unmount."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import shared_image
from tests.fuse.conftest import amigafuse, amitools_read, check_image

pytestmark = pytest.mark.fuse


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)  # closed without fsync: the kernel hands the data over on close


def _on_disk(image: Path, name: str, out: Path) -> bytes | None:
    try:
        return amitools_read(image, "DH0", name, out)
    except subprocess.CalledProcessError:
        return None


def test_changes_are_committed_while_mounted(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/ffs_dos3_v40.hdf.gz"), image)
    data = os.urandom(70_000)
    mnt = cli_mount(image, options="backend=file,partition=DH0,commit=1")
    _write(mnt / "committed.bin", data)
    deadline = time.monotonic() + 30
    got = None
    while time.monotonic() < deadline and got != data:
        time.sleep(0.5)
        got = _on_disk(image, "committed.bin", tmp_path / "out.bin")
    assert got == data, "the file did not reach the image within 30 s of commit=1"
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert check_image(image) == {"DH0": []}


def test_commit_0_keeps_changes_until_unmount(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/ffs_dos3_v40.hdf.gz"), image)
    data = os.urandom(5_000)
    mnt = cli_mount(image, options="backend=file,partition=DH0,commit=0")
    _write(mnt / "held.bin", data)
    time.sleep(3)
    assert _on_disk(image, "held.bin", tmp_path / "out.bin") is None
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert _on_disk(image, "held.bin", tmp_path / "out.bin") == data
    assert check_image(image) == {"DH0": []}
