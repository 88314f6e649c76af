"""The QEMU we start runs as SCHED_BATCH (docs/driver.md: a kick must not let QEMU
preempt us on our CPU), all of its threads; ``sched_batch=False`` leaves it normal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from amigafuse.driver.backends.qtest import QemuDisk, launch_qemu, sched_batch_usable

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]


def _policies(pid: int) -> set[int]:
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize("batch", [True, False])
async def test_qemu_scheduling_policy(tmp_path: Path, batch: bool) -> None:
    if batch and not await sched_batch_usable():
        pytest.skip("chrt --batch does not work here (util-linux missing or policy refused)")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    async with launch_qemu([QemuDisk(image)], sched_batch=batch) as backend:
        await backend.sync()
        assert backend.process is not None
        expected = os.SCHED_BATCH if batch else os.SCHED_OTHER
        assert _policies(backend.process.pid) == {expected}
