"""ScsiDisk logic (retries, splitting, concurrency, error mapping) on an in-memory target.

The real thing is tested in tests/driver against QEMU.  This fake target exists for what
QEMU cannot be made to do on demand: BUSY, RESET, NOT READY becoming ready, short data,
a capacity change, garbage responses; and for hypothesis-driven operation sequences
against a model.  It implements the ScsiTransport protocol from the seam module.
"""

from __future__ import annotations

import errno
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from amigafuse.driver.scsi import cdb as C
from amigafuse.driver.scsi import sense as S
from amigafuse.driver.scsi import transport as vt
from amigafuse.driver.scsi.disk import RETRY_LIMIT, ScsiDisk, scan, scan_targets
from amigafuse.errors import (
    DeviceGone,
    DiskChanged,
    HardwareError,
    MediumError,
    NoMedium,
    OutOfRange,
    WriteProtected,
)

Hook = Callable[[int, bytes], vt.ScsiCommandResult | None]


def _ok(data: bytes = b"") -> vt.ScsiCommandResult:
    return vt.ScsiCommandResult(0, 0, b"", data, 0)


def _check(key: int, asc: int, ascq: int) -> vt.ScsiCommandResult:
    return vt.ScsiCommandResult(
        0, S.STATUS_CHECK_CONDITION, S.pack_fixed_sense(key, asc, ascq), b"", 0
    )


@dataclass
class FakeLun:
    blocks: int
    block_size: int = 512
    write_protected: bool = False
    unit_attention: tuple[int, int] | None = (0x29, 0x00)
    data: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        if not self.data:
            self.data = bytearray(self.blocks * self.block_size)


class FakeTransport:
    """A virtio-scsi controller with disks in memory; SPC/SBC semantics as QEMU has them."""

    def __init__(self, luns: dict[int, FakeLun], *, max_transfer_bytes: int = 64 * 1024) -> None:
        self.luns = luns
        self._max_transfer = max_transfer_bytes
        self.hooks: list[Hook] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.log: list[tuple[int, bytes]] = []
        self.dead = False
        self.rng = random.Random(1)

    max_target = 255
    max_lun = 0
    queue_depth = 16

    @property
    def max_transfer_bytes(self) -> int:
        return self._max_transfer

    async def execute(
        self,
        target: int,
        lun: int,
        cdb: bytes,
        *,
        data_out: bytes | bytearray | memoryview | None = None,
        data_in_len: int = 0,
    ) -> vt.ScsiCommandResult:
        if self.dead:
            raise DeviceGone("QEMU exited")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.log.append((target, bytes(cdb)))
            out = bytes(data_out) if data_out is not None else None
            # Let other tasks run, in a random order, as completions would.
            for _ in range(self.rng.randrange(3)):
                await trio.lowlevel.checkpoint()
            if self.dead:
                raise DeviceGone("QEMU exited")
            for hook in list(self.hooks):
                injected = hook(target, bytes(cdb))
                if injected is not None:
                    return injected
            result = self._run(target, bytes(cdb), out)
            data = result.data[:data_in_len]
            return vt.ScsiCommandResult(
                result.response, result.status, result.sense, data, data_in_len - len(data)
            )
        finally:
            self.in_flight -= 1

    def _run(self, target: int, cdb: bytes, out: bytes | None) -> vt.ScsiCommandResult:
        lun = self.luns.get(target)
        if lun is None:
            return vt.ScsiCommandResult(vt.VIRTIO_SCSI_S_BAD_TARGET, 0, b"", b"", 0)
        op = cdb[0]
        if op == C.INQUIRY:
            if cdb[1] & 1:
                page = cdb[2]
                if page == 0:
                    return _ok(C.pack_vpd_page(0, bytes([0, 0x80, 0x83])))
                if page == 0x80:
                    return _ok(C.pack_vpd_page(0x80, f"SER{target}".encode()))
                if page == 0x83:
                    d = C.Designator(0, C.CODE_SET_ASCII, False, 0, 0, f"fake-{target}".encode())
                    return _ok(C.pack_vpd_page(0x83, d.pack()))
                return _check(S.ILLEGAL_REQUEST, 0x24, 0)
            return _ok(bytes.fromhex("00 00 05 12 1f 00 00 12") + b"FAKE    MEMDISK         1.0 ")
        if lun.unit_attention is not None:
            asc, ascq = lun.unit_attention
            lun.unit_attention = None
            return _check(S.UNIT_ATTENTION, asc, ascq)
        if op == C.TEST_UNIT_READY:
            return _ok()
        if op == C.READ_CAPACITY_10:
            return _ok(C.Capacity(lun.blocks - 1, lun.block_size).pack10())
        if op == C.SERVICE_ACTION_IN_16:
            return _ok(C.Capacity(lun.blocks - 1, lun.block_size).pack16())
        if op == C.MODE_SENSE_6:
            return _ok(C.ModeParameterHeader6(3, 0, 0x80 if lun.write_protected else 0, 0).pack())
        if op in (C.SYNCHRONIZE_CACHE_10, C.SYNCHRONIZE_CACHE_16):
            return _ok()
        if op in (C.READ_10, C.READ_16, C.WRITE_10, C.WRITE_16):
            rw = C.parse_read_write(cdb)
            if rw.lba + rw.count > lun.blocks:
                return _check(S.ILLEGAL_REQUEST, 0x21, 0)
            lo, hi = rw.lba * lun.block_size, (rw.lba + rw.count) * lun.block_size
            if rw.write:
                if lun.write_protected:
                    return _check(S.DATA_PROTECT, 0x27, 0)
                assert out is not None and len(out) == hi - lo
                lun.data[lo:hi] = out
                return _ok()
            return _ok(bytes(lun.data[lo:hi]))
        return _check(S.ILLEGAL_REQUEST, 0x20, 0)


