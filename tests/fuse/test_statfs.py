"""``df`` on real mounts: exact on a ``partition=`` mount (checked against amitools), the
sum of the partitions on a whole-disk mount."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_image
from tests.fuse.conftest import amigafuse

pytestmark = pytest.mark.fuse

XDFTOOL = str(Path(sys.executable).parent / "xdftool")
RDBTOOL = str(Path(sys.executable).parent / "rdbtool")


def amitools_blocks(image: Path, part: str) -> tuple[int, int]:
    """(total, free) blocks of an FFS partition as amitools counts them (total includes
    the reserved boot blocks)."""
    out = subprocess.run([XDFTOOL, str(image), "open", f"part={part}", "+", "info"],
                         capture_output=True, text=True, check=True).stdout
    total = int(re.search(r"total:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    free = int(re.search(r"free:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    return total, free


def test_df_on_a_partition_mount_is_exact(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/ffs_dos3_v40.hdf.gz"), image)
    total, free = amitools_blocks(image, "DH0")
    mnt = cli_mount(image, options="backend=file,partition=DH0")
    sv = os.statvfs(mnt)
    assert (sv.f_bsize, sv.f_frsize) == (512, 512)
    assert sv.f_blocks == total - 2  # the two reserved boot blocks are not filesystem blocks
    assert sv.f_bfree == sv.f_bavail == free
    assert sv.f_namemax == 30
    # 100,000 bytes on DOS\3: 196 data blocks, a header, 2 extension blocks (72 pointers each)
    with open(mnt / "new.bin", "wb") as f:
        f.write(os.urandom(100_000))
        f.flush()
        os.fsync(f.fileno())
    after = os.statvfs(mnt)
    assert after.f_bfree == free - 199 and after.f_bavail == free - 199
    assert after.f_blocks == sv.f_blocks
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert amitools_blocks(image, "DH0") == (total, free - 199)
    # read-only: what the disk holds is free, nothing is available to write
    ro = cli_mount(image, options="backend=file,partition=DH0,ro")
    sv = os.statvfs(ro)
    assert sv.f_bfree == free - 199 and sv.f_bavail == 0
    df = subprocess.run(["df", "-B512", "--output=size,used,avail", str(ro)],
                        capture_output=True, text=True, check=True).stdout.split()
    assert df[-3:] == [str(total - 2), str(total - 2 - (free - 199)), "0"]


def make_two_partition_ffs_disk(path: Path) -> Path:
    """DH0 (DOS\\3) and DH1 (DOS\\1) of different sizes, made and formatted by amitools."""
    subprocess.run([RDBTOOL, str(path), "create", "size=24M", "+", "init", "+",
                    "add", "size=30%", "name=DH0", "dostype=ffs+intl", "+",
                    "add", "size=70%", "name=DH1", "dostype=ffs"], check=True, capture_output=True)
    for part, label in (("DH0", "Small"), ("DH1", "Big")):
        subprocess.run([XDFTOOL, str(path), "open", f"part={part}", "+", "format", label],
                       check=True, capture_output=True)
    return path


def test_df_on_a_whole_disk_mount_sums_the_partitions(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = make_two_partition_ffs_disk(tmp_path / "two.hdf")
    whole = cli_mount(image, options="backend=file")
    assert sorted(os.listdir(whole)) == ["DH0", "DH1"]
    (whole / "DH1" / "f").write_bytes(b"x" * 5000)
    os.sync()
    sums = os.statvfs(whole)
    # statfs anywhere in the mount answers for the whole mount (one FUSE superblock)
    assert os.statvfs(whole / "DH0") == sums == os.statvfs(whole / "DH1")
    assert amigafuse("umount", str(whole)).returncode == 0
    parts = []
    for name in ("DH0", "DH1"):
        mnt = cli_mount(image, options=f"backend=file,ro,partition={name}")
        parts.append(os.statvfs(mnt))
        total, free = amitools_blocks(image, name)
        assert (parts[-1].f_blocks, parts[-1].f_bfree) == (total - 2, free)
        assert amigafuse("umount", str(mnt)).returncode == 0
    assert sums.f_blocks == parts[0].f_blocks + parts[1].f_blocks
    assert sums.f_bfree == sums.f_bavail == parts[0].f_bfree + parts[1].f_bfree
    assert sums.f_bsize == 512 and sums.f_namemax == 30
