"""Task management on the control queue (queue 0) against real QEMU.

A request that hangs is made with blkdebug's ``break`` (through QMP/HMP ``qemu-io``):
QEMU suspends the read inside its block layer.  The watchdog then sends ABORT TASK for
it; once the read is resumed QEMU completes it as aborted, the caller gets an error
saying it was aborted, and the controller goes on.  If the request never comes back, a
LOGICAL UNIT RESET follows and then DeviceGone: an error, never a hang.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from amigafuse.driver.backends.qtest import QemuDisk, QtestBackend, launch_qemu
from amigafuse.driver.scsi import cdb as C
from amigafuse.driver.virtio.scsi import (
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VirtioScsiController,
    encode_lun,
    open_virtio_scsi,
    tmf_succeeded,
)
from amigafuse.errors import DeviceGone, HardwareError
from tests.driver.conftest import device_for

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]

MIB = 1 << 20


async def _settle(ctl: VirtioScsiController) -> None:
    """Consume the power-on UNIT ATTENTION."""
    for _ in range(3):
        if (await ctl.execute(0, 0, C.test_unit_ready())).status == 0:
            return
    raise AssertionError("TEST UNIT READY never succeeded")


def _image(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(3).randbytes(MIB)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


@asynccontextmanager
async def _breakable(
    tmp_path: Path, transport: str | None = None
) -> AsyncIterator[tuple[QtestBackend, VirtioScsiController, bytes]]:
    """QEMU with one 1 MiB disk behind blkdebug (no errors; ``break`` via QMP), its
    controller with a 1 s watchdog, the power-on UNIT ATTENTION consumed."""
    path, data = _image(tmp_path)
    disk = QemuDisk(path, blkdebug_rules="")  # blkdebug in the chain, no errors
    device = {} if transport is None else {"device": device_for(transport)}
    options = {} if transport is None else {"transport": transport}
    async with (
        launch_qemu([disk], qmp=True, **device) as backend,  # type: ignore[arg-type]
        open_virtio_scsi(backend, request_timeout=1.0, **options) as ctl,  # type: ignore[arg-type]
    ):
        assert backend.qmp is not None
        await _settle(ctl)
        yield backend, ctl, data


@pytest.mark.parametrize("transport", ["legacy", "modern"])
async def test_a_hung_request_is_aborted_and_the_controller_goes_on(
    tmp_path: Path, transport: str
) -> None:
    async with _breakable(tmp_path, transport) as (backend, ctl, data):
        assert backend.qmp is not None
        # A LOGICAL UNIT RESET on an idle LUN is carried out (the control queue works).
        assert tmf_succeeded(
            await ctl.task_management(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, encode_lun(0, 0))
        )
        await _settle(ctl)  # the reset queued a UNIT ATTENTION
        await backend.qmp.hmp('qemu-io vd0 "break read_aio hang"')
        errors: list[BaseException] = []

        async def hung_reader() -> None:
            try:
                await ctl.execute(0, 0, C.read(8, 1), data_in_len=512)
            except HardwareError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hung_reader)
            with trio.fail_after(15):
                while ctl.stats.aborts == 0:
                    await trio.sleep(0.05)
            # The device holds the request (suspended in blkdebug) until we resume it.
            assert not errors
            await backend.qmp.hmp('qemu-io vd0 "resume hang"')
        assert len(errors) == 1
        assert "did not complete within 1 s and was aborted" in str(errors[0])
        assert "SCSI target 0 LUN 0" in str(errors[0])
        assert ctl.stats.aborts == 1 and ctl.stats.lun_resets == 0
        assert ctl.failure is None
        # The controller goes on: reads return the image's bytes.
        result = await ctl.execute(0, 0, C.read(8, 8), data_in_len=4096)
        assert result.status == 0 and result.data == data[8 * 512 : 16 * 512]


async def test_more_hung_requests_than_tmf_buffers(tmp_path: Path) -> None:
    # Six reads hang (one blkdebug breakpoint each: a breakpoint is consumed by the
    # first read that reaches it, so each is set once the previous read is suspended);
    # the watchdog aborts all six through the four TMF buffers (the last two wait for a
    # free one); once resumed, all six fail as aborted and the controller goes on.
    async with _breakable(tmp_path) as (backend, ctl, data):
        assert backend.qmp is not None
        tags = [f"h{i}" for i in range(6)]
        errors: list[BaseException] = []
        completed: list[tuple[int, bytes]] = []

        async def hung_reader(lba: int) -> None:
            try:
                result = await ctl.execute(0, 0, C.read(lba, 1), data_in_len=512)
            except HardwareError as exc:
                errors.append(exc)
            else:
                completed.append((lba, result.data))

        async with trio.open_nursery() as nursery:
            for i, tag in enumerate(tags):
                await backend.qmp.hmp(f'qemu-io vd0 "break read_aio {tag}"')
                nursery.start_soon(hung_reader, 100 + i)
                await trio.testing.wait_all_tasks_blocked()
                # QEMU has processed the kick (and suspended the read) once this
                # round trip on the same socket returns.
                await backend.sync()
            assert ctl.stats.aborts == 0
            with trio.fail_after(15):
                while ctl.stats.aborts < 6:
                    await trio.sleep(0.05)
            await trio.sleep(0.2)
            for tag in tags:
                await backend.qmp.hmp(f'qemu-io vd0 "resume {tag}"')
        # The four reads that got a TMF buffer at once are aborted.  The last two wait
        # for a buffer, which QEMU frees only when an aborted read is let go: on a
        # loaded machine one of them can be resumed and complete before its abort
        # lands, and then it must carry its own block's bytes.
        assert len(errors) + len(completed) == 6
        assert len(errors) >= 4 and all("was aborted" in str(e) for e in errors)
        assert all(got == data[lba * 512 : lba * 512 + 512] for lba, got in completed)
        assert ctl.failure is None and ctl.stats.lun_resets == 0
        result = await ctl.execute(0, 0, C.read(100, 8), data_in_len=4096)
        assert result.status == 0 and result.data == data[100 * 512 : 108 * 512]


async def test_a_hung_request_whose_caller_gave_up_is_aborted_too(tmp_path: Path) -> None:
    # The caller is cancelled while the device holds its request: the slot stays the
    # device's (abandoned); the watchdog aborts it all the same, and once QEMU lets go
    # of it the slot is free again.
    async with _breakable(tmp_path) as (backend, ctl, data):
        assert backend.qmp is not None
        await backend.qmp.hmp('qemu-io vd0 "break read_aio gaveup"')
        with trio.move_on_after(0.3) as scope:
            await ctl.execute(0, 0, C.read(8, 1), data_in_len=512)
        assert scope.cancelled_caught
        with trio.fail_after(15):
            while ctl.stats.aborts == 0:
                await trio.sleep(0.05)
        assert len(ctl._free) == ctl.queue_depth - 1  # still the device's
        await backend.qmp.hmp('qemu-io vd0 "resume gaveup"')
        with trio.fail_after(10):
            while len(ctl._free) != ctl.queue_depth:
                await trio.sleep(0.05)
        assert ctl.failure is None and ctl.stats.lun_resets == 0
        result = await ctl.execute(0, 0, C.read(8, 1), data_in_len=512)
        assert result.status == 0 and result.data == data[8 * 512 : 9 * 512]


async def test_a_request_that_never_returns_ends_in_device_gone(tmp_path: Path) -> None:
    async with _breakable(tmp_path) as (backend, ctl, _):
        assert backend.qmp is not None
        await backend.qmp.hmp('qemu-io vd0 "break read_aio never"')
        with trio.fail_after(20), pytest.raises(DeviceGone) as gone:
            await ctl.execute(0, 0, C.read(8, 1), data_in_len=512)
        assert "ABORT TASK and LOGICAL UNIT RESET did not bring 1 of them back" in str(gone.value)
        assert ctl.stats.aborts == 1 and ctl.stats.lun_resets == 1
        with pytest.raises(DeviceGone):
            await ctl.execute(0, 0, C.read(0, 1), data_in_len=512)
