"""Zero-copy reads on read-write FFS volumes (``StagedBlockIO.read_lease``).

A read-write volume holds small data writes in memory (staged) until its write-back.
``read_lease`` must lend the device's own buffer when no block of the range is staged
(the common case on a rw mount: a file being read that was not just written) and
otherwise return a copy with the staged blocks laid over the device's bytes.  What must
hold: the bytes equal the copying ``read`` (staged, unstaged, partly staged; sub-sector
filesystem blocks too); every lease the device lent is given back (errors and
cancellation included); and a change of the staging while the device read is in flight
(stage, restage, write-through, write-out, drop) gives the result documented in
``StagedBlockIO`` (forced here with a gate held at the device, not left to a race)."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import ReadLease
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import MediumError, OutOfRange
from amigafuse.fs.ffs import ENGINE, open_volume
from amigafuse.fs.ffs.writer import StagedBlockIO
from tests.conftest import content

DOS3 = 0x444F5303


class LendingDevice(MemoryBlockDevice):
    """Lends each read in a fresh buffer and counts the leases out.  ``gate``, when set,
    holds every lent read at the device (after ``at_device`` is set) until it is set;
    ``fail_at`` makes a read covering that lba fail with MediumError."""

    def __init__(self, blocks: int, block_size: int = 512, *, data: bytes | None = None) -> None:
        super().__init__(blocks, block_size, data=data)
        self.out = 0
        self.lent = 0
        self.gate: trio.Event | None = None
        self.at_device = trio.Event()
        self.fail_at: int | None = None

    async def read_lease(self, lba: int, count: int) -> ReadLease:
        data = await self.read(lba, count)
        if self.gate is not None:
            self.at_device.set()
            await self.gate.wait()
        if self.fail_at is not None and lba <= self.fail_at < lba + count:
            raise MediumError(f"block {self.fail_at} is unreadable")
        self.out += 1
        self.lent += 1
        released = [False]

        def give_back() -> None:
            assert not released[0], "a lease given back twice"
            released[0] = True
            self.out -= 1

        return ReadLease(memoryview(bytearray(data)), give_back)


def fill(byte: int, blocks: int, bs: int = 512) -> bytes:
    return bytes([byte]) * (blocks * bs)


async def staged_io(bs: int = 512, dev_bs: int = 512, blocks: int = 64) -> tuple[LendingDevice, StagedBlockIO]:
    dev = LendingDevice(blocks * bs // dev_bs, dev_bs, data=content("disk", blocks * bs))
    return dev, StagedBlockIO(dev, bs)


# ---------------------------------------------------------------- bytes and lending


@pytest.mark.parametrize(("bs", "dev_bs"), [(512, 512), (1024, 512), (512, 4096)])
async def test_lease_equals_read_for_unstaged_staged_and_partly_staged_ranges(bs: int, dev_bs: int) -> None:
    dev, io = await staged_io(bs, dev_bs)
    io.stage(10, fill(1, 2, bs))  # blocks 10, 11
    io.stage(20, fill(2, 1, bs))
    cases = [(0, 8), (30, 16), (10, 2), (11, 1), (8, 6), (9, 13), (0, 64), (20, 1), (19, 3)]
    for block, count in cases:
        want = await io.read(block, count)
        staged = any(b in (10, 11, 20) for b in range(block, block + count))
        with await io.read_lease(block, count) as lease:
            assert lease.view == want, (block, count)
            # unstaged ranges come back in the device's buffer, staged ones as a copy
            assert lease.lent is not staged, (block, count)
        assert dev.out == 0
    # the staged bytes really are in the copy, and the device's elsewhere
    with await io.read_lease(9, 3) as lease:
        disk = content("disk", 64 * bs)
        assert lease.view == disk[9 * bs : 10 * bs] + fill(1, 2, bs)
    # a write-back hands the device the newest bytes; then the range lends again
    await io.flush_staged()
    with await io.read_lease(9, 3) as lease:
        assert lease.lent and lease.view == disk[9 * bs : 10 * bs] + fill(1, 2, bs)
    assert dev.out == 0
    with await io.read_lease(5, 0) as lease:
        assert lease.view.nbytes == 0
    with pytest.raises(OutOfRange):
        await io.read_lease(60, 10)
    assert dev.out == 0


async def test_a_failed_device_read_holds_no_lease_and_raises_that_error() -> None:
    dev, io = await staged_io()
    io.stage(3, fill(7, 1))
    dev.fail_at = 5
    for block, count in ((0, 8), (4, 4)):  # staged and not
        with pytest.raises(MediumError):
            await io.read_lease(block, count)
    assert dev.out == 0


# ---------------------------------------------------------------- forced interleavings

Change = str  # what happens to block 4 while the device read of blocks 0..7 is held


async def _held_read(io: StagedBlockIO, dev: LendingDevice, change: Change) -> tuple[ReadLease, bytes]:
    """Start a read_lease of blocks 0..7, hold it at the device, apply ``change`` to
    block 4, let the read finish.  Returns the lease and what the device then holds."""
    dev.gate = trio.Event()
    dev.at_device = trio.Event()
    got: list[ReadLease] = []

    async def reader() -> None:
        got.append(await io.read_lease(0, 8))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await dev.at_device.wait()  # the read is at the device: staging changes now
        gate, dev.gate = dev.gate, None  # the write-back's own reads are not held
        if change == "stage":
            io.stage(4, fill(0xA2, 1))
        elif change == "write-through":
            await io.write(4, fill(0xB3, 1))
        elif change == "write-out":
            await io.flush_staged()
        elif change == "drop":
            io.drop([4])
        elif change == "restage":
            io.stage(4, fill(0xC4, 1))
        gate.set()
    return got[0], bytes(dev.data[: 8 * 512])


@pytest.mark.parametrize(
    ("staged_before", "change", "block4", "lent"),
    [
        # nothing staged when the read starts, block 4 staged meanwhile: its staged copy
        (False, "stage", 0xA2, False),
        # staged (0x11) when the read starts ...
        (True, "write-out", 0x11, False),  # ... written out meanwhile: that copy
        (True, "drop", 0x11, False),  # ... freed meanwhile: the copy taken at the start
        (True, "restage", 0xC4, False),  # ... restaged meanwhile: the newest copy
        (True, "write-through", 0x11, False),  # ... written through: newest at the start
        # nothing staged before or after, a write-through races the read: as the
        # device returned it (here: the read's bytes predate the write), still lent
        (False, "write-through", None, True),
    ],
)
async def test_staging_changed_while_the_device_read_is_in_flight(
    staged_before: bool, change: Change, block4: int | None, lent: bool
) -> None:
    dev, io = await staged_io()
    disk = content("disk", 64 * 512)
    if staged_before:
        io.stage(4, fill(0x11, 1))
    lease, _ = await _held_read(io, dev, change)
    with lease:
        assert lease.lent is lent
        want = bytearray(disk[: 8 * 512])
        if block4 is not None:
            want[4 * 512 : 5 * 512] = fill(block4, 1)
        assert lease.view == want
    assert dev.out == 0
    # and a read that starts afterwards sees the newest contents, as read does
    with await io.read_lease(0, 8) as after:
        assert after.view == await io.read(0, 8)
    assert dev.out == 0


async def test_a_read_cancelled_at_the_device_holds_no_lease_and_staging_goes_on() -> None:
    dev, io = await staged_io()
    io.stage(2, fill(5, 1))
    for block in (0, 16):  # a staged range and a lent one
        dev.gate = trio.Event()
        dev.at_device = trio.Event()
        with trio.CancelScope() as scope:

            async def canceller(scope: trio.CancelScope = scope) -> None:
                await dev.at_device.wait()
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(canceller)
                await io.read_lease(block, 8)
                raise AssertionError("the read was not cancelled")
        assert scope.cancelled_caught
        assert dev.out == 0
    dev.gate = None
    with await io.read_lease(0, 8) as lease:
        assert lease.view[2 * 512 : 3 * 512] == fill(5, 1)
    assert dev.out == 0 and dev.lent > 0


# ---------------------------------------------------------------- random sequences

_BLOCKS = 16
_op = st.one_of(
    st.tuples(st.just("stage"), st.integers(0, _BLOCKS - 4), st.integers(1, 4), st.integers(0, 255)),
    st.tuples(st.just("write"), st.integers(0, _BLOCKS - 4), st.integers(1, 4), st.integers(0, 255)),
    st.tuples(st.just("lease"), st.integers(0, _BLOCKS - 8), st.integers(1, 8), st.just(0)),
    st.tuples(st.just("drop"), st.integers(0, _BLOCKS - 4), st.integers(1, 4), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_op, max_size=30), st.sampled_from([(512, 512), (512, 4096)]))
def test_leases_read_what_was_last_written(ops: list[tuple[str, int, int, int]], sizes: tuple[int, int]) -> None:
    """Against a model: a lease holds the newest contents (staged or written), lends the
    device's buffer exactly when no block of its range is staged, and is given back."""
    bs, dev_bs = sizes

    async def run() -> None:
        dev = LendingDevice(_BLOCKS * bs // dev_bs, dev_bs)
        io = StagedBlockIO(dev, bs)
        view = bytearray(_BLOCKS * bs)  # what reads must return
        disk = bytearray(_BLOCKS * bs)  # what the device holds
        staged: set[int] = set()
        for op, block, count, byte in ops:
            data = bytes([byte]) * (count * bs)
            lo, hi = block * bs, (block + count) * bs
            if op == "stage":
                io.stage(block, data)
                view[lo:hi] = data
                staged.update(range(block, block + count))
            elif op == "write":
                await io.write(block, data)
                view[lo:hi] = disk[lo:hi] = data
                staged.difference_update(range(block, block + count))
            elif op == "lease":
                with await io.read_lease(block, count) as lease:
                    assert lease.view == bytes(view[lo:hi])
                    assert lease.lent is not bool(staged & set(range(block, block + count)))
                    assert dev.out == (1 if lease.lent else 0)
                assert dev.out == 0
            elif op == "drop":
                io.drop(list(range(block, block + count)))
                for b in staged & set(range(block, block + count)):
                    view[b * bs : (b + 1) * bs] = disk[b * bs : (b + 1) * bs]
                staged.difference_update(range(block, block + count))
            else:
                await io.flush_staged()
                disk[:] = view
                staged.clear()
        assert dev.out == 0

    trio.run(run)


# ---------------------------------------------------------------- the volume


async def test_a_read_write_volume_lends_unstaged_file_data() -> None:
    """The gap this closes: a read-write FFS volume's reads of data not staged come in
    the device's buffer (they were copies); staged data is read as written; after the
    write-back the same range lends again, with the new bytes."""
    size = 512 * 1024
    dev = LendingDevice(8000)
    geo = VolumeGeometry(dostype=DOS3, fs_block_size=512, fs_block_count=8000, reserved=2)
    await ENGINE.format_volume(dev, geo, "RwLease")
    vol = await open_volume(dev, geo, False)
    big = await vol.create(vol.root_id, "big")
    await vol.write(big.object_id, 0, content("big", size))  # large: written through
    await vol.sync()
    await vol.close()
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol.io, StagedBlockIO)
    want = bytearray(content("big", size))
    lent_before = dev.lent
    with await vol.read_lease(big.object_id, 4096, 64 * 1024) as lease:
        assert lease.lent and lease.view == want[4096 : 4096 + 64 * 1024]
    assert dev.lent > lent_before and dev.out == 0
    await vol.write(big.object_id, 10_000, b"staged bytes")  # small: staged
    assert vol.io.staged_bytes > 0
    want[10_000:10_012] = b"staged bytes"
    with await vol.read_lease(big.object_id, 4096, 64 * 1024) as lease:
        assert not lease.lent and lease.view == want[4096 : 4096 + 64 * 1024]
    with await vol.read_lease(big.object_id, 256 * 1024, 4096) as lease:  # away from it
        assert lease.lent and lease.view == want[256 * 1024 : 260 * 1024]
    assert await vol.read(big.object_id, 0, size) == want
    await vol.sync()
    assert vol.io.staged_bytes == 0
    with await vol.read_lease(big.object_id, 4096, 64 * 1024) as lease:
        assert lease.lent and lease.view == want[4096 : 4096 + 64 * 1024]
    assert dev.out == 0
    await vol.close()
