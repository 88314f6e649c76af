"""Deferred metadata (amigafuse/fuse/ops.py): mode and mtime changes of an open file reach
the engine in one setattr at its last release, and every reply shows them before that.

The first tests drive the adapter's handlers directly over the in-memory Volume, counting
engine calls (what the kernel sends is replayed as ``cp -a`` sends it, from the ``-d``
log); the last ones do the same through a real FUSE mount of an FFS image and read the
result back after a remount."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from amigafuse.amiga.dates import DateStamp
from amigafuse.errors import NotFound
from amigafuse.fs.api import SetAttrs, Stat
from amigafuse.fuse.ops import AmigaOperations, MountedVolume
from amigafuse.fuse.options import MountOptions
from tests.conftest import shared_image
from tests.fuse.conftest import amigafuse, check_image
from tests.fuse.memvolume import MemoryVolume

CTX = SimpleNamespace(umask=0o022, uid=0, gid=0, pid=0)
MTIME_NS = 1_600_000_000_000_000_000  # a whole number of Amiga ticks


class CountingVolume(MemoryVolume):
    def __init__(self) -> None:
        super().__init__("Count")
        self.setattrs: list[SetAttrs] = []
        self.fail_setattr: Exception | None = None
        self.hold: trio.Event | None = None  # setattr waits for it (once), after `entered`
        self.entered = trio.Event()

    async def setattr(self, object_id: int, attrs: SetAttrs) -> Stat:
        self.setattrs.append(attrs)
        if self.hold is not None:
            hold, self.hold = self.hold, None
            self.entered.set()
            await hold.wait()
        if self.fail_setattr is not None:
            raise self.fail_setattr
        return await super().setattr(object_id, attrs)


def fields(**changed: bool) -> Any:
    names = ("size", "mode", "uid", "gid", "atime", "mtime", "ctime")
    return SimpleNamespace(**{f"update_{n}": changed.get(n, False) for n in names})


def attr(mode: int = 0, mtime_ns: int = 0, size: int = 0) -> Any:
    return SimpleNamespace(st_mode=mode, st_mtime_ns=mtime_ns, st_atime_ns=mtime_ns, st_size=size,
                           st_uid=0, st_gid=0)


def adapter() -> tuple[AmigaOperations, CountingVolume]:
    vol = CountingVolume()
    ops = AmigaOperations([MountedVolume("DH0", vol, False)], MountOptions(), single=True)
    return ops, vol


async def cp_a_file(ops: AmigaOperations, name: bytes, mode: int) -> int:
    """The requests ``cp -a`` makes for one small file, up to (not including) release."""
    fi, _attrs = await ops.create(1, name, stat.S_IFREG | 0o600, os.O_WRONLY | os.O_CREAT, CTX)
    inode = fi.fh
    with pytest.raises(Exception) as exc:
        await ops.getxattr(inode, b"security.capability", CTX)
    assert getattr(exc.value, "errno", None) == errno.ENOTSUP
    assert await ops.write(inode, 0, b"x" * 300) == 300
    await ops.setattr(inode, attr(mtime_ns=MTIME_NS + 10**9), fields(mtime=True, ctime=True), inode, CTX)
    await ops.setattr(inode, attr(mtime_ns=MTIME_NS), fields(atime=True, mtime=True, ctime=True), inode, CTX)
    with pytest.raises(Exception) as exc:
        await ops.setxattr(inode, b"system.posix_acl_access", b"\2\0\0\0", CTX)
    assert getattr(exc.value, "errno", None) == errno.ENOTSUP
    reply = await ops.setattr(inode, attr(mode=stat.S_IFREG | mode), fields(mode=True, ctime=True), inode, CTX)
    assert stat.S_IMODE(reply.st_mode) == mode
    return int(inode)


async def test_cp_a_sequence_makes_one_engine_setattr_at_release() -> None:
    ops, vol = adapter()
    inode = await cp_a_file(ops, b"f", 0o640)
    assert vol.setattrs == []  # nothing yet: all three changes wait for the release
    got = await ops.getattr(inode, CTX)
    assert stat.S_IMODE(got.st_mode) == 0o640 and got.st_mtime_ns == MTIME_NS
    assert await ops.getxattr(inode, b"user.amiga.protection", CTX) == b"----rw-d"
    listed = await ops.lookup(1, b"F", CTX)  # another spelling, same inode
    assert listed.st_ino == inode and stat.S_IMODE(listed.st_mode) == 0o640
    await ops.release(inode)
    assert len(vol.setattrs) == 1
    st = await vol.getattr(ops.table.resolve(inode).object_id)  # type: ignore[union-attr]
    assert st.date == DateStamp.from_unix_ns(MTIME_NS)
    assert (await ops.getattr(inode, CTX)).st_mode == got.st_mode  # the same from the engine now


async def test_a_second_handle_keeps_the_changes_until_the_last_release() -> None:
    ops, vol = adapter()
    inode = await cp_a_file(ops, b"f", 0o600)
    await ops.open(inode, os.O_RDONLY, CTX)
    await ops.release(inode)
    assert vol.setattrs == []
    await ops.release(inode)
    assert len(vol.setattrs) == 1


async def test_a_chmod_during_the_release_is_handed_over_too() -> None:
    ops, vol = adapter()
    inode = await cp_a_file(ops, b"f", 0o640)
    vol.hold = trio.Event()
    hold = vol.hold
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ops.release, inode)
        await vol.entered.wait()  # the release is handing over the first changes
        await ops.setattr(inode, attr(mode=stat.S_IFREG | 0o604), fields(mode=True), None, CTX)
        assert len(vol.setattrs) == 1  # still deferred: the entry is there
        hold.set()
    assert len(vol.setattrs) == 2 and ops._deferred == {}
    got = await ops.getattr(inode, CTX)
    assert stat.S_IMODE(got.st_mode) == 0o604
    assert await ops.getxattr(inode, b"user.amiga.protection", CTX) == b"----rw-d"


async def test_a_release_cancelled_while_handing_over_still_closes_the_handle() -> None:
    # Unmount cancels requests in flight: the handle is gone (the object no longer busy
    # in its engine) and the changes not yet stored are handed over at unmount.
    ops, vol = adapter()
    inode = await cp_a_file(ops, b"f", 0o640)
    assert inode in ops._open_files
    vol.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ops.release, inode)
        await vol.entered.wait()
        nursery.cancel_scope.cancel()
    assert inode not in ops._open_files
    assert ops._deferred[inode].handles == 0  # kept: its changes are still pending
    assert await ops.close_volumes() == []
    assert len(vol.setattrs) == 2 and vol.setattrs[-1].protection is not None


async def test_truncate_takes_the_deferred_changes_along() -> None:
    ops, vol = adapter()
    inode = await cp_a_file(ops, b"f", 0o640)
    reply = await ops.setattr(inode, attr(size=10), fields(size=True), inode, CTX)
    assert reply.st_size == 10 and stat.S_IMODE(reply.st_mode) == 0o640
    assert len(vol.setattrs) == 1 and vol.setattrs[0].date == DateStamp.from_unix_ns(MTIME_NS)
    await ops.release(inode)
    assert len(vol.setattrs) == 1  # nothing left to hand over


async def test_periodic_commit_and_unmount_hand_over_what_open_files_wait_with() -> None:
    ops, vol = adapter()
    inode = await cp_a_file(ops, b"f", 0o640)
    await ops.commit_changed()
    assert len(vol.setattrs) == 1
    await ops.setattr(inode, attr(mode=stat.S_IFREG | 0o600), fields(mode=True), inode, CTX)
    assert len(vol.setattrs) == 1
    assert await ops.close_volumes() == []
    assert len(vol.setattrs) == 2 and vol.closed


async def test_a_file_unlinked_while_open_releases_quietly() -> None:
    ops, vol = adapter()
    inode = await cp_a_file(ops, b"f", 0o640)
    await ops.unlink(1, b"f", CTX)
    await ops.release(inode)  # NotFound from the engine: logged, not raised
    assert len(vol.setattrs) == 1
    assert ops._deferred == {}


async def test_an_engine_error_at_release_is_not_retried_for_ever() -> None:
    ops, vol = adapter()
    inode = await cp_a_file(ops, b"f", 0o640)
    vol.fail_setattr = NotFound("gone")
    await ops.release(inode)
    vol.fail_setattr = None
    await ops.commit_changed()
    assert len(vol.setattrs) == 1 and ops._deferred == {}


async def test_setattr_that_changes_nothing_makes_no_engine_write() -> None:
    ops, vol = adapter()
    d = await ops.mkdir(1, b"d", 0o755, CTX)
    await ops.setattr(d.st_ino, attr(mode=d.st_mode), fields(mode=True), None, CTX)
    await ops.setattr(d.st_ino, attr(mtime_ns=d.st_mtime_ns), fields(mtime=True), None, CTX)
    assert vol.setattrs == []
    assert stat.S_IMODE(d.st_mode) != 0o755
    await ops.setattr(d.st_ino, attr(mode=stat.S_IFDIR | 0o755), fields(mode=True), None, CTX)
    assert len(vol.setattrs) == 1


# ------------------------------------------------------------------ on a real mount


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """name -> (mode bits, mtime in whole seconds) for every file below ``root``."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (stat.S_IMODE(st.st_mode), int(st.st_mtime))
    return out


