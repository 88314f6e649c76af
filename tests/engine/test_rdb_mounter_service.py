"""The async mounter service: concurrent scans, deterministic order and names."""

from __future__ import annotations

import trio

from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.errors import MediumError
from amigafuse.rdb.mounter import Announcement, UnitFailed, Withdrawal, open_mounter
from amigafuse.rdb.writer import PartitionSpec, plan_disk, write_rdb

DOS3 = 0x444F5303


class SlowDevice(MemoryBlockDevice):
    """Each read sleeps ``delay`` seconds (so later units can finish scanning first)."""

    def __init__(self, block_count: int, delay: float, fail: bool = False) -> None:
        super().__init__(block_count)
        self.delay = delay
        self.fail = fail

    async def read(self, lba: int, count: int) -> bytes:
        await trio.sleep(self.delay)
        if self.fail:
            raise MediumError("medium error")
        return await super().read(lba, count)


async def make_disk(names: list[str], delay: float, fail: bool = False) -> SlowDevice:
    dev = SlowDevice(8 << 11, delay, fail)
    plan = plan_disk(8 << 20, [PartitionSpec(n, DOS3, 2 << 20) for n in names])
    await write_rdb(dev, plan)
    for p in plan.partitions:
        await dev.write(p.first_lba, b"DOS\x03" + bytes(508))
    return dev


async def test_units_are_announced_in_found_order_whatever_scan_order() -> None:
    slow = await make_disk(["DH0", "WORK"], delay=0.05)
    fast = await make_disk(["DH0"], delay=0.0)
    broken = await make_disk(["X"], delay=0.0, fail=True)
    events: list[Announcement | Withdrawal | UnitFailed] = []
    async with open_mounter(lambda d: "ffs") as svc:
        svc.unit_found("slow", slow)
        svc.unit_found("broken", broken)
        svc.unit_found("fast", fast)
        for _ in range(4):
            events.append(await svc.events.receive())
        await svc.unit_lost("slow")
        events += [await svc.events.receive(), await svc.events.receive()]
        # Found again: DH0 was freed by the withdrawal ('fast' keeps DH0.1).
        svc.unit_found("slow", slow)
        events += [await svc.events.receive(), await svc.events.receive()]
    summary = [(type(e).__name__, e.unit, getattr(e, "dos_name", None)) for e in events]
    assert summary == [
        ("Announcement", "slow", "DH0"),
        ("Announcement", "slow", "WORK"),
        ("UnitFailed", "broken", None),
        ("Announcement", "fast", "DH0.1"),
        ("Withdrawal", "slow", "DH0"),
        ("Withdrawal", "slow", "WORK"),
        ("Announcement", "slow", "DH0"),
        ("Announcement", "slow", "WORK"),
    ]
    first = events[0]
    assert isinstance(first, Announcement) and first.mountable
    assert (await first.open_device().read(0, 1))[:4] == b"DOS\x03"


async def test_unit_lost_while_scanning_is_never_announced() -> None:
    slow = await make_disk(["DH0"], delay=0.02)
    async with open_mounter(lambda d: "ffs") as svc:
        svc.unit_found("u", slow)
        await svc.unit_lost("u")
    assert svc.mounter.units == []
    async with svc.events:
        remaining = [e async for e in svc.events]
    assert remaining == []
