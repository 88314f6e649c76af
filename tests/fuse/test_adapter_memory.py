"""The FUSE adapter on a real mount, over the in-memory test Volume (served by a subprocess).

This checks the translation layer alone; the same operations on real FFS/SFS volumes are
in test_mount_ffs.py.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.fuse.conftest import is_mounted

pytestmark = pytest.mark.fuse


def _xattr(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()


def test_files_dirs_and_case_insensitive_lookup(memory_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = memory_mount()
    m = s.mountpoint
    (m / "Dir").mkdir()
    (m / "Dir" / "Hello.txt").write_bytes(b"hello world\n")
    assert (m / "dir" / "HELLO.TXT").read_bytes() == b"hello world\n"
    assert sorted(os.listdir(m / "DIR")) == ["Hello.txt"]
    with open(m / "Dir" / "Hello.txt", "ab") as f:
        f.write(b"more")
    assert (m / "Dir" / "Hello.txt").stat().st_size == 16
    os.truncate(m / "Dir" / "Hello.txt", 5)
    assert (m / "Dir" / "Hello.txt").read_bytes() == b"hello"
    os.rename(m / "Dir" / "Hello.txt", m / "Dir" / "Moved")
    assert not (m / "Dir" / "hello.txt").exists()
    with pytest.raises(OSError) as exc:
        os.rmdir(m / "Dir")
    assert exc.value.errno == errno.ENOTEMPTY
    os.unlink(m / "Dir" / "Moved")
    os.rmdir(m / "Dir")
    assert os.listdir(m) == []


def test_names_outside_latin1_are_refused(memory_mount) -> None:  # type: ignore[no-untyped-def]
    m = memory_mount().mountpoint
    (m / "Grüße").write_bytes(b"x")
    assert os.listdir(m) == ["Grüße"]
    with pytest.raises(OSError) as exc:
        (m / "€").write_bytes(b"x")
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        (m / ("x" * 31)).write_bytes(b"x")
    assert exc.value.errno == errno.ENAMETOOLONG


def test_chmod_xattrs_links_and_times(memory_mount) -> None:  # type: ignore[no-untyped-def]
    m = memory_mount().mountpoint
    f = m / "file"
    f.write_bytes(b"data")
    os.chmod(f, 0o640)
    assert f.stat().st_mode & 0o777 == 0o640
    assert _xattr(f, "user.amiga.protection") == "----rw-d"
    os.setxattr(f, "user.amiga.protection", b"----r---")
    assert f.stat().st_mode & 0o777 == 0o440  # the kernel's cached mode was invalidated
    os.setxattr(f, "user.amiga.comment", "Kommentar ä".encode())
    assert _xattr(f, "user.amiga.comment") == "Kommentar ä"
    assert set(os.listxattr(f)) == {"user.amiga.protection", "user.amiga.comment"}
    os.removexattr(f, "user.amiga.comment")
    assert "user.amiga.comment" not in os.listxattr(f)
    assert _xattr(m, "user.amiga.volume") == "Vol0"
    os.setxattr(m, "user.amiga.volume", b"Renamed")
    assert _xattr(m, "user.amiga.volume") == "Renamed"
    os.utime(f, ns=(0, 1_600_000_000_000_000_000))
    assert f.stat().st_mtime_ns == 1_600_000_000_000_000_000
    os.link(f, m / "hard")
    assert f.stat().st_nlink == 2 and (m / "hard").stat().st_ino == f.stat().st_ino
    (m / "d").mkdir()
    os.symlink("../file", m / "d" / "soft")
    assert os.readlink(m / "d" / "soft") == "../file"
    assert (m / "d" / "soft").read_bytes() == b"data"
    assert os.lstat(m / "d" / "soft").st_size == len("../file")
    with pytest.raises(OSError) as exc:
        os.symlink("/etc/passwd", m / "abs")
    assert exc.value.errno == errno.EINVAL
    os.symlink(str(m / "file"), m / "d" / "abs")  # inside the mount: becomes "Renamed:file"
    assert os.readlink(m / "d" / "abs") == "../file"
    out = subprocess.run(["getfattr", "-d", str(f)], capture_output=True, text=True, check=True).stdout
    assert 'user.amiga.protection="----r---"' in out


def test_statfs_and_sigterm_closes_volumes(memory_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = memory_mount()
    st = os.statvfs(s.mountpoint)
    assert st.f_bsize == 512 and st.f_blocks == 4096 and st.f_namemax == 30
    (s.mountpoint / "x").write_bytes(b"1" * 100_000)
    assert s.stop() == 0
    assert not is_mounted(s.mountpoint)
    report = json.loads((tmp_path / "report0.json").read_text())
    assert report == {"closed": [1], "problems": []}


def test_external_umount_ends_the_server(memory_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = memory_mount()
    subprocess.run(["fusermount3", "-u", str(s.mountpoint)], check=True)
    assert s.proc.wait(timeout=30) == 0
    assert json.loads((tmp_path / "report0.json").read_text())["closed"] == [1]


def test_read_only_mount(memory_mount) -> None:  # type: ignore[no-untyped-def]
    m = memory_mount("--ro", "-o", "ro").mountpoint
    with pytest.raises(OSError) as exc:
        (m / "x").write_bytes(b"1")
    assert exc.value.errno == errno.EROFS


def test_whole_disk_mount_shows_partitions(memory_mount) -> None:  # type: ignore[no-untyped-def]
    m = memory_mount("--volumes", "2", "-o", "uid=1234,gid=567,umask=077").mountpoint
    assert sorted(os.listdir(m)) == ["DH0", "DH1"]
    assert _xattr(m / "DH1", "user.amiga.volume") == "Vol1"
    (m / "DH0" / "a").write_bytes(b"zero")
    (m / "dh1" / "a").write_bytes(b"one")
    assert (m / "DH0" / "a").read_bytes() == b"zero" and (m / "DH1" / "a").read_bytes() == b"one"
    st = (m / "DH0" / "a").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o077) == (1234, 567, 0)
    with pytest.raises(OSError) as exc:
        os.rename(m / "DH0" / "a", m / "DH1" / "b")
    assert exc.value.errno == errno.EXDEV
    with pytest.raises(OSError):
        (m / "new").mkdir()
    os.symlink("../DH1/a", m / "DH0" / "other")  # relative, crossing partitions: "DH1:a"
    assert (m / "DH0" / "other").read_bytes() == b"one"
    assert os.readlink(m / "DH0" / "other") == "../DH1/a"


WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
chunk = b"x" * (1 << 20)
n = 0
try:
    for n in range(1, 301):
        os.write(fd, chunk)
        if n == 8:
            print("WRITING", flush=True)
    os.fsync(fd)
    os.close(fd)
    print("NO ERROR", flush=True)
except OSError as exc:
    print("ERRNO", exc.errno, flush=True)
"""


