"""The driver's public API without QEMU: image checks, Controller over a transport."""

from __future__ import annotations

from pathlib import Path

import pytest

from amigafuse.driver.controller import DiskImage, check_images, open_transport
from amigafuse.errors import DeviceGone, UsageError
from tests.unit.test_scsi_disk import FakeLun, FakeTransport


def test_check_images(tmp_path: Path) -> None:
    good = tmp_path / "a.img"
    good.write_bytes(bytes(8192))
    assert check_images([DiskImage(good)]) == [DiskImage(good)]
    assert len(check_images([DiskImage(good)] * 8)) == 8
    cases = [
        ([], "no disk images"),
        ([DiskImage(good)] * 9, "at most 8"),
        ([DiskImage(tmp_path / "nope.img")], "no such image"),
        ([DiskImage(tmp_path)], "not a regular file"),
        ([DiskImage(good, logical_block_size=2048)], "512 or 4096"),
    ]
    small = tmp_path / "small.img"
    small.write_bytes(bytes(100))
    cases.append(([DiskImage(small)], "smaller than one block"))
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(4096 + 512))
    assert check_images([DiskImage(odd, logical_block_size=4096)])  # the tail is left out
    odd512 = tmp_path / "odd512.img"
    odd512.write_bytes(bytes(4096 + 100))
    cases.append(([DiskImage(odd512)], "not a multiple of 512"))
    for images, words in cases:
        with pytest.raises(UsageError, match=words):
            check_images(images)


async def test_controller_over_a_transport() -> None:
    t = FakeTransport({0: FakeLun(64), 2: FakeLun(32, block_size=4096)})
    async with open_transport(t, name="fake") as ctl:
        assert ctl.transport_name == "fake"
        assert [d.target for d in ctl.disks] == [0, 2]
        await ctl.disks[0].read(0, 4)
        stats = ctl.stats
        assert stats["transport"] == "fake"
        assert stats["disks"]["0:0"]["blocks_read"] == 4
        assert stats["disks"]["2:0"]["unit_attentions"] == 1
        disk = ctl.disks[0]
    # Leaving the context detaches the disks.
    with pytest.raises(DeviceGone, match="closed"):
        await disk.read(0, 1)
