"""Fixtures for real FUSE mounts served by a subprocess (never by the test's own loop)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.fuse


def fuse_usable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    return None


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(mountpoint: Path) -> None:
    for _ in range(3):
        if not is_mounted(mountpoint):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
        time.sleep(0.1)


class Served:
    """A mount served by a child process."""

    def __init__(self, argv: list[str], mountpoint: Path, *, ready_timeout: float = 60.0) -> None:
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + ready_timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r and "READY" in self.proc.stdout.readline():
                return
        self.close()
        raise AssertionError("server did not become ready")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            force_unmount(self.mountpoint)


@pytest.fixture
def memory_mount(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """``memory_mount(*extra_args)`` -> a Served MemoryVolume mount at tmp_path/mnt."""
    reason = fuse_usable()
    if reason:
        pytest.fail(f"FUSE is not usable here: {reason}")
    served: list[Served] = []

    def start(*extra: str) -> Served:
        mnt = tmp_path / f"mnt{len(served)}"
        mnt.mkdir()
        s = Served([sys.executable, "-m", "tests.fuse.serve_memory", str(mnt),
                    "--report", str(tmp_path / f"report{len(served)}.json"), *extra], mnt)
        served.append(s)
        return s

    try:
        yield start
    finally:
        for s in served:
            s.close()


def amigafuse(*args: str, timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the amigafuse CLI (this checkout) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "amigafuse", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, check=check, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture
def cli_mount(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """``cli_mount(*sources, options="backend=file")`` -> mount point (a daemonized
    ``amigafuse mount``); always unmounted afterwards."""
    reason = fuse_usable()
    if reason:
        pytest.fail(f"FUSE is not usable here: {reason}")
    mounted: list[Path] = []

    def mount(*sources: Path, options: str = "backend=file", expect_ok: bool = True,
              mountpoint: Path | None = None) -> Path:
        mnt = mountpoint or tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir(exist_ok=True)
        mounted.append(mnt)
        proc = amigafuse("mount", "-o", options, *map(str, sources), str(mnt))
        if expect_ok:
            assert proc.returncode == 0, proc.stderr
            assert is_mounted(mnt), proc.stderr
        mount.last = proc  # type: ignore[attr-defined]
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            if is_mounted(mnt):
                amigafuse("umount", str(mnt), timeout=120)
            force_unmount(mnt)


def check_image(image: Path) -> dict[str, list[str]]:
    """Run each engine's own check on every partition of ``image`` (read-only).
    Returns {partition: errors}; empty lists when clean."""
    import trio

    from amigafuse.blockdev.file import FileBlockDevice
    from amigafuse.blockdev.window import PartitionDevice
    from amigafuse.fs import engine_for
    from amigafuse.rdb.scan import scan_device

    async def run() -> dict[str, list[str]]:
        dev = FileBlockDevice(str(image), read_only=True)
        layout = await scan_device(dev)
        out: dict[str, list[str]] = {}
        for part in layout.partitions:
            engine = engine_for(part.dostype)
            if engine is None:
                continue
            window = PartitionDevice(dev, part.first_lba, part.block_count, read_only=True)
            report = await engine.check_volume(window, part.geometry, False)
            out[part.drive_name] = list(report.errors)
        return out

    return trio.run(run)


def make_tree(root: Path, seed: int = 1) -> Path:
    """A small tree of files with awkward sizes and Latin-1 names."""
    import random

    rnd = random.Random(seed)
    root.mkdir(parents=True)
    sizes = [0, 1, 511, 512, 513, 4095, 4096, 65537, 100_000, 1_500_000]
    for i, size in enumerate(sizes):
        (root / f"file{i}.bin").write_bytes(rnd.randbytes(size))
    sub = root / "Ünter Verzeichnis" / "tiefer"
    sub.mkdir(parents=True)
    (sub / "Grüße.txt").write_text("hallo\n" * 100, encoding="utf-8")
    (root / "Ünter Verzeichnis" / "leer").mkdir()
    for i in range(40):
        (root / "Ünter Verzeichnis" / f"n{i:03d}").write_bytes(rnd.randbytes(rnd.randrange(3000)))
    os.utime(root / "file1.bin", ns=(0, 946_684_800_000_000_000))
    return root


def same_tree(a: Path, b: Path) -> None:
    """Assert both trees hold the same names, kinds, bytes and mtimes (to the second)."""
    names_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*"))
    names_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*"))
    assert names_a == names_b
    for rel in names_a:
        pa, pb = a / rel, b / rel
        assert pa.is_dir() == pb.is_dir(), rel
        if pa.is_file():
            assert pa.read_bytes() == pb.read_bytes(), rel
            assert int(pa.stat().st_mtime) == int(pb.stat().st_mtime), rel


def make_two_partition_sfs_disk(path: Path, size_mib: int = 48) -> Path:
    """An RDB disk (rdbtool) with two SFS\\0 partitions DH0 and DH1, each formatted by the
    SFS engine: a writable multi-partition disk."""
    import trio

    from amigafuse.blockdev.file import FileBlockDevice
    from amigafuse.blockdev.window import PartitionDevice
    from amigafuse.fs import engine_for
    from amigafuse.rdb.scan import scan_device

    rdbtool = str(Path(sys.executable).parent / "rdbtool")
    subprocess.run([rdbtool, str(path), "create", f"size={size_mib}M", "+", "init", "+", "add",
                    "size=50%", "name=DH0", "dostype=0x53465300", "+", "add", "size=50%",
                    "name=DH1", "dostype=0x53465300"], check=True, capture_output=True)

    async def fmt() -> None:
        dev = FileBlockDevice(str(path))
        layout = await scan_device(dev)
        for part in layout.partitions:
            engine = engine_for(part.dostype)
            assert engine is not None
            window = PartitionDevice(dev, part.first_lba, part.block_count)
            await engine.format_volume(window, part.geometry, f"Vol{part.drive_name}")
        await dev.flush()

    trio.run(fmt)
    return path


def amitools_read(image: Path, partition: str, amiga_path: str, out: Path) -> bytes:
    """Read a file from an FFS partition with amitools' xdftool (an independent reader)."""
    xdftool = str(Path(sys.executable).parent / "xdftool")
    out.unlink(missing_ok=True)
    subprocess.run([xdftool, str(image), "open", f"part={partition}", "+", "read", amiga_path, str(out)],
                   check=True, capture_output=True)
    return out.read_bytes()
