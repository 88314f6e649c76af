"""Fixtures for driver tests against real QEMU.

* ``transport``: parametrized over "legacy" (transitional ``virtio-scsi-pci``, device
  0x1004, legacy I/O-port interface) and "modern" (``virtio-scsi-pci-non-transitional``,
  0x1048, capabilities + MMIO); ``device_for(transport)`` is the QEMU device kind.
* ``disk_image(size_bytes, seed=...)``: a file of random bytes in tmp_path, returns
  (path, content).
* ``scsi_controller(disks, transport=..., **kw)``: async context manager that launches
  QEMU with ``disks`` (QemuDisk or paths) and yields (backend, VirtioScsiController).
"""

from __future__ import annotations

import contextlib
import random
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from amigafuse.driver.backends.qtest import QemuDisk, QtestBackend, launch_qemu
from amigafuse.driver.virtio.scsi import VirtioScsiController, open_virtio_scsi

requires_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86_64 not installed (apt-get install qemu-system-x86)",
)

TRANSPORTS = ("legacy", "modern")


def device_for(transport: str) -> str:
    """The QEMU device kind that offers ``transport``."""
    return "modern" if transport == "modern" else "transitional"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def disk_image(tmp_path: Path) -> Callable[..., tuple[Path, bytes]]:
    counter = [0]

    def make(
        size_bytes: int, seed: int | None = None, name: str | None = None
    ) -> tuple[Path, bytes]:
        counter[0] += 1
        data = random.Random(counter[0] if seed is None else seed).randbytes(size_bytes)
        path = tmp_path / (name or f"disk{counter[0]}.img")
        path.write_bytes(data)
        return path, data

    return make


@contextlib.asynccontextmanager
async def _scsi_controller(
    disks: Sequence[QemuDisk | Path | str],
    *,
    transport: str = "auto",
    device: str | None = None,
    ram_mib: int = 96,
    **controller_kw: Any,
) -> AsyncIterator[tuple[QtestBackend, VirtioScsiController]]:
    specs = [d if isinstance(d, QemuDisk) else QemuDisk(d) for d in disks]
    kind = device or device_for(transport)
    async with (
        launch_qemu(specs, device=kind, ram_mib=ram_mib) as backend,  # type: ignore[arg-type]
        open_virtio_scsi(backend, transport=transport, **controller_kw) as controller,  # type: ignore[arg-type]
    ):
        yield backend, controller


@pytest.fixture
def scsi_controller() -> Callable[..., Any]:
    return _scsi_controller
