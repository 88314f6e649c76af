"""``amigafuse mount`` through the VirtIO SCSI driver (the default backend): a real QEMU
started and driven by the mount process.  Contents match the handler's manifest; a QEMU
that dies makes I/O fail with EIO instead of hanging, and the mount can still be
unmounted.  (Two processes on two partitions of one image, each with its own QEMU:
test_two_mounts.py.)"""

from __future__ import annotations

import errno
import os
import shutil
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


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            kids.append(int(entry))
    return kids


def _qemu_children(pid: int) -> list[int]:
    found = []
    for k in _children(pid):
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


def test_mount_disks_of_a_running_qemu(cli_mount, user_qemu, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``amigafuse mount qemu:SOCKET,SHM DIR`` drives the controller of a QEMU the user
    started; writing, unmounting (flush) and detaching leave that QEMU running."""
    from tests.fuse.conftest import check_image

    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/sfs0_v1277.hdf.gz"), image)
    qemu = user_qemu(image)
    mnt = cli_mount(Path(qemu.source), options="backend=qemu")
    root = mnt / "SDH0"
    assert "README.txt" in os.listdir(root)
    (root / "via_running_qemu.txt").write_bytes(b"hello through a user's QEMU\n" * 1000)
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert qemu.running()  # the user's QEMU keeps running
    qemu.proc.terminate()
    qemu.proc.wait(timeout=10)
    assert check_image(image) == {"SDH0": []}
    again = cli_mount(image, options="backend=file,ro")
    assert (again / "SDH0" / "via_running_qemu.txt").read_bytes() == b"hello through a user's QEMU\n" * 1000


def test_two_images_on_one_controller(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two SOURCE images: two SCSI targets of one controller, their partitions side by side
    (the second disk's DH0 is not renamed: the first disk's partition is SDH0)."""
    a = tmp_path / "a.hdf"
    b = tmp_path / "b.hdf"
    shutil.copyfile(shared_image("handler/sfs0_v1277.hdf.gz"), a)
    shutil.copyfile(shared_image("handler/ffs_dos3_v40.hdf.gz"), b)
    mnt = cli_mount(a, b)
    assert sorted(os.listdir(mnt)) == ["DH0", "SDH0"]
    assert os.getxattr(mnt / "DH0", "user.amiga.dostype") == b"DOS\\3"
    (mnt / "DH0" / "x").write_bytes(b"ffs")
    (mnt / "SDH0" / "x").write_bytes(b"sfs")
    os.symlink("../SDH0/x", mnt / "DH0" / "to_sfs")  # across partitions: stored as SDH0:x
    assert (mnt / "DH0" / "to_sfs").read_bytes() == b"sfs"
    assert amigafuse("umount", str(mnt)).returncode == 0
    again = cli_mount(b, options="backend=file,ro")
    assert os.readlink(again / "DH0" / "to_sfs") == "SDH0:x"  # dangling without SDH0 mounted
