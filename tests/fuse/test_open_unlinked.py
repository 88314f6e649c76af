"""Files unlinked while open, through a real FUSE mount (``amigafuse mount``, file
backend), issue 6.

SFS with ``.recycled``: the unlinked file lives on in ``.recycled`` and the FUSE layer
marks it busy, so no purge (40 more deletions, a full volume) takes it: its descriptor
reads and writes it as POSIX promises.  Where the object is really deleted (FFS, an SFS
volume without ``.recycled``), its id is never handed to another object: I/O through
the old descriptor fails with ENOENT, never reaching a new file's bytes, and the new
files stay intact."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest

from amigafuse.errors import NoSpace
from amigafuse.fuse.ops import AmigaOperations, MountedVolume
from amigafuse.fuse.options import MountOptions
from tests.conftest import content, shared_image
from tests.fuse.conftest import amigafuse, check_image, make_two_partition_sfs_disk
from tests.fuse.memvolume import MemoryVolume

pytestmark = pytest.mark.fuse


def fill(path: Path, chunk: int = 256 * 1024) -> int:
    """Write ``path`` until ENOSPC (at write or fsync); the bytes that made it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    written = 0
    try:
        for i in range(4096):
            try:
                os.pwrite(fd, content(f"fill{i}", chunk), written)
                os.fsync(fd)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written
            written += chunk
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    raise AssertionError("the volume never filled up")