def test_sigterm_during_a_copy_unmounts_and_closes(memory_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sys

    s = memory_mount()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(s.mountpoint / "big")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "WRITING"
        assert s.stop(timeout=60) == 0  # busy: synced, detached lazily, loop stopped
        out = writer.communicate(timeout=60)[0]
        # the writer sees its file system go away (at a write, fsync or close): no hang
        assert "ERRNO" in out, out
    finally:
        if writer.poll() is None:
            writer.kill()
    assert not is_mounted(s.mountpoint)
    assert json.loads((tmp_path / "report0.json").read_text()) == {"closed": [1], "problems": []}


def test_killed_server_leaves_no_dead_mount(memory_mount) -> None:  # type: ignore[no-untyped-def]
    import signal
    import time

    s = memory_mount()
    (s.mountpoint / "x").write_bytes(b"1")
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(timeout=30)
    deadline = time.monotonic() + 30  # fusermount3 notices the death; slow under load
    while is_mounted(s.mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(s.mountpoint)  # auto_unmount


def test_engine_errors_become_errnos_and_the_mount_survives(memory_mount) -> None:  # type: ignore[no-untyped-def]
    s = memory_mount()
    m = s.mountpoint
    for name, want in (("corrupt", errno.EIO), ("bug", errno.EIO), ("gone", errno.EIO)):
        with pytest.raises(OSError) as exc:
            os.stat(m / name)
        assert exc.value.errno == want, name
    with pytest.raises(OSError) as exc:
        (m / "full").write_bytes(b"x")
    assert exc.value.errno == errno.ENOSPC
    (m / "fine").write_bytes(b"still works")
    assert (m / "fine").read_bytes() == b"still works"
    assert s.stop() == 0
    err = s.stderr()
    assert "bad checksum (block 5, field checksum)" in err  # EIO causes are logged
    assert "an engine bug" in err


def test_names_learnt_in_another_case_go_away_with_the_file(memory_mount) -> None:  # type: ignore[no-untyped-def]
    m = memory_mount().mountpoint
    (m / "foo").write_bytes(b"x")
    assert os.stat(m / "FOO").st_ino == os.stat(m / "foo").st_ino  # the kernel now caches "FOO"
    os.unlink(m / "foo")
    with pytest.raises(FileNotFoundError):
        os.stat(m / "FOO")  # invalidated at once, not after the 60 s entry timeout
    (m / "bar").write_bytes(b"y")
    os.stat(m / "BAR")
    os.rename(m / "bar", m / "baz")
    with pytest.raises(FileNotFoundError):
        os.stat(m / "BAR")
    assert (m / "BAZ").read_bytes() == b"y"


def test_rename_noreplace_and_exchange(memory_mount) -> None:  # type: ignore[no-untyped-def]
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100

    def renameat2(a: Path, b: Path, flags: int) -> int:
        r = libc.renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), flags)
        return 0 if r == 0 else ctypes.get_errno()

    m = memory_mount().mountpoint
    (m / "a").write_bytes(b"A")
    (m / "b").write_bytes(b"B")
    assert renameat2(m / "a", m / "b", 1) == errno.EEXIST  # RENAME_NOREPLACE
    assert (m / "b").read_bytes() == b"B"
    assert renameat2(m / "a", m / "c", 1) == 0
    assert (m / "c").read_bytes() == b"A"
    assert renameat2(m / "c", m / "b", 2) == errno.EINVAL  # RENAME_EXCHANGE: not supported


