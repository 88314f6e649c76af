"""The VirtIO layer and the qtest backend against real QEMU, on both transports."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from amigafuse.driver.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    bit,
)
from tests.driver.conftest import requires_qemu

pytestmark = [pytest.mark.qemu, requires_qemu]

MIB = 1 << 20
INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


async def test_handshake_features_and_inquiry(
    transport: str, scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    path, _ = disk_image(4 * MIB)
    async with scsi_controller([path], transport=transport) as (_backend, ctl):
        assert ctl.transport.kind == transport
        want = bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX)
        assert ctl.features & want == want
        assert bool(ctl.features & bit(VIRTIO_F_VERSION_1)) == (transport == "modern")
        assert ctl.config.cdb_size == 32 and ctl.config.sense_size == 96
        assert ctl.max_target >= 7 and ctl.queue_depth == 16
        assert ctl.max_transfer_bytes == MIB
        status = await ctl.transport.get_status()
        assert status & 0x4  # DRIVER_OK
        result = await ctl.execute(0, 0, INQUIRY, data_in_len=96)
        assert (result.response, result.status) == (0, 0)
        assert result.data[8:16] == b"QEMU    " and b"HARDDISK" in result.data[16:32]
        # no disk at target 5: virtio-scsi BAD_TARGET
        missing = await ctl.execute(5, 0, INQUIRY, data_in_len=96)
        assert missing.response == 3


async def test_reads_match_image(
    transport: str, scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    path, data = disk_image(8 * MIB)
    async with scsi_controller([path], transport=transport) as (_, ctl):
        first = await ctl.execute(0, 0, read10(0, 1), data_in_len=512)
        if first.status == 2:  # the first command after power-on: UNIT ATTENTION 29/00
            assert first.sense[2] & 0xF == 6 and first.sense[12] == 0x29
        for lba, blocks in [(0, 1), (7, 9), (1000, 2048), (16384 - 3, 3)]:
            result = await ctl.execute(0, 0, read10(lba, blocks), data_in_len=blocks * 512)
            assert (result.response, result.status, result.residual) == (0, 0, 0)
            assert result.data == data[lba * 512 : (lba + blocks) * 512]
