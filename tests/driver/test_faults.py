"""Faults against real QEMU: injected media errors (blkdebug) and QEMU dying mid-I/O."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Literal

import pytest
import trio

from amigafuse.driver import DiskImage, open_qemu
from amigafuse.driver.controller import open_controller
from amigafuse.errors import DeviceError, DeviceGone, MediumError

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]

TRANSPORTS = ["legacy", "modern"]
MIB = 1 << 20


def qemu_pids_using(token: str) -> list[int]:
    """PIDs of qemu-system processes whose command line mentions ``token`` (our tmp path:
    only QEMUs this test started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and token in cmdline:
            pids.append(int(entry))
    return pids


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "errno_value,what", [(61, "unrecovered read error"), (5, "I/O process terminated")]
)
async def test_injected_media_error_fails_only_that_request(
    tmp_path: Path, transport: str, errno_value: int, what: str
) -> None:
    from amigafuse.driver.backends.qtest import QemuDisk, launch_qemu

    img = tmp_path / "bad.img"
    original = random.Random(7).randbytes(4 * MIB)
    img.write_bytes(original)
    bad_lba = 2048
    disk_spec = QemuDisk(
        path=str(img),
        read_only=False,
        logical_block_size=512,
        blkdebug_errors=[("read_aio", bad_lba, errno_value)],
    )
    device: Literal["transitional", "modern"] = (
        "modern" if transport == "modern" else "transitional"
    )
    async with (
        launch_qemu([disk_spec], device=device) as backend,
        open_controller(backend, transport=transport) as ctl,  # type: ignore[arg-type]
    ):
        (disk,) = ctl.disks
        results: dict[int, object] = {}

        async def read(lba: int) -> None:
            try:
                results[lba] = await disk.read(lba, 8)
            except DeviceError as exc:
                results[lba] = exc

        lbas = [bad_lba - 8, bad_lba, bad_lba + 8, 0, 4000]
        async with trio.open_nursery() as n:
            for lba in lbas:
                n.start_soon(read, lba)
        bad = results[bad_lba]
        assert isinstance(bad, MediumError) and bad.errno == errno.EIO
        assert what in str(bad) and f"blocks {bad_lba}..{bad_lba + 7}" in str(bad)
        for lba in lbas:
            if lba != bad_lba:
                assert results[lba] == original[lba * 512 : (lba + 8) * 512]
        # The disk stays usable: the error was that request's only.
        assert await disk.read(0, 1) == original[:512]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_qemu_killed_mid_io_gives_device_gone(tmp_path: Path, transport: str) -> None:
    img = tmp_path / "victim.img"
    img.write_bytes(bytes(8 * MIB))
    outcomes: list[BaseException | None] = []
    async with open_qemu([DiskImage(img)], transport=transport) as ctl:  # type: ignore[arg-type]
        (disk,) = ctl.disks
        pids = qemu_pids_using(str(tmp_path))
        assert len(pids) == 1

        async def hammer(slot: int) -> None:
            rng = random.Random(slot)
            try:
                while True:
                    lba = rng.randrange(disk.block_count - 64)
                    if slot % 2:
                        await disk.write(lba, bytes(64 * 512))
                    else:
                        await disk.read(lba, 64)
            except DeviceGone as exc:
                outcomes.append(exc)

        with trio.fail_after(30):  # a hang guard, not a speed assertion
            async with trio.open_nursery() as n:
                for slot in range(16):
                    n.start_soon(hammer, slot)
                await trio.sleep(0.3)
                os.kill(pids[0], signal.SIGKILL)
        assert len(outcomes) == 16
        with pytest.raises(DeviceGone):
            await disk.read(0, 1)
        with pytest.raises(DeviceGone):
            await disk.flush()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_injected_write_error_fails_only_that_request(tmp_path: Path, transport: str) -> None:
    from amigafuse.driver.backends.qtest import QemuDisk, launch_qemu

    img = tmp_path / "wbad.img"
    img.write_bytes(bytes(2 * MIB))
    bad_lba = 1000
    device: Literal["transitional", "modern"] = (
        "modern" if transport == "modern" else "transitional"
    )
    spec = QemuDisk(path=str(img), blkdebug_errors=[("write_aio", bad_lba, errno.EIO)])
    async with (
        launch_qemu([spec], device=device) as backend,
        open_controller(backend, transport=transport) as ctl,  # type: ignore[arg-type]
    ):
        (disk,) = ctl.disks
        with pytest.raises(MediumError) as exc:
            await disk.write(bad_lba - 2, b"\x11" * 4 * 512)
        assert exc.value.errno == errno.EIO and "WRITE(10)" in str(exc.value)
        await disk.write(bad_lba + 8, b"\x22" * 512)  # a neighbour still works
        await disk.flush()
        assert await disk.read(bad_lba + 8, 1) == b"\x22" * 512
    with open(img, "rb") as f:
        f.seek((bad_lba + 8) * 512)
        assert f.read(512) == b"\x22" * 512