def test_acl_and_security_xattrs_are_unsupported_not_invalid(memory_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """cp -a sets system.posix_acl_access on every file: it must get EOPNOTSUPP (and then
    chmod), whatever the value; user.amiga.* keep working afterwards (no ENOSYS latch)."""
    m = memory_mount().mountpoint
    f = m / "file"
    f.write_bytes(b"x")
    acl = bytes.fromhex("0200000001000600ffffffff04000400ffffffff20000400ffffffff")
    for name, value in (("system.posix_acl_access", acl), ("trusted.x", b"\xff\xfe")):
        with pytest.raises(OSError) as exc:
            os.setxattr(f, name, value)
        assert exc.value.errno == errno.EOPNOTSUPP, name
    os.setxattr(f, "user.amiga.comment", b"still works")
    assert _xattr(f, "user.amiga.comment") == "still works"
    src = tmp_path / "src.txt"
    src.write_bytes(b"payload")
    os.chmod(src, 0o640)
    proc = subprocess.run(["cp", "-a", str(src), str(m / "copied")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""
    assert (m / "copied").read_bytes() == b"payload"
    assert (m / "copied").stat().st_mode & 0o777 == 0o640


def _gone_soon(path: Path) -> None:
    """``path`` stops existing within 2 s (the kernel's entry is invalidated
    asynchronously, right after the change; the entry timeout is 60 s)."""
    import time

    deadline = time.monotonic() + 2
    while os.path.lexists(path):
        assert time.monotonic() < deadline, f"{path} still exists"
        time.sleep(0.01)


def test_the_stored_spelling_goes_away_when_another_spelling_is_removed(memory_mount) -> None:  # type: ignore[no-untyped-def]
    m = memory_mount().mountpoint
    (m / "foo").write_bytes(b"x")
    os.stat(m / "foo")  # the kernel now caches "foo"
    os.unlink(m / "FOO")
    _gone_soon(m / "foo")
    (m / "Dir").mkdir()
    os.stat(m / "Dir")
    os.rmdir(m / "DIR")
    _gone_soon(m / "Dir")
    (m / "bar").write_bytes(b"y")
    os.stat(m / "bar")
    os.rename(m / "BAR", m / "baz")
    _gone_soon(m / "bar")
    assert (m / "baz").read_bytes() == b"y"
    # a destination replaced under another spelling: "old" must not keep the old file
    (m / "old").write_bytes(b"1")
    (m / "new").write_bytes(b"2")
    old_ino = os.stat(m / "old").st_ino
    os.rename(m / "new", m / "OLD")
    import time

    deadline = time.monotonic() + 2
    while os.stat(m / "old").st_ino == old_ino:
        assert time.monotonic() < deadline, "'old' still names the replaced file"
        time.sleep(0.01)
    assert (m / "old").read_bytes() == b"2"
