"""Zero-copy reads against real QEMU (both transports): ``ScsiDisk.read_lease`` hands
out the request's DMA buffer, which stays withheld from the device until the lease is
released; the bytes are the image's; stale releases, cancelled callers and device
errors leave every slot free again."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from amigafuse.driver import DiskImage, open_qemu
from amigafuse.driver.scsi.disk import ScsiDisk
from amigafuse.driver.virtio.scsi import VirtioScsiController
from tests.driver.conftest import TRANSPORTS, requires_qemu

pytestmark = [pytest.mark.qemu, requires_qemu]

MIB = 1 << 20


def _controller(disk: ScsiDisk) -> VirtioScsiController:
    ctl = disk._transport
    assert isinstance(ctl, VirtioScsiController)
    return ctl


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_leases_are_the_images_bytes_and_hold_their_slot(
    disk_image: Callable[..., tuple[Path, bytes]], transport: str
) -> None:
    path, data = disk_image(8 * MIB)
    async with open_qemu([DiskImage(path)], transport=transport) as ctl:  # type: ignore[arg-type]
        (disk,) = ctl.disks
        vctl = _controller(disk)
        depth = vctl.queue_depth
        assert len(vctl._free) == depth
        step = disk.max_transfer_blocks
        # one lease per slot, each one full transfer: every slot lent out
        leases = [await disk.read_lease(i * 64, step) for i in range(depth)]
        assert all(lease.lent for lease in leases)
        assert len(vctl._free) == 0
        for i, lease in enumerate(leases):
            assert lease.view == data[i * 64 * 512 : (i * 64 + step) * 512], i
        # a further read must wait for a slot: it cannot finish before a release
        done = trio.Event()
        got: list[bytes] = []

        async def late() -> None:
            got.append(bytes(await disk.read(5, 3)))
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(late)
            with trio.move_on_after(0.3):
                await done.wait()
            assert not done.is_set(), "a read went to the device with every slot lent"
            leases[0].release()
            leases[0].release()  # idempotent
            await done.wait()
        assert got == [data[5 * 512 : 8 * 512]]
        # the other leases were not disturbed by the slot's reuse
        for i, lease in enumerate(leases[1:], 1):
            assert lease.view == data[i * 64 * 512 : (i * 64 + step) * 512], i
            lease.release()
        assert len(vctl._free) == depth
        assert vctl.stats.lent == depth


async def test_a_stale_release_does_not_free_a_reused_slot(
    disk_image: Callable[..., tuple[Path, bytes]]
) -> None:
    path, data = disk_image(4 * MIB)
    async with open_qemu([DiskImage(path)]) as ctl:
        (disk,) = ctl.disks
        vctl = _controller(disk)
        depth = vctl.queue_depth
        first = await disk.read_lease(0, 8)
        stale_release = first._release
        assert stale_release is not None
        first.release()
        # take every slot, so the one just freed is certainly reused
        leases = [await disk.read_lease(100 + i * 8, 8) for i in range(depth)]
        assert len(vctl._free) == 0
        stale_release()  # names the earlier tag: ignored
        assert len(vctl._free) == 0
        for i, lease in enumerate(leases):
            assert lease.view == data[(100 + i * 8) * 512 : (108 + i * 8) * 512]
            lease.release()
        assert len(vctl._free) == depth


async def test_concurrent_readers_and_cancelled_ones_leave_every_slot_free(
    disk_image: Callable[..., tuple[Path, bytes]]
) -> None:
    """Many tasks take leases at random places while others are cancelled at random
    points (in flight, or holding a lease they release in ``finally``); every lease
    holds the image's bytes and, at the end, every slot is free."""
    path, data = disk_image(16 * MIB)
    rng = random.Random(5)
    async with open_qemu([DiskImage(path)]) as ctl:
        (disk,) = ctl.disks
        vctl = _controller(disk)
        blocks = disk.block_count
        checked = [0]

        async def reader(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(20):
                count = r.choice([1, 8, 128, 2048])
                lba = r.randrange(0, blocks - count)
                with await disk.read_lease(lba, count) as lease:
                    assert lease.view == data[lba * 512 : (lba + count) * 512]
                    checked[0] += 1
                    await trio.sleep(0)  # others run while this one holds its slot

        async def cancelled(seed: int) -> None:
            r = random.Random(seed)
            with trio.move_on_after(r.random() * 0.005):
                while True:
                    with await disk.read_lease(r.randrange(0, blocks - 256), 256):
                        await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(reader, rng.randrange(1 << 30))
            for _ in range(12):
                nursery.start_soon(cancelled, rng.randrange(1 << 30))
        assert checked[0] == 12 * 20
        # abandoned requests come back through the completion path: wait for them
        with trio.fail_after(30):
            while len(vctl._free) < vctl.queue_depth:
                await trio.sleep(0.01)
        assert await disk.read(0, 4) == data[: 4 * 512]


async def test_a_media_error_and_large_reads_come_back_as_errors_or_copies(
    tmp_path: Path,
) -> None:
    """A read the device fails (blkdebug: EIO at one sector) raises MediumError through
    read_lease and gives its slot back; one larger than a transfer is split and copied;
    the lent reads around them are the image's bytes."""
    import errno

    from amigafuse.driver.backends.qtest import QemuDisk, launch_qemu
    from amigafuse.driver.controller import open_controller
    from amigafuse.errors import MediumError

    img = tmp_path / "bad.img"
    data = random.Random(9).randbytes(8 * MIB)
    img.write_bytes(data)
    bad_lba = 4096
    spec = QemuDisk(path=str(img), blkdebug_errors=[("read_aio", bad_lba, errno.EIO)])
    async with (
        launch_qemu([spec], device="transitional") as backend,
        open_controller(backend) as ctl,
    ):
        (disk,) = ctl.disks
        vctl = _controller(disk)
        with pytest.raises(MediumError) as exc:
            await disk.read_lease(bad_lba - 4, 8)
        assert exc.value.errno == errno.EIO
        assert len(vctl._free) == vctl.queue_depth
        with await disk.read_lease(bad_lba - 16, 8) as lease:
            assert lease.lent
            assert lease.view == data[(bad_lba - 16) * 512 : (bad_lba - 8) * 512]
        count = disk.max_transfer_blocks * 3
        start = bad_lba + 16
        with await disk.read_lease(start, count) as lease:
            assert not lease.lent
            assert lease.view == data[start * 512 : (start + count) * 512]
        with await disk.read_lease(10, 0) as lease:
            assert len(lease.view) == 0
        assert len(vctl._free) == vctl.queue_depth


def test_scsi_command_result_stays_compatible() -> None:
    from amigafuse.driver.scsi.transport import ScsiCommandResult

    result: Any = ScsiCommandResult(0, 0, b"", b"abc", 0)
    assert result.lent is None and result.release is None