async def _one_disk(**kw: object) -> tuple[FakeTransport, ScsiDisk]:
    max_transfer = int(kw.pop("max_transfer_bytes", 64 * 1024))  # type: ignore[call-overload]
    t = FakeTransport({0: FakeLun(**kw)}, max_transfer_bytes=max_transfer)  # type: ignore[arg-type]
    disks = await scan(t)
    assert len(disks) == 1
    return t, disks[0]


async def test_scan_and_open() -> None:
    t = FakeTransport({0: FakeLun(100), 3: FakeLun(50, block_size=4096, write_protected=True)})
    disks = await scan(t)
    assert [(d.target, d.block_count, d.block_size, d.read_only) for d in disks] == [
        (0, 100, 512, False),
        (3, 50, 4096, True),
    ]
    info = disks[1].info
    assert (info.vendor, info.product, info.revision, info.serial) == (
        "FAKE",
        "MEMDISK",
        "1.0",
        "SER3",
    )
    assert "write-protected" in info.description and "target 3" in info.description
    assert disks[1].identifiers[0].text == "fake-3"
    # The power-on UNIT ATTENTION of each LUN was retried, once.
    assert disks[0].stats.unit_attentions == 1 and disks[0].stats.unit_attention_codes == [
        (0x29, 0)
    ]
    # Only targets 0..7 are probed.
    assert max(target for target, _ in t.log) == 7


async def test_read_capacity_16_used_past_2tib() -> None:
    blocks = (3 << 40) // 512
    t = FakeTransport({0: FakeLun(1, unit_attention=None)})
    t.luns[0].blocks = blocks  # capacity only; data stays tiny and is never touched
    disk = (await scan(t))[0]
    assert disk.block_count == blocks
    ops = [cdb[0] for _, cdb in t.log]
    assert C.READ_CAPACITY_10 in ops and C.SERVICE_ACTION_IN_16 in ops


async def test_round_trip_and_split_concurrent() -> None:
    t, disk = await _one_disk(blocks=4096, max_transfer_bytes=4096)
    payload = bytes(random.Random(5).randbytes(1000 * 512))
    await disk.write(17, payload)
    assert t.luns[0].data[17 * 512 : 17 * 512 + len(payload)] == payload
    assert await disk.read(17, 1000) == payload
    # 1000 blocks in 8-block chunks: 125 commands, at most 16 of them at once.
    reads = [c for _, c in t.log if c[0] == C.READ_10]
    assert len(reads) == 125 and all(C.parse_read_write(c).count <= 8 for c in reads)
    assert 1 < t.max_in_flight <= 16
    assert disk.stats.blocks_read == 1000 and disk.stats.blocks_written == 1000


