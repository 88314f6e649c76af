"""The adapter's share of ``cp -a`` of small files (issue 5, "Speed"): the two xattr
requests the kernel and cp make for every file are answered before anything else.

``getxattr security.capability`` (the kernel, before the first write of each new file)
and ``setxattr system.posix_acl_access`` (cp copying the ACL) get ENOTSUP without an
inode lookup, an engine call or the volume's lock: an unknown inode gets ENOTSUP too
(not ENOENT), and the engine sees no call.  Our own ``user.amiga.*`` attributes keep
working on the same connection (the answer is never ENOSYS, which would switch every
getxattr/setxattr off for the rest of the mount)."""

from __future__ import annotations

import errno
import os
import stat
from types import SimpleNamespace
from typing import Any

import pytest
from pyfuse3 import ENOATTR, FUSEError

from amigafuse.fs.api import Stat
from amigafuse.fuse.ops import AmigaOperations, MountedVolume
from amigafuse.fuse.options import MountOptions
from tests.fuse.memvolume import MemoryVolume

CTX = SimpleNamespace(umask=0o022, uid=0, gid=0, pid=0)


class CountingVolume(MemoryVolume):
    def __init__(self) -> None:
        super().__init__("Count")
        self.calls = 0

    async def getattr(self, object_id: int) -> Stat:
        self.calls += 1
        return await super().getattr(object_id)

    async def lookup(self, dir_id: int, name: str) -> Stat:
        self.calls += 1
        return await super().lookup(dir_id, name)


def adapter() -> tuple[AmigaOperations, CountingVolume]:
    vol = CountingVolume()
    return AmigaOperations([MountedVolume("DH0", vol, False)], MountOptions(), single=True), vol


async def _errno(coro: Any) -> int:
    with pytest.raises(FUSEError) as exc:
        await coro
    return exc.value.errno


async def test_foreign_xattrs_are_answered_before_any_lookup() -> None:
    ops, vol = adapter()
    fi, _ = await ops.create(1, b"f", stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT, CTX)
    inode = fi.fh
    vol.calls = 0
    unknown = 10**9  # an inode the table never gave out: not even resolved
    for ino in (inode, unknown):
        assert await _errno(ops.getxattr(ino, b"security.capability", CTX)) == errno.ENOTSUP
        assert await _errno(ops.getxattr(ino, b"system.posix_acl_access", CTX)) == errno.ENOTSUP
        assert await _errno(ops.setxattr(ino, b"system.posix_acl_access", b"\2\0\0\0", CTX)) == errno.ENOTSUP
        assert await _errno(ops.setxattr(ino, b"security.selinux", b"x", CTX)) == errno.ENOTSUP
        # an unknown user.* name: "no such attribute", as before
        assert await _errno(ops.getxattr(ino, b"user.other", CTX)) == ENOATTR
    assert vol.calls == 0  # no engine work for any of them
    # the volume's own attributes still answer, on a known inode, and ENOENT on an unknown one
    assert await ops.getxattr(inode, b"user.amiga.protection", CTX) == b"----rw-d"
    assert vol.calls == 1
    assert await _errno(ops.getxattr(unknown, b"user.amiga.protection", CTX)) == errno.ENOENT
    await ops.setxattr(inode, b"user.amiga.comment", b"hello", CTX)
    assert await ops.getxattr(inode, b"user.amiga.comment", CTX) == b"hello"
    await ops.release(inode)


async def test_foreign_setxattr_does_not_count_as_a_change() -> None:
    # The periodic commit skips volumes nobody changed: a refused ACL is no change.
    ops, _ = adapter()
    mv = ops.volumes[0]
    before = mv.changes
    assert await _errno(ops.setxattr(1, b"system.posix_acl_access", b"\2\0\0\0", CTX)) == errno.ENOTSUP
    assert mv.changes == before
