"""The scan goes on past targets that do not come up (real QEMU, both transports).

Three ways a target fails, each the real thing in QEMU 7.2:

* a zero-length image: INQUIRY and TEST UNIT READY work, READ CAPACITY answers NOT READY
  04/03 (QEMU has no medium size);
* a removable ``scsi-hd`` with an empty drive: NOT READY 3A/00 "medium not present" to
  everything after INQUIRY, for ever (a CHECK CONDITION that does not go away);
* a blkdebug image that fails every read of sector 0: it comes up (bring-up reads no
  medium), and then its block 0 gives an error; the other disks are untouched.

The good disks around them come up and read back their bytes.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from amigafuse.driver.backends.qtest import QemuDisk, launch_qemu
from amigafuse.driver.controller import open_controller
from amigafuse.errors import DeviceError, NoMedium
from tests.driver.conftest import device_for

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]

MIB = 1 << 20


@pytest.mark.parametrize("transport", ["legacy", "modern"])
async def test_scan_reports_failed_targets_and_brings_up_the_others(
    tmp_path: Path, transport: str, disk_image: Callable[..., tuple[Path, bytes]]
) -> None:
    good0, data0 = disk_image(MIB)
    good4, data4 = disk_image(2 * MIB)
    bad_reads, data3 = disk_image(MIB)
    empty = tmp_path / "empty.img"
    empty.touch()
    disks = [
        QemuDisk(good0),  # target 0
        QemuDisk(empty),  # target 1: READ CAPACITY fails
        QemuDisk("-", no_medium=True),  # target 2: NOT READY 3A/00 for ever
        QemuDisk(bad_reads, blkdebug_errors=[("read_aio", 0, errno.EIO)]),  # target 3
        QemuDisk(good4),  # target 4
    ]
    async with (
        launch_qemu(disks, device=device_for(transport)) as backend,  # type: ignore[arg-type]
        open_controller(backend, transport=transport) as controller,  # type: ignore[arg-type]
    ):
        assert [d.target for d in controller.disks] == [0, 3, 4]
        assert [d.block_count for d in controller.disks] == [2048, 2048, 4096]
        failed = {f.target: f for f in controller.failed}
        assert sorted(failed) == [1, 2]
        assert isinstance(failed[1].error, NoMedium)
        assert "SCSI target 1" in failed[1].message and "READ CAPACITY" in failed[1].message
        assert "04/03" in failed[1].message
        assert isinstance(failed[2].error, NoMedium)
        assert failed[2].error.errno == errno.ENOMEDIUM
        assert "SCSI target 2" in failed[2].message and "medium not present" in failed[2].message
        assert "TEST UNIT READY" in failed[2].message

        d0, d3, d4 = controller.disks
        assert await d0.read(0, 2048) == data0
        assert await d4.read(0, 4096) == data4
        # Target 3 came up; its sector 0 fails, on every try, and only there.
        for _ in range(2):
            with pytest.raises(DeviceError) as ei:
                await d3.read(0, 1)
            assert ei.value.errno == errno.EIO and "SCSI target 3" in str(ei.value)
        assert await d3.read(1, 2047) == data3[512:]
        # The failures touched nothing else: the good disks still read and write.
        await d0.write(5, b"z" * 512)
        assert await d0.read(5, 1) == b"z" * 512