@pytest.mark.fuse
def test_cp_a_modes_and_times_survive_a_remount(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/ffs_dos3_v40.hdf.gz"), image)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    modes = [0o644, 0o600, 0o755, 0o640, 0o444]
    for i in range(20):
        f = src / ("sub" if i % 2 else "") / f"f{i}"
        f.write_bytes(os.urandom(50 + 97 * i))
        f.chmod(modes[i % len(modes)])
        os.utime(f, (1_500_000_000 + 3600 * i, 1_500_000_000 + 3600 * i))
    mnt = cli_mount(image, options="backend=file,partition=DH0,commit=0")
    subprocess.run(["cp", "-a", str(src), str(mnt / "copy")], check=True)
    assert _tree(mnt / "copy") == _tree(src)
    # open, change while open, look (stat and the xattr), close
    f = mnt / "copy" / "f0"
    with open(f, "r+b", buffering=0) as handle:
        os.chmod(f, 0o604)
        os.utime(f, (1_400_000_000, 1_400_000_000))
        handle.write(b"y")
        os.utime(f, (1_400_000_000, 1_400_000_000))
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o604 and int(os.stat(f).st_mtime) == 1_400_000_000
        assert os.getxattr(f, "user.amiga.protection") == b"----rw-d"
    expected = _tree(src)
    expected["f0"] = (0o604, 1_400_000_000)
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert check_image(image) == {"DH0": []}
    again = cli_mount(image, options="backend=file,partition=DH0,ro")
    assert _tree(again / "copy") == expected
