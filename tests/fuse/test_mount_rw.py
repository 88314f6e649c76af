"""Read-write use of real engines through ``amigafuse mount`` (file backend): the usual
shell tools, then the engine's own check, a remount that shows the same data, and for FFS
amitools reading what we wrote."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import shared_image
from tests.fuse.conftest import amigafuse, check_image, is_mounted, make_tree, same_tree

pytestmark = pytest.mark.fuse

# (image, partition directory, hard links supported)
WRITABLE = [
    ("handler/sfs0_v1277.hdf.gz", "SDH0", False),
    ("handler/ffs_dos3_v40.hdf.gz", "DH0", True),
    ("handler/ffs_dos5_v40.hdf.gz", "DH0", True),
    ("handler/ffs_dos7_v47.hdf.gz", "DH0", True),
]


def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize(("image_name", "part", "hardlinks"), WRITABLE)
def test_shell_tools_then_check_and_remount(cli_mount, tmp_path: Path, image_name: str, part: str,
                                            hardlinks: bool) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image(image_name), image)
    src = make_tree(tmp_path / "src")
    mnt = cli_mount(image)
    root = mnt / part
    assert os.access(root, os.W_OK)
    work = root / "work"
    sh("mkdir", str(work))
    sh("cp", "-a", str(src), str(work / "tree"))
    same_tree(src, work / "tree")
    sh("cp", "-a", str(work / "tree"), str(tmp_path / "back"))
    same_tree(src, tmp_path / "back")

    f = work / "log.txt"
    f.write_bytes(b"first\n")
    with open(f, "ab") as fh:
        fh.write(b"second\n")
    assert f.read_bytes() == b"first\nsecond\n"
    sh("truncate", "-s", "3", str(f))
    assert f.read_bytes() == b"fir"
    sh("truncate", "-s", "70000", str(f))
    assert f.read_bytes() == b"fir" + bytes(69997)
    sh("chmod", "640", str(f))
    assert f.stat().st_mode & 0o777 == 0o640
    sh("touch", "-d", "2001-02-03T04:05:06Z", str(f))
    assert f.stat().st_mtime == 981173106
    sh("mv", str(work / "tree" / "file9.bin"), str(work / "moved.bin"))
    assert (work / "moved.bin").read_bytes() == (src / "file9.bin").read_bytes()
    # a case-only rename needs a detour: the kernel sees one file under both names
    os.rename(work / "moved.bin", work / "tmp.bin")
    os.rename(work / "tmp.bin", work / "MOVED.bin")
    assert os.listdir(work).count("MOVED.bin") == 1
    sh("ln", "-s", "../log.txt", str(work / "tree" / "link"))
    assert (work / "tree" / "link").read_bytes() == b"fir" + bytes(69997)
    if hardlinks:
        sh("ln", str(f), str(work / "hard"))
        assert (work / "hard").stat().st_ino == f.stat().st_ino and f.stat().st_nlink == 2
    sh("setfattr", "-n", "user.amiga.comment", "-v", "Kommentar", str(f))
    assert "Kommentar" in sh("getfattr", "-d", str(f))
    with pytest.raises(OSError) as exc:
        (work / "bad:name").write_bytes(b"")
    assert exc.value.errno == errno.EINVAL
    sh("rm", "-r", str(work / "tree" / "Ünter Verzeichnis"))
    assert not (work / "tree" / "Ünter Verzeichnis").exists()

    assert amigafuse("umount", str(mnt)).returncode == 0
    assert not is_mounted(mnt)
    assert check_image(image) == {part: []}

    again = cli_mount(image)
    w2 = again / part / "work"
    assert (w2 / "log.txt").read_bytes() == b"fir" + bytes(69997)
    assert (w2 / "log.txt").stat().st_mtime == 981173106
    assert os.getxattr(w2 / "log.txt", "user.amiga.comment") == b"Kommentar"
    assert os.readlink(w2 / "tree" / "link") == "../log.txt"
    assert (w2 / "MOVED.bin").read_bytes() == (src / "file9.bin").read_bytes()
    for i in range(9):
        assert (w2 / "tree" / f"file{i}.bin").read_bytes() == (src / f"file{i}.bin").read_bytes()


WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
chunk = os.urandom(1 << 20)
try:
    for n in range(1, 41):
        os.write(fd, chunk)
        if n == 4:
            print("WRITING", flush=True)
    os.fsync(fd)
    os.close(fd)
    print("DONE", flush=True)
except OSError as exc:
    print("ERRNO", exc.errno, flush=True)
"""


@pytest.mark.parametrize(("image_name", "part", "hardlinks"), WRITABLE)
def test_sigterm_during_large_copy_leaves_clean_volume(cli_mount, tmp_path: Path, image_name: str,
                                                       part: str, hardlinks: bool) -> None:  # type: ignore[no-untyped-def]
    import sys
    import time

    from amigafuse.commands.umount import _pid_alive
    from amigafuse.fuse.session import pid_file

    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image(image_name), image)
    mnt = cli_mount(image)
    pid = int(pid_file(str(mnt)).read_text())
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt / part / "big.bin")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "WRITING"
        os.kill(pid, 15)
        writer.communicate(timeout=120)  # ends (with an error or not): never hangs
        deadline = time.monotonic() + 120
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _pid_alive(pid)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert not is_mounted(mnt)
    assert check_image(image) == {part: []}
    again = cli_mount(image)
    assert "README.txt" in os.listdir(again / part)


def test_amitools_reads_what_we_wrote_to_ffs(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.fuse.conftest import amitools_read

    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/ffs_dos3_v40.hdf.gz"), image)
    src = make_tree(tmp_path / "src")
    mnt = cli_mount(image)
    sh("cp", "-a", str(src), str(mnt / "DH0" / "fromlinux"))
    assert amigafuse("umount", str(mnt)).returncode == 0
    proc = amigafuse("check", "--backend", "file", "--partition", "DH0", str(image))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for i in range(10):
        got = amitools_read(image, "DH0", f"fromlinux/file{i}.bin", tmp_path / "out.bin")
        assert got == (src / f"file{i}.bin").read_bytes(), i
    got = amitools_read(image, "DH0", "fromlinux/Ünter Verzeichnis/tiefer/Grüße.txt", tmp_path / "o.txt")
    assert got == (src / "Ünter Verzeichnis" / "tiefer" / "Grüße.txt").read_bytes()


@pytest.mark.parametrize(("image_name", "part", "hardlinks"), WRITABLE[:2])
def test_full_volume_gives_enospc_and_stays_clean(cli_mount, tmp_path: Path, image_name: str,
                                                  part: str, hardlinks: bool) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image(image_name), image)
    mnt = cli_mount(image)
    root = mnt / part
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={root / 'fill.bin'}", "bs=1M",
                           f"count={free // (1 << 20) + 8}", "conv=fsync"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "No space left on device" in proc.stderr, proc.stderr
    with pytest.raises(OSError) as exc:
        # metadata too: creating files on a full volume fails cleanly.  The write dd was
        # refused is undone whole, so up to ~1 MiB may still be free: 2,000 files of
        # 4 KiB (and their headers) cannot all fit in that.
        for i in range(2000):
            (root / f"small{i}").write_bytes(b"x" * 4096)
    assert exc.value.errno == errno.ENOSPC
    assert (root / "README.txt").read_bytes()  # still readable
    os.unlink(root / "fill.bin")
    (root / "after.txt").write_bytes(b"space again")
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert check_image(image) == {part: []}