async def test_split_failure_raises_the_device_error_itself() -> None:
    t, disk = await _one_disk(blocks=4096, max_transfer_bytes=4096)

    def bad_chunk(target: int, cdb: bytes) -> vt.ScsiCommandResult | None:
        if cdb[0] == C.READ_10 and C.parse_read_write(cdb).lba == 64:
            return _check(S.MEDIUM_ERROR, 0x11, 0)
        return None

    t.hooks.append(bad_chunk)
    with pytest.raises(MediumError, match=r"READ\(10\) of blocks 64\.\.71"):
        await disk.read(0, 512)
    # The neighbours still read fine.
    assert len(await disk.read(0, 64)) == 64 * 512


async def test_errors_map_and_range_checks() -> None:
    t, disk = await _one_disk(blocks=64)
    with pytest.raises(OutOfRange):
        await disk.read(60, 5)
    with pytest.raises(ValueError):
        await disk.write(0, b"x" * 100)
    t.luns[0].write_protected = True
    # The disk believed it writable at open; the device's DATA PROTECT still maps.
    with pytest.raises(WriteProtected) as ei:
        await disk.write(0, bytes(512))
    assert ei.value.errno == errno.EROFS and "DATA PROTECT" in str(ei.value)
    t.hooks.append(lambda tg, c: _check(S.NOT_READY, 0x3A, 0) if c[0] == C.READ_10 else None)
    with pytest.raises(NoMedium) as ni:
        await disk.read(0, 1)
    assert ni.value.errno == errno.ENOMEDIUM


async def test_retries_busy_reset_and_persistent_unit_attention() -> None:
    t, disk = await _one_disk(blocks=64)
    script = [
        vt.ScsiCommandResult(0, S.STATUS_BUSY, b"", b"", 0),
        vt.ScsiCommandResult(vt.VIRTIO_SCSI_S_RESET, 0, b"", b"", 0),
        _check(S.UNIT_ATTENTION, 0x3F, 0x0E),
        _check(S.NOT_READY, 0x04, 0x01),
    ]
    t.hooks.append(lambda tg, c: script.pop(0) if script else None)
    t.luns[0].data[:512] = b"A" * 512
    assert await disk.read(0, 1) == b"A" * 512
    assert disk.stats.retries >= 4
    # A UNIT ATTENTION that never clears ends as DiskChanged after the retry budget.
    t.hooks[:] = [lambda tg, c: _check(S.UNIT_ATTENTION, 0x28, 0)]
    before = len(t.log)
    with pytest.raises(DiskChanged):
        await disk.read(0, 1)
    assert len(t.log) - before == RETRY_LIMIT + 1


async def test_capacity_change_is_picked_up() -> None:
    t, disk = await _one_disk(blocks=64)
    t.luns[0].blocks = 128
    t.luns[0].data.extend(bytes(64 * 512))
    t.luns[0].unit_attention = (0x2A, 0x09)
    await disk.read(0, 1)  # gets the UA, retries, succeeds
    await disk.read(100, 1)  # the refreshed capacity admits block 100
    assert disk.block_count == 128


async def test_short_data_and_garbage() -> None:
    t, disk = await _one_disk(blocks=64)
    t.hooks.append(lambda tg, c: _ok(b"short") if c[0] == C.READ_10 else None)
    with pytest.raises(HardwareError, match="returned 5 of 512 bytes"):
        await disk.read(0, 1)
    t.hooks[:] = [
        lambda tg, c: vt.ScsiCommandResult(0, S.STATUS_CHECK_CONDITION, b"\x01\x02", b"", 0)
    ]
    with pytest.raises(HardwareError, match="without readable sense"):
        await disk.read(0, 1)


async def test_device_gone_is_sticky() -> None:
    t, disk = await _one_disk(blocks=64)
    t.dead = True
    with pytest.raises(DeviceGone):
        await disk.read(0, 1)
    t.dead = False
    n = len(t.log)
    with pytest.raises(DeviceGone):
        await disk.write(0, bytes(512))
    with pytest.raises(DeviceGone):
        await disk.flush()
    assert len(t.log) == n  # nothing sent to a dead device


async def test_bad_block_size_from_device_is_refused() -> None:
    t = FakeTransport({0: FakeLun(8, unit_attention=None)})
    t.hooks.append(
        lambda tg, c: _ok(struct.pack(">II", 7, 520)) if c[0] == C.READ_CAPACITY_10 else None
    )
    with pytest.raises(HardwareError, match="block length 520"):
        await scan(t)


