"""``amigafuse mount`` of real handler-written images: what Linux sees through the mount
matches the handler's manifest exactly (sizes, contents, protection, dates, comments,
links); read-only, locking and unmounting behaviour."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from amigafuse.amiga.dates import DateStamp
from amigafuse.fuse import mapping
from tests.conftest import HANDLER, shared_image
from tests.fuse.conftest import amigafuse, is_mounted

pytestmark = pytest.mark.fuse

READ_ONLY_ENGINE_IMAGES = ["sfs0_v1277", "sfs2_v1277", "ffs_dos3_v40", "ffs_dos5_v40", "ffs_dos5_v47",
                          "ffs_dos7_v47", "ofs_dos0_v40"]


def _manifest(name: str) -> list[list[str]]:
    rows = []
    for line in (HANDLER / f"{name}.manifest.tsv").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        rows.append(line.split("\t"))
    return rows


def _sizes_by_examine(name: str) -> dict[str, int]:
    """Paths whose size Examine(lock) reports differently from ExNext (the FFS dircache
    quirk in handler/README.md): the file header's size is what Linux sees."""
    entries = json.loads((HANDLER / f"{name}.manifest.json").read_text(encoding="utf-8"))["entries"]
    return {e["path"]: e["examine_mismatch"]["size"] for e in entries
            if "size" in e.get("examine_mismatch", {})}


def check_against_manifest(root: Path, name: str) -> int:
    """Compare every object of the manifest with the mount; returns how many were checked."""
    checked = 0
    examined = _sizes_by_examine(name)
    for row in _manifest(name):
        path, kind, size, md5, _prot_hex, prot, date, _date_utc, comment, target = row[:10]
        size = str(examined.get(path, size))
        p = root / path.lstrip("/")
        st = os.lstat(p)
        days, minutes, ticks = (int(x) for x in date.split(","))
        assert st.st_mtime_ns == DateStamp(days, minutes, ticks).to_unix_ns(), path
        if kind in ("file", "hardlink-file"):
            assert stat.S_ISREG(st.st_mode) and st.st_size == int(size), path
            assert hashlib.md5(p.read_bytes()).hexdigest() == md5, path
        elif kind in ("dir", "hardlink-dir"):
            assert stat.S_ISDIR(st.st_mode), path
        elif kind == "softlink":
            assert stat.S_ISLNK(st.st_mode), path
            depth = path.strip("/").count("/")
            want = mapping.amiga_link_to_unix(target, depth=depth, volume_names=[])
            assert os.readlink(p) == want, path
        if kind != "softlink":
            assert os.getxattr(p, "user.amiga.protection").decode() == prot, path
            if comment:
                assert os.getxattr(p, "user.amiga.comment").decode() == comment, path
            else:
                assert "user.amiga.comment" not in os.listxattr(p), path
        checked += 1
    return checked


