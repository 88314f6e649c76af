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