async def test_scan_goes_on_past_targets_that_do_not_come_up() -> None:
    # Target 1: NOT READY "medium not present" to everything after INQUIRY; target 2: a
    # UNIT ATTENTION that never clears; target 4: READ CAPACITY returns garbage.  Targets
    # 0, 3 and 5 come up all the same, in order; the failures carry what went wrong.
    luns = {t: FakeLun(64 + t) for t in (0, 1, 2, 3, 4, 5)}
    t = FakeTransport(luns)

    def faults(target: int, cdb: bytes) -> vt.ScsiCommandResult | None:
        if cdb[0] == C.INQUIRY:
            return None
        if target == 1:
            return _check(S.NOT_READY, 0x3A, 0)
        if target == 2:
            return _check(S.UNIT_ATTENTION, 0x28, 0)
        if target == 4 and cdb[0] == C.READ_CAPACITY_10:
            return _ok(b"\x01\x02")
        return None

    t.hooks.append(faults)
    found = await scan_targets(t)
    assert [d.target for d in found.disks] == [0, 3, 5]
    assert [d.block_count for d in found.disks] == [64, 67, 69]
    assert [(f.target, f.lun, type(f.error)) for f in found.failed] == [
        (1, 0, NoMedium),
        (2, 0, DiskChanged),
        (4, 0, HardwareError),
    ]
    assert "SCSI target 1" in found.failed[0].message and "medium not present" in found.failed[0].message
    assert "TEST UNIT READY" in found.failed[0].message
    assert "READ CAPACITY(10)" in found.failed[2].message
    # The disks that came up work.
    await found.disks[1].write(3, b"x" * 512)
    assert await found.disks[1].read(3, 1) == b"x" * 512
    # scan() keeps its contract: the first failure is raised.
    t2 = FakeTransport({0: FakeLun(8), 1: FakeLun(8)})
    t2.hooks.append(faults)
    with pytest.raises(NoMedium):
        await scan(t2)


async def test_scan_stops_when_the_backend_is_gone() -> None:
    t = FakeTransport({0: FakeLun(8), 1: FakeLun(8)})

    def die(target: int, cdb: bytes) -> vt.ScsiCommandResult | None:
        if target == 1:
            t.dead = True
            raise DeviceGone("QEMU exited")
        return None

    t.hooks.append(die)
    with pytest.raises(DeviceGone):
        await scan_targets(t)


ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 255), st.integers(1, 40), st.integers(0, 255)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=25)
@given(ops)
def test_concurrent_operations_against_a_model(sequence: list[tuple[bool, int, int, int]]) -> None:
    """Random reads/writes from concurrent tasks on disjoint block ranges match a model."""

    async def main() -> None:
        t, disk = await _one_disk(blocks=256 * 40, max_transfer_bytes=8 * 512)
        model = bytearray(256 * 40 * 512)

        async def worker(slot: int, items: list[tuple[bool, int, int, int]]) -> None:
            base = slot * 40  # each task owns its 40-block range: no ordering questions
            for is_write, _, count, fill in items:
                lo = (base + 0) * 512
                if is_write:
                    data = bytes([fill]) * (count * 512)
                    await disk.write(base, data)
                    model[lo : lo + len(data)] = data
                else:
                    got = await disk.read(base, count)
                    assert got == bytes(model[lo : lo + count * 512])

        by_slot: dict[int, list[tuple[bool, int, int, int]]] = {}
        for item in sequence:
            by_slot.setdefault(item[1], []).append(item)
        async with trio.open_nursery() as nursery:
            for slot, items in by_slot.items():
                nursery.start_soon(worker, slot, items)
        assert bytes(t.luns[0].data) == bytes(model)

    trio.run(main)


@given(st.integers(0, C.MAX_LBA_10), st.integers(1, C.MAX_COUNT_10))
def test_fast_read10_cdb_is_cdb_read(lba: int, count: int) -> None:
    from amigafuse.driver.scsi.disk import _READ_10

    if lba + count - 1 <= C.MAX_LBA_10:
        assert _READ_10.pack(C.READ_10, 0, lba, 0, count, 0) == C.read(lba, count)
