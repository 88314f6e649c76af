"""Shared test fixtures: paths to the shared real images, and tool availability."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Shared machines are slow and noisy: no per-example deadlines.  CI runs a moderate
# number of examples; HYPOTHESIS_PROFILE=thorough for long local runs.
settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parent.parent
SHARED_IMAGES = REPO.parent / "shared" / "images"
REAL = SHARED_IMAGES / "real"
HANDLER = SHARED_IMAGES / "handler"
CACHE = REPO / "cache"


def content(seed: str, size: int) -> bytes:
    """``size`` deterministic pseudo-random bytes named by ``seed`` (test file contents)."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{i}".encode()).digest()
        i += 1
    return bytes(out[:size])


def shared_image(relpath: str) -> Path:
    """Path to ``shared/images/<relpath>``; a ``.gz`` is unpacked once into ``cache/``.

    Skips the test (with the reason) when shared/ is absent, as on a user's machine
    that has only the repository; CI always has it.
    """
    src = SHARED_IMAGES / relpath
    if not src.exists():
        pytest.skip(f"shared test image {src} is not present (shared/ is beside the repo in CI)")
    if src.suffix != ".gz":
        return src
    CACHE.mkdir(exist_ok=True)
    dst = CACHE / src.name[: -len(".gz")]
    if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
        tmp = dst.with_suffix(".tmp")
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        tmp.replace(dst)
    return dst


@pytest.fixture
def image_copy(tmp_path: Path):  # type: ignore[no-untyped-def]
    """``image_copy("handler/x.hdf.gz")`` -> a writable private copy of a shared image."""

    def make(relpath: str) -> Path:
        src = shared_image(relpath)
        dst = tmp_path / src.name
        shutil.copyfile(src, dst)
        return dst

    return make


@dataclass
class UserQemu:
    """A QEMU started the way a user would for ``qemu:SOCKET,SHM`` sources: a q35 machine
    with its RAM in a shared file, a qtest socket, one virtio-scsi controller."""

    proc: subprocess.Popen[bytes]
    socket: Path
    shm: Path

    @property
    def source(self) -> str:
        """The SOURCE argument for amigafuse: ``qemu:SOCKET,SHM``."""
        return f"qemu:{self.socket},{self.shm}"

    def running(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def user_qemu(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """``user_qemu(image, read_only=False)`` -> a running :class:`UserQemu` with ``image``
    as SCSI target 0; stopped and its shared-memory file removed afterwards."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    started: list[UserQemu] = []

    def start(image: Path, read_only: bool = False) -> UserQemu:
        shm = Path("/dev/shm") / f"amigafuse-test-{uuid.uuid4().hex}"
        sock = tmp_path / f"qtest{len(started)}.sock"
        drive = f"file={image},if=none,id=vd0,format=raw" + (",readonly=on" if read_only else "")
        cmd = [
            "qemu-system-x86_64", "-M", "q35,memory-backend=mem", "-m", "64M",
            "-object", f"memory-backend-file,id=mem,size=64M,mem-path={shm},share=on",
            "-accel", "tcg", "-S", "-qtest", f"unix:{sock},server=on,wait=off",
            "-qtest-log", "/dev/null", "-display", "none", "-nodefaults",
            "-device", "virtio-scsi-pci,id=scsi0,addr=04.0",
            "-drive", drive,
            "-device", "scsi-hd,drive=vd0,bus=scsi0.0,channel=0,scsi-id=0,lun=0",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        q = UserQemu(proc, sock, shm)
        started.append(q)
        deadline = time.monotonic() + 30
        while not (sock.exists() and shm.exists()):
            if proc.poll() is not None:
                raise AssertionError(f"QEMU exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise AssertionError("QEMU did not create its qtest socket and memory file in 30 s")
            time.sleep(0.05)
        return q

    try:
        yield start
    finally:
        for q in started:
            q.proc.terminate()
            try:
                q.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                q.proc.kill()
                q.proc.wait()
            if q.proc.stderr is not None:
                q.proc.stderr.close()
            if q.shm.exists():
                os.unlink(q.shm)
