"""Different partitions of one image mounted by two processes at once (as two fstab
lines would), and a whole-disk mount of both; each process writes only inside its own
partition, and a partition already mounted read-write cannot be mounted again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuse.conftest import (
    amigafuse,
    check_image,
    make_tree,
    make_two_partition_sfs_disk,
    same_tree,
)

pytestmark = pytest.mark.fuse


@pytest.mark.parametrize("backend", ["file", pytest.param("qemu", marks=pytest.mark.qemu)])
def test_two_processes_two_partitions_of_one_image(cli_mount, tmp_path: Path, backend: str) -> None:  # type: ignore[no-untyped-def]
    """With the driver each process has its own QEMU on the same image file."""
    image = make_two_partition_sfs_disk(tmp_path / "two.hdf")
    src = make_tree(tmp_path / "src")
    m0 = cli_mount(image, options=f"backend={backend},partition=DH0")
    m1 = cli_mount(image, options=f"backend={backend},partition=DH1")
    assert os.getxattr(m0, "user.amiga.volume") == b"VolDH0"
    assert os.getxattr(m1, "user.amiga.volume") == b"VolDH1"
    os.system(f"cp -a '{src}' '{m0}/t0' && cp -a '{src}' '{m1}/t1'")
    (m0 / "only0").write_bytes(b"zero")
    (m1 / "only1").write_bytes(b"one")
    # the same partition again: refused, with who holds it
    again = cli_mount(image, options=f"backend={backend},partition=dh1", expect_ok=False)
    assert cli_mount.last.returncode == 1 and "already mounted" in cli_mount.last.stderr
    assert str(m1) in cli_mount.last.stderr
    assert amigafuse("umount", str(m0)).returncode == 0
    assert amigafuse("umount", str(m1)).returncode == 0
    del again
    assert check_image(image) == {"DH0": [], "DH1": []}

    whole = cli_mount(image, options="backend=file")
    assert sorted(os.listdir(whole)) == ["DH0", "DH1"]
    same_tree(src, whole / "DH0" / "t0")
    same_tree(src, whole / "DH1" / "t1")
    assert sorted(os.listdir(whole / "DH0")) == ["only0", "t0"]
    assert (whole / "DH1" / "only1").read_bytes() == b"one"
    (whole / "DH1" / "x").write_bytes(b"x" * 100_000)
    assert amigafuse("umount", str(whole)).returncode == 0
    assert check_image(image) == {"DH0": [], "DH1": []}