def test_sfs_open_unlinked_file_survives_purges_and_a_full_volume(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = make_two_partition_sfs_disk(tmp_path / "disk.hdf", size_mib=16)
    mnt = cli_mount(image)
    root = mnt / "DH0"
    keepers = {f"keep{i}.bin": content(f"keep{i}", 1000 + 7919 * i) for i in range(5)}
    for name, data in keepers.items():
        (root / name).write_bytes(data)
    (mnt / "DH1" / "other.bin").write_bytes(content("other", 50_000))

    body = content("open", 300_000)
    fd = os.open(root / "open.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, body, 0)
        os.fsync(fd)
        os.unlink(root / "open.bin")
        assert not (root / "open.bin").exists()
        # 40 more deleted files: .recycled goes past 35 and is purged, oldest first
        # (the open file is the oldest).
        for i in range(40):
            (root / f"gone{i}").write_bytes(content(f"gone{i}", 20_000))
            os.unlink(root / f"gone{i}")
        recycled = {p.name for p in (root / ".recycled").iterdir()}
        assert "open.bin" in recycled and len(recycled) <= 36, recycled
        # Fill the volume: every other file in .recycled is purged for room.
        assert fill(root / "filler") > 0
        assert {p.name for p in (root / ".recycled").iterdir()} == {"open.bin"}
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the read reaches the engine
        assert os.pread(fd, len(body) + 10, 0) == body
        # Room again (the filler goes to .recycled, then is purged for this write).
        os.unlink(root / "filler")
        more = content("more", 100_000)
        os.pwrite(fd, more, len(body))
        os.pwrite(fd, b"HEAD", 0)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        expect = b"HEAD" + body[4:] + more
        assert os.pread(fd, len(expect) + 10, 0) == expect
        assert os.fstat(fd).st_size == len(expect)
    finally:
        os.close(fd)
    # Closed: it stays in .recycled, as AmigaOS leaves it.
    assert (root / ".recycled" / "open.bin").read_bytes() == expect
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert check_image(image) == {"DH0": [], "DH1": []}
    proc = amigafuse("check", "--backend", "file", "--partition", "DH0", str(image))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    mnt2 = cli_mount(image, options="backend=file")
    root2 = mnt2 / "DH0"
    for name, data in keepers.items():
        assert (root2 / name).read_bytes() == data, name
    assert (root2 / ".recycled" / "open.bin").read_bytes() == expect
    assert (mnt2 / "DH1" / "other.bin").read_bytes() == content("other", 50_000)
    assert sorted(p.name for p in root2.iterdir()) == sorted(keepers)


# (image, partition): the unlinked object is deleted at once
DELETED_AT_ONCE = [
    ("handler/ffs_dos3_v40.hdf.gz", "DH0"),
    ("handler/sfs0_v1277_cs_norec.hdf.gz", "SDH0"),
]


@pytest.mark.parametrize(("image_name", "part"), DELETED_AT_ONCE)
def test_a_deleted_open_file_never_reaches_the_objects_that_reuse_its_storage(  # type: ignore[no-untyped-def]
    cli_mount, tmp_path: Path, image_name: str, part: str
) -> None:
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image(image_name), image)
    mnt = cli_mount(image)
    root = mnt / part
    work = root / "work"
    work.mkdir()
    body = content("victim", 40_000)
    fd = os.open(work / "victim", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, body, 0)
        os.fsync(fd)
        os.unlink(work / "victim")
        # New objects take the freed header / object node and data blocks.
        news = {f"new{i}": content(f"new{i}", 40_000) for i in range(20)}
        for name, data in news.items():
            (work / name).write_bytes(data)
        os.sync()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the read reaches the engine
        with pytest.raises(OSError) as exc_info:
            os.pread(fd, 50_000, 0)  # (was: a new file's bytes, or EIO on SFS)
        assert exc_info.value.errno == errno.ENOENT
        try:
            os.pwrite(fd, b"X" * 5000, 0)
            os.fsync(fd)
        except OSError as exc:
            assert exc.errno in (errno.ENOENT, errno.EIO), exc
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno in (errno.ENOENT, errno.EIO), exc
    for name, data in news.items():
        assert (work / name).read_bytes() == data, name
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert check_image(image) == {part: []}
    mnt2 = cli_mount(image)
    for name, data in news.items():
        assert (mnt2 / part / "work" / name).read_bytes() == data, name
    assert not (mnt2 / part / "work" / "victim").exists()


# ---------------------------------------------------------------------------------
# The adapter's bookkeeping, driven directly (no mount): which objects are busy.

CTX = SimpleNamespace(umask=0o022, uid=0, gid=0, pid=0)


class BusyVolume(MemoryVolume):
    def __init__(self) -> None:
        super().__init__("Busy")
        self.busy_calls: list[tuple[int, bool]] = []
        self.fail_truncate = False

    def set_busy(self, object_id: int, busy: bool) -> None:
        self.busy_calls.append((object_id, busy))

    async def truncate(self, object_id: int, size: int) -> None:
        if self.fail_truncate:
            raise NoSpace("refused for the test")
        await super().truncate(object_id, size)


async def test_the_adapter_marks_an_object_busy_from_its_first_open_to_its_last_release() -> None:
    vol = BusyVolume()
    ops = AmigaOperations([MountedVolume("DH0", vol, False)], MountOptions(), single=True)
    fi, _attrs = await ops.create(1, b"f", stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT, CTX)
    inode = int(fi.fh)
    oid = ops.table.resolve(inode).object_id  # type: ignore[union-attr]
    assert vol.busy_calls == [(oid, True)]
    await ops.open(inode, os.O_RDONLY, CTX)
    await ops.release(inode)
    assert vol.busy_calls == [(oid, True)]  # one handle left
    await ops.release(inode)
    assert vol.busy_calls == [(oid, True), (oid, False)]
    # An open that fails (its O_TRUNC refused) leaves the object as it was.
    vol.fail_truncate = True
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.open(inode, os.O_WRONLY | os.O_TRUNC, CTX)
    assert exc.value.errno == errno.ENOSPC
    assert vol.busy_calls == [(oid, True), (oid, False), (oid, True), (oid, False)]
    vol.fail_truncate = False
    await ops.open(inode, os.O_WRONLY | os.O_TRUNC, CTX)
    assert vol.busy_calls[-1] == (oid, True)
    await ops.release(inode)
    assert vol.busy_calls[-1] == (oid, False)


def test_sfs_a_removed_directory_held_open_never_names_the_directory_on_its_node(  # type: ignore[no-untyped-def]
    cli_mount, tmp_path: Path
) -> None:
    """A directory removed while a process holds it (a shell's cwd), then a new
    directory that takes its object node: the new one is a directory of its own (not
    the kernel's dead inode), and the old descriptor lists and creates nothing."""
    image = make_two_partition_sfs_disk(tmp_path / "disk.hdf", size_mib=16)
    mnt = cli_mount(image)
    root = mnt / "DH0"
    (root / "cwd").mkdir()
    dfd = os.open(root / "cwd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(root / "cwd")
        (root / "other").mkdir()
        (root / "other" / "child").write_bytes(b"child")
        assert os.listdir(root / "other") == ["child"]
        assert (root / "other" / "child").read_bytes() == b"child"
        with pytest.raises(OSError) as exc:
            os.listdir(dfd)
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(OSError) as exc:
            os.open("new", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(OSError) as exc:
            os.fstat(dfd)  # (was: the attributes of "other", which has its node)
        assert exc.value.errno == errno.ENOENT
    finally:
        os.close(dfd)
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert check_image(image) == {"DH0": [], "DH1": []}
