"""Large and concurrent reads through a real FUSE mount served over the VirtIO SCSI
driver (QEMU): the zero-copy path (the DMA buffer handed to pyfuse3's reply, given back
after it) returns the right bytes to many readers at once, more of them than the
device has request buffers, with the kernel's page cache dropped between passes so the
reads reach the device again."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.qemu]

MIB = 1 << 20


def make_ffs_disk(path: Path, files: dict[str, bytes], work: Path) -> None:
    """An RDB disk with one DOS\\3 partition DH0 holding ``files``, made by amitools
    (an independent writer)."""
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "rdbtool"), str(path), "create", "size=48M", "+", "init", "+",
                    "add", "size=100%", "name=DH0", "dostype=ffs+intl"], check=True, capture_output=True)
    xdf = [str(bin_dir / "xdftool"), str(path), "open", "part=DH0", "+"]
    subprocess.run([*xdf, "format", "Reads", "ffs+intl"], check=True, capture_output=True)
    for name, data in files.items():
        src = work / name
        src.write_bytes(data)
        subprocess.run([*xdf, "write", str(src)], check=True, capture_output=True)


def drop_cached(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_many_concurrent_readers_get_their_bytes(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(11)
    files = {
        "big.bin": rng.randbytes(12 * MIB + 4321),
        "mid.bin": rng.randbytes(3 * MIB),
        "small.txt": rng.randbytes(5000),
    }
    src = tmp_path / "src"
    src.mkdir()
    image = tmp_path / "disk.hdf"
    make_ffs_disk(image, files, src)
    mnt = cli_mount(image, options="backend=qemu,ro")
    root = mnt / "DH0"
    assert sorted(os.listdir(root)) == sorted(files)

    # whole files, sequentially (page-cache reads: 1 MiB requests)
    for name, data in files.items():
        assert (root / name).read_bytes() == data, name

    errors: list[str] = []

    def reader(seed: int) -> None:
        r = random.Random(seed)
        try:
            for _ in range(12):
                name = r.choice(["big.bin", "big.bin", "mid.bin", "small.txt"])
                data = files[name]
                offset = r.randrange(len(data))
                size = r.choice([1, 4096, 128 * 1024, MIB, 2 * MIB + 17])
                fd = os.open(root / name, os.O_RDONLY)
                try:
                    got = os.pread(fd, size, offset)
                finally:
                    os.close(fd)
                if got != data[offset : offset + size]:
                    errors.append(f"{name} at {offset}+{size}: wrong bytes")
        except OSError as exc:
            errors.append(f"reader {seed}: {exc}")

    for round_ in range(2):
        for name in files:
            drop_cached(root / name)
        threads = [threading.Thread(target=reader, args=(round_ * 100 + i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a reader hangs"
        assert not errors, errors[:5]

    # and the mount still serves whole files afterwards
    drop_cached(root / "big.bin")
    assert (root / "big.bin").read_bytes() == files["big.bin"]


def test_the_mount_raises_the_kernel_readahead(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Sequential reads reach us as 1 MiB requests, several at once, only if the mount's
    readahead is raised (default 4096 KiB; -o read_ahead_kb=N)."""
    from amigafuse.fuse.session import mount_device_number

    image = tmp_path / "disk.hdf"
    src = tmp_path / "src"
    src.mkdir()
    make_ffs_disk(image, {"a.bin": b"a" * 1000}, src)

    def readahead_kb(mnt: Path) -> int:
        dev = mount_device_number(str(mnt))
        assert dev is not None
        return int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())

    assert readahead_kb(cli_mount(image, options="backend=file,ro")) == 4096
    assert readahead_kb(cli_mount(image, options="backend=file,ro,read_ahead_kb=512")) == 512


def test_the_mount_raises_the_kernels_background_request_limit(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The kernel queues at most max_background FUSE readahead requests (12, congestion at
    9, by default), which stalls a 4 MiB readahead; the mount raises it through fusectl
    (default 64, congestion 48; -o max_background=N), mounting fusectl when it is not."""
    from amigafuse.fuse.session import fuse_connection_dir

    image = tmp_path / "disk.hdf"
    src = tmp_path / "src"
    src.mkdir()
    make_ffs_disk(image, {"a.bin": b"a" * 1000}, src)

    def limits(mnt: Path) -> tuple[int, int]:
        conn = fuse_connection_dir(str(mnt), mount_fusectl=False)
        assert conn is not None, "the mount left no fusectl directory to read"
        return (int((conn / "max_background").read_text()),
                int((conn / "congestion_threshold").read_text()))

    assert limits(cli_mount(image, options="backend=file,ro")) == (64, 48)
    assert limits(cli_mount(image, options="backend=file,ro,max_background=20")) == (20, 15)
    assert (cli_mount(image, options="backend=file,ro") / "DH0" / "a.bin").read_bytes() == b"a" * 1000
