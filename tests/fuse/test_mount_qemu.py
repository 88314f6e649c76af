"""``amigafuse mount`` through the VirtIO SCSI driver (the default backend): a real QEMU
started and driven by the mount process.  Contents match the handler's manifest; a QEMU
that dies makes I/O fail with EIO instead of hanging, and the mount can still be
unmounted.  (Two processes mounting two partitions of one image through two QEMUs needs
the driver to open images with file.locking=off: QEMU's own image lock refuses the
second QEMU today.  With backend=file it works: test_two_mounts.py.)"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import shared_image
from tests.fuse.conftest import (
    amigafuse,
    is_mounted,
)
from tests.fuse.test_mount_images import check_against_manifest

pytestmark = [pytest.mark.fuse, pytest.mark.qemu]


def _qemu_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    kids = [int(x) for x in out.split()]
    found = []
    for k in kids:
        try:
            exe = os.readlink(f"/proc/{k}/exe")
        except OSError:
            continue
        if "qemu" in exe:
            found.append(k)
        found += _qemu_children(k)
    return found


def test_qemu_backend_matches_manifest(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/sfs0_v1277.hdf.gz"), image)
    mnt = cli_mount(image, options="ro")
    assert check_against_manifest(mnt / "SDH0", "sfs0_v1277") >= 390


def test_qemu_dying_gives_eio_not_a_hang(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from amigafuse.fuse.session import pid_file

    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/sfs0_v1277.hdf.gz"), image)
    mnt = cli_mount(image, options="ro")
    root = mnt / "SDH0"
    assert (root / "README.txt").read_bytes()
    pid = int(pid_file(str(mnt)).read_text())
    qemus = _qemu_children(pid)
    assert qemus, "the mount process has no QEMU child"
    for q in qemus:
        os.kill(q, 9)
    time.sleep(0.5)
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc:
        (root / "sizes" / "size_3145745.bin").read_bytes()  # not read before: needs the disk
    assert exc.value.errno == errno.EIO
    assert time.monotonic() - t0 < 60
    assert amigafuse("umount", str(mnt)).returncode in (0, 1)
    assert not is_mounted(mnt)


def test_qemu_mount_keeps_working_after_idle(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A mount is used for hours: the QEMU behind it must outlive idle moments.  (Fails while
    the qtest backend sets PR_SET_PDEATHSIG in a QEMU spawned from a trio worker thread:
    the signal fires when that thread exits, ~10 s after it goes idle.)"""
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/sfs0_v1277.hdf.gz"), image)
    mnt = cli_mount(image, options="ro")
    time.sleep(15)
    assert len((mnt / "SDH0" / "sizes" / "size_3145745.bin").read_bytes()) == 3145745