@pytest.mark.parametrize("name", READ_ONLY_ENGINE_IMAGES)
def test_image_through_mount_matches_manifest(cli_mount, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / f"{name}.hdf"
    image.write_bytes(shared_image(f"handler/{name}.hdf.gz").read_bytes())
    mnt = cli_mount(image)
    partition = "SDH0" if name.startswith("sfs") else "DH0"
    assert os.listdir(mnt) == [partition]
    root = mnt / partition
    checked = check_against_manifest(root, name)
    assert checked >= 390
    found = subprocess.run(["find", str(root), "-mindepth", "1"], capture_output=True, text=True, check=True)
    listed = {"/" + Path(x).relative_to(root).as_posix() for x in found.stdout.splitlines()}
    hidden = {r[0] for r in _manifest(name) if r[0].startswith("/.recycled")}  # SFS: by name only
    assert listed == {r[0] for r in _manifest(name)} - hidden  # find walks every directory
    # case-insensitive lookup, as on AmigaOS
    assert (root / "README.TXT").read_bytes() == (root / "README.txt").read_bytes()
    sv = os.statvfs(root)
    assert sv.f_bsize == 512 and sv.f_blocks > 100_000
    volume = os.getxattr(root, "user.amiga.volume").decode()
    assert volume == name.upper()
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert not is_mounted(mnt)


def test_partition_option_mounts_at_the_mount_point(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = shared_image("handler/sfs0_v1277.hdf.gz")
    mnt = cli_mount(image, options="backend=file,ro,partition=sdh0")
    assert "README.txt" in os.listdir(mnt)
    with pytest.raises(OSError) as exc:
        (mnt / "new").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS


def test_unknown_partition_is_a_clear_error(cli_mount) -> None:  # type: ignore[no-untyped-def]
    image = shared_image("handler/sfs0_v1277.hdf.gz")
    mnt = cli_mount(image, options="backend=file,ro,partition=DH7", expect_ok=False)
    proc = cli_mount.last
    assert proc.returncode == 2
    assert "no mountable partition 'DH7'" in proc.stderr and "SDH0" in proc.stderr
    assert not is_mounted(mnt)


def test_second_read_write_mount_of_a_partition_is_refused(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "disk.hdf"
    image.write_bytes(shared_image("handler/sfs0_v1277.hdf.gz").read_bytes())
    first = cli_mount(image)
    second = cli_mount(image, expect_ok=False)
    proc = cli_mount.last
    assert proc.returncode == 1, proc.stderr
    assert "already mounted" in proc.stderr and str(first) in proc.stderr
    assert not is_mounted(second)
    assert amigafuse("umount", str(first)).returncode == 0
    third = cli_mount(image)  # the lock went with the first mount
    assert os.listdir(third) == ["SDH0"]


def test_bad_arguments(tmp_path: Path) -> None:
    proc = amigafuse("mount", str(tmp_path / "missing.hdf"), str(tmp_path))
    assert proc.returncode == 2 and "no such image file" in proc.stderr
    proc = amigafuse("mount", "-o", "bogus", str(tmp_path), str(tmp_path))
    assert proc.returncode == 2
    proc = amigafuse("umount", str(tmp_path))
    assert proc.returncode == 2 and "not a mount point" in proc.stderr


def test_garbage_image_is_refused(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "junk.img"
    image.write_bytes(os.urandom(1 << 20))
    mnt = cli_mount(image, expect_ok=False)
    assert cli_mount.last.returncode != 0
    assert "nothing to mount" in cli_mount.last.stderr
    assert not is_mounted(mnt)


def test_foreground_debug_logs_operations_and_sigint_unmounts(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO
    from tests.fuse.conftest import force_unmount

    image = shared_image("handler/sfs0_v1277.hdf.gz")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "amigafuse", "mount", "-d", "-o", "backend=file,ro",
                             str(image), str(mnt)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (mnt / "SDH0" / "meta" / "commented.txt").stat().st_size == 42
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "lookup" in err and "commented.txt" in err  # every operation is logged
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
        force_unmount(mnt)


def test_umount_of_a_busy_mount_says_so_and_lazy_works(cli_mount) -> None:  # type: ignore[no-untyped-def]
    image = shared_image("handler/sfs0_v1277.hdf.gz")
    import time

    from amigafuse.commands.umount import _pid_alive
    from amigafuse.fuse.session import pid_file

    mnt = cli_mount(image, options="backend=file,ro")
    pid = int(pid_file(str(mnt)).read_text())
    with open(mnt / "SDH0" / "README.txt", "rb") as held:
        proc = amigafuse("umount", str(mnt))
        assert proc.returncode == 1 and "busy" in proc.stderr, proc.stderr
        assert is_mounted(mnt)
        proc = amigafuse("umount", "--lazy", str(mnt))
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)
        assert "closes the volumes when the last file" in proc.stdout
        assert held.read(10) == b"Test volum"  # an open file stays readable until closed
        assert _pid_alive(pid)
    deadline = time.monotonic() + 30
    while _pid_alive(pid) and time.monotonic() < deadline:  # last file closed: it finishes
        time.sleep(0.05)
    assert not _pid_alive(pid)


def test_a590_disk_all_six_partitions(cli_mount) -> None:  # type: ignore[no-untyped-def]
    """A disk made by AmigaOS 3.1: six partitions DOS\\0..\\5, each a directory."""
    image = shared_image("real/a590_WD93028XA_6parts.hdd.gz")
    mnt = cli_mount(image, options="backend=file,ro")
    parts = sorted(os.listdir(mnt))
    assert len(parts) == 6
    dostypes = sorted(os.getxattr(mnt / p, "user.amiga.dostype").decode() for p in parts)
    assert dostypes == [f"DOS\\{i}" for i in range(6)]
    for p in parts:
        assert sorted(os.listdir(mnt / p)) == ["Trashcan", "Trashcan.info"]
        assert (mnt / p / "Trashcan").is_dir()


def test_unformatted_partitions_are_reported_not_shown(cli_mount) -> None:  # type: ignore[no-untyped-def]
    image = shared_image("real/a590_WD93028XA_6parts_not_formatted.hdd.gz")
    mnt = cli_mount(image, options="backend=file,ro", expect_ok=False)
    err = cli_mount.last.stderr
    assert cli_mount.last.returncode == 2
    assert err.count("not mounted: no filesystem") + err.count("cannot be mounted") == 6
    assert "nothing to mount" in err
    assert not is_mounted(mnt)


def test_corrupt_block_gives_eio_and_the_rest_still_works(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A file header with a bad checksum: that file fails with EIO, the mount and the other
    files keep working, and the image is not written."""
    image = tmp_path / "disk.hdf"
    image.write_bytes(shared_image("handler/ffs_dos3_v40.hdf.gz").read_bytes())
    header_block = 256 + 65443  # partition start + README.txt's file header (checked below)
    with open(image, "r+b") as f:
        f.seek(header_block * 512)
        block = bytearray(f.read(512))
        assert block[432:443] == b"\x0aREADME.txt"  # BCPL name of the file header
        block[300] ^= 0xFF  # inside the block table: the checksum no longer verifies
        f.seek(header_block * 512)
        f.write(block)
    before = image.read_bytes()
    mnt = cli_mount(image, options="backend=file,ro")
    root = mnt / "DH0"
    with pytest.raises(OSError) as exc:
        (root / "README.txt").read_bytes()
    assert exc.value.errno == errno.EIO
    assert len((root / "sizes" / "size_0065537.bin").read_bytes()) == 65537
    assert "nested" in os.listdir(root / "nested" / "..")
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert image.read_bytes() == before
    if not os.path.exists("/dev/log"):  # no syslog here: the daemon logs beside its pid file
        from amigafuse.fuse.session import pid_file

        log = pid_file(str(mnt)).with_suffix(".log").read_text()
        assert "checksum" in log and "README.txt" in log, log


def test_truncated_image_is_refused_with_the_reason(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An image cut short (a partial download): the partition that no longer fits is not
    mounted, and the message says why."""
    image = tmp_path / "disk.hdf"
    data = shared_image("handler/ffs_dos3_v40.hdf.gz").read_bytes()
    image.write_bytes(data[: len(data) // 2 + 12345])
    mnt = cli_mount(image, options="backend=file,ro", expect_ok=False)
    proc = cli_mount.last
    assert proc.returncode == 2
    assert "DH0" in proc.stderr and "past the end of the disk" in proc.stderr, proc.stderr
    assert not is_mounted(mnt)
