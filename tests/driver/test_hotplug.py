"""Hot-plug through the event queue (queue 1) against real QEMU, both transports.

QEMU's monitor (QMP ``blockdev-add`` + ``device_add``/``device_del`` of a ``scsi-hd``)
plugs a disk into the running controller and pulls it out again.  The driver hears
VIRTIO_SCSI_T_TRANSPORT_RESET events (RESCAN, REMOVED) on the event queue; the
Controller brings the new target up as a disk, and marks a removed one gone (ENODEV),
while the disk that was there all along keeps working.
"""

from __future__ import annotations

import errno
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from amigafuse.driver.backends.qtest import QemuDisk, launch_qemu
from amigafuse.driver.controller import Controller, open_controller
from amigafuse.driver.virtio.scsi import (
    VIRTIO_SCSI_EVT_RESET_REMOVED,
    VIRTIO_SCSI_T_EVENTS_MISSED,
    VIRTIO_SCSI_T_TRANSPORT_RESET,
    ScsiEvent,
)
from amigafuse.errors import DeviceGone
from tests.driver.conftest import device_for

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]

MIB = 1 << 20


async def _until(controller: Controller, check: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not check():
            await controller.wait_changed()


@pytest.mark.parametrize("transport", ["legacy", "modern"])
async def test_plug_and_unplug_a_disk(tmp_path: Path, transport: str) -> None:
    first = tmp_path / "first.img"
    first_data = random.Random(1).randbytes(MIB)
    first.write_bytes(first_data)
    plugged = tmp_path / "plugged.img"
    plugged_data = random.Random(2).randbytes(2 * MIB)
    plugged.write_bytes(plugged_data)
    async with (
        launch_qemu([QemuDisk(first)], device=device_for(transport), qmp=True) as backend,  # type: ignore[arg-type]
        open_controller(backend, transport=transport) as controller,  # type: ignore[arg-type]
    ):
        qmp = backend.qmp
        assert qmp is not None
        assert [d.target for d in controller.disks] == [0]
        await qmp.execute(
            "blockdev-add",
            {"driver": "raw", "node-name": "hp3",
             "file": {"driver": "file", "filename": str(plugged)}},
        )  # fmt: skip
        await qmp.execute(
            "device_add",
            {"driver": "scsi-hd", "id": "hd3", "drive": "hp3", "bus": "scsi0.0",
             "channel": 0, "scsi-id": 3, "lun": 0},
        )  # fmt: skip
        await _until(controller, lambda: [d.target for d in controller.disks] == [0, 3])
        assert "SCSI target 3 LUN 0 appeared" in controller.changes[-1]
        new = controller.disks[1]
        assert new.block_count == 4096
        assert await new.read(0, 4096) == plugged_data
        # The first disk saw REPORTED LUNS DATA HAS CHANGED (a UNIT ATTENTION, retried).
        assert await controller.disks[0].read(0, 2048) == first_data
        events = list(controller.transport.events)  # type: ignore[attr-defined]
        assert [(e.target, e.lun_number, e.plugged) for e in events] == [(3, 0, True)]

        await qmp.execute("device_del", {"id": "hd3"})
        await _until(controller, lambda: [d.target for d in controller.disks] == [0])
        assert controller.changes[-1] == "SCSI target 3 LUN 0 was removed"
        with pytest.raises(DeviceGone) as gone:
            await new.read(0, 1)
        assert gone.value.errno == errno.ENODEV and "hot-unplugged" in str(gone.value)
        event = controller.transport.events[-1]  # type: ignore[attr-defined]
        assert (event.kind, event.target, event.lun_number, event.reason) == (
            VIRTIO_SCSI_T_TRANSPORT_RESET, 3, 0, VIRTIO_SCSI_EVT_RESET_REMOVED,
        )  # fmt: skip
        assert await controller.disks[0].read(0, 2048) == first_data


def test_event_codec_round_trip() -> None:
    raw = bytes.fromhex("01000080" "0103400500000000" "02000000")
    event = ScsiEvent.unpack(raw)
    assert event.pack() == raw
    assert event.missed and event.kind == VIRTIO_SCSI_T_TRANSPORT_RESET
    assert (event.target, event.lun_number) == (3, 5) and event.unplugged and not event.plugged
    assert event.event & VIRTIO_SCSI_T_EVENTS_MISSED


async def test_a_plugged_target_that_does_not_come_up_is_named_in_failed(tmp_path: Path) -> None:
    first = tmp_path / "first.img"
    first.write_bytes(bytes(MIB))
    empty = tmp_path / "empty.img"
    empty.touch()  # QEMU answers READ CAPACITY with NOT READY 04/03
    async with (
        launch_qemu([QemuDisk(first)], qmp=True) as backend,
        open_controller(backend) as controller,
    ):
        qmp = backend.qmp
        assert qmp is not None
        await qmp.execute(
            "blockdev-add",
            {"driver": "raw", "node-name": "hp5",
             "file": {"driver": "file", "filename": str(empty)}},
        )  # fmt: skip
        await qmp.execute(
            "device_add",
            {"driver": "scsi-hd", "id": "hd5", "drive": "hp5", "bus": "scsi0.0",
             "scsi-id": 5, "lun": 0},
        )  # fmt: skip
        await _until(controller, lambda: bool(controller.failed))
        (failure,) = controller.failed
        assert failure.target == 5 and failure.error.errno == errno.ENOMEDIUM
        assert "appeared but failed" in controller.changes[-1] and "READ CAPACITY" in controller.changes[-1]
        assert [d.target for d in controller.disks] == [0]
        # Unplugged again, it is no longer named.
        await qmp.execute("device_del", {"id": "hd5"})
        with trio.fail_after(10):
            while controller.failed:
                await controller.wait_changed()
