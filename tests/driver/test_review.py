"""Review of today's driver changes against real QEMU: callers cancelled after their
request was published (at once, with others in flight) leave the DMA slot owned by the
device until it completes; afterwards every slot is free again and later reads at depth
16 return the image's bytes (no completion delivered to the wrong caller)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from amigafuse.driver.scsi import cdb as C
from amigafuse.driver.virtio.scsi import _ABANDONED, _IN_FLIGHT, VirtioScsiController

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]


async def _read(ctl: VirtioScsiController, lba: int) -> None:
    await ctl.execute(0, 0, C.read(lba, 16), data_in_len=16 * 512)


async def test_cancelled_callers_after_publish_free_their_slots(
    scsi_controller: Callable[..., Any],
    disk_image: Callable[..., tuple[Path, bytes]],
    transport: str,
) -> None:
    path, data = disk_image(1 << 20)
    rng = random.Random(5)
    async with scsi_controller([path], transport=transport) as (_backend, ctl):
        for _ in range(3):
            if (await ctl.execute(0, 0, C.test_unit_ready())).status == 0:
                break
        depth = ctl.queue_depth
        # Rounds of ``depth`` reads cancelled a few yields in, until some caller was
        # cancelled while QEMU still held its request (counted when that completion
        # arrives; on a quiet machine QEMU may finish a whole round first).
        for _round in range(500):
            async with trio.open_nursery() as nursery:
                for _ in range(depth):
                    nursery.start_soon(_read, ctl, rng.randrange(0, (1 << 20) // 512 - 16))
                for _ in range(rng.randrange(1, 6)):
                    await trio.sleep(0)
                    if any(slot.state == _IN_FLIGHT for slot in ctl._slots):
                        break
                nursery.cancel_scope.cancel()
            if any(slot.state == _ABANDONED for slot in ctl._slots) or ctl.stats.abandoned:
                break
        # Abandoned slots come back as QEMU completes them.
        with trio.fail_after(10):
            while len(ctl._free) < depth:
                await trio.sleep(0.01)
        assert ctl.stats.abandoned > 0, "no caller was cancelled with its request in the device"
        assert len(ctl._free) == depth
        results: dict[int, bytes] = {}

        async def reader(lba: int) -> None:
            result = await ctl.execute(0, 0, C.read(lba, 16), data_in_len=16 * 512)
            assert result.status == 0
            results[lba] = result.data

        async with trio.open_nursery() as nursery:
            for i in range(4 * depth):
                nursery.start_soon(reader, i * 16)
        for lba, got in results.items():
            assert got == data[lba * 512 : (lba + 16) * 512], f"wrong bytes at LBA {lba}"
        assert len(results) == 4 * depth
        assert len(ctl._free) == depth
