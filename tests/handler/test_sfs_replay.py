"""SmartFilesystem 1.83 replays amigafuse's unfinished transactions (a crash during commit).

amigafuse's commit (amigafuse/fs/sfs/writer.py): TRST chain; TRFA at root OC + 2; the
blocks in place; TROK at root OC + 2.  A device wrapper stops it (a) at the TROK write
(every block already in place), (b) at the first in-place write after TRFA (nothing in
place yet) or (c) at the third (two write requests in place, the rest not).  The real
handler must find the transaction, replay it, and then list exactly the new tree; TROK
is back at root OC + 2 and amigafuse's check finds the volume clean.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from amigafuse.blockdev.base import BlockDevice
from amigafuse.errors import DeviceGone
from amigafuse.fs.sfs import codec, open_volume
from tests.engine.test_sfs_support import first_partition
from tests.handler.conftest import Handler, run_handler
from tests.handler.tree import (
    Model,
    Writer,
    build_tree,
    check_clean,
    comparable,
    content,
    diff,
    expected_listing,
    make_disk,
    open_rw,
    our_listing,
    strip_protection,
)


class StopDevice(BlockDevice):
    """Passes everything through until the commit reaches the chosen point, then dies
    (DeviceGone, that write not done, and no write after it)."""

    def __init__(self, dev: BlockDevice, tr_lba: int, sectors_per_block: int, stop_at: str) -> None:
        self.dev, self.tr_lba, self.spb, self.stop_at = dev, tr_lba, sectors_per_block, stop_at
        self.trfa_seen = self.stopped = False
        self.in_place_writes = 0  # write requests after TRFA that reached the disk

    def state(self) -> tuple[bool, bool]:
        """(TRFA written, stopped)."""
        return self.trfa_seen, self.stopped

    @property
    def block_size(self) -> int:
        return self.dev.block_size

    @property
    def block_count(self) -> int:
        return self.dev.block_count

    async def read(self, lba: int, count: int) -> bytes:
        return await self.dev.read(lba, count)

    async def flush(self) -> None:
        if self.stopped:
            raise DeviceGone("stopped")
        await self.dev.flush()

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        if self.stopped:
            raise DeviceGone("stopped")
        nsect = len(data) // self.dev.block_size
        tr_id = b""
        if lba <= self.tr_lba < lba + nsect:
            at = (self.tr_lba - lba) * self.dev.block_size
            tr_id = bytes(data[at : at + 4])
        if tr_id == b"TRFA":
            assert nsect == self.spb, "TRFA written together with other blocks"
            self.trfa_seen = True
        elif self.trfa_seen and (
            (self.stop_at == "first" and self.in_place_writes == 0)
            or (self.stop_at == "third" and self.in_place_writes == 2)
            or tr_id == b"TROK"
        ):
            self.stopped = True
            raise DeviceGone(
                f"stopped at {self.stop_at} (after {self.in_place_writes} in-place writes)"
            )
        elif self.trfa_seen:
            self.in_place_writes += 1
        await self.dev.write(lba, data)


async def transaction_block(image: Path) -> tuple[int, int]:
    """(512-byte sector of root OC + 2 within the partition, sectors per filesystem block)."""
    dev, geo = first_partition(image)
    spb = geo.fs_block_size // 512
    root = codec.RootBlock.unpack(await dev.read(0, spb))
    return (root.rootobjectcontainer + 2) * spb, spb


async def trst_chain(image: Path, tr_lba: int, spb: int) -> list[int]:
    """The TRST blocks the TRFA block at ``tr_lba`` points to, in order (bounded walk)."""
    dev, _ = first_partition(image)
    trfa = codec.TransactionFailure.unpack(await dev.read(tr_lba, spb))
    chain: list[int] = []
    block = trfa.firsttransaction
    while block and len(chain) < 10_000:
        trst = codec.TransactionStorage.unpack(await dev.read(block * spb, spb))
        assert trst.id == codec.TRANSACTIONSTORAGE_ID and trst.ownblock == block, (block, trst.id)
        chain.append(block)
        block = trst.next
    return chain


async def block_id(image: Path, lba: int) -> bytes:
    dev, _ = first_partition(image)
    return (await dev.read(lba, 1))[:4]


@pytest.mark.parametrize("stop_at", ["trok", "first", "third"])
@pytest.mark.parametrize("block_size", [512, 1024])
async def test_sfs183_replays_our_unfinished_commit(
    stop_at: str, block_size: int, handler_python: Path, sfs183: Handler, tmp_path: Path
) -> None:
    image = tmp_path / f"crash_{stop_at}_bs{block_size}.hdf"
    make_disk(image, "SFS", block_size=block_size, handler=sfs183.path)
    vol, _, _ = await open_rw(image)
    model = Model()
    await build_tree(Writer(vol, model), name_limit=100, hard_links=False, many=60)
    await vol.close()
    await check_clean(image)
    tr_lba, spb = await transaction_block(image)
    assert await block_id(image, tr_lba) == b"TROK"

    # One commit: a new directory of files, deletes, an overwrite, a move.
    dev, geo = first_partition(image, read_only=False)
    stop = StopDevice(dev, tr_lba, spb, stop_at)
    vol = await open_volume(stop, geo, False)
    w = Writer(vol, model)
    await w.mkdir("/fromlinux")
    for i in range(20):
        await w.write_file(f"/fromlinux/file_{i:02d}.bin", bytes([i]) * (997 * i + 7))
    for i in range(2, 60, 5):
        name = f"F_{i:04d}.Dat" if i % 10 == 0 else f"f_{i:04d}.dat"
        if f"/many/{name}" in model.objects:
            await w.unlink(f"/many/{name}")
    await w.overwrite("/sizes/size_0100000.bin", 5000, content("overwrite", 3300))
    await w.rename("/nested/a/readme_moved.txt", "/fromlinux/readme.txt")
    assert not stop.trfa_seen, "amigafuse committed before close(): the test's premise is wrong"
    with pytest.raises(DeviceGone):
        await vol.close()
    assert stop.state() == (True, True), "the commit did not reach the stop point"
    if stop_at == "third":
        assert stop.in_place_writes == 2, "too few in-place writes to stop at the third"
    assert await block_id(image, tr_lba) == b"TRFA"
    chain = await trst_chain(image, tr_lba, spb)
    assert len(chain) >= 2, (
        f"the transaction's records fit one TRST block ({chain}): too small a test"
    )

    run = run_handler(handler_python, image, sfs183.path, [["flush"], ["walk"]], tmp_path)
    assert any("unfinished transaction" in r for r in run.requests), run.requests
    assert any("has been succesfully applied" in r for r in run.requests), run.requests  # [sic]
    want = expected_listing(model)
    got = comparable(run.results[-1], want)
    assert got == want, f"SmartFilesystem 1.83 after replaying our transaction:\n{diff(got, want)}"
    assert await block_id(image, tr_lba) == b"TROK"
    await check_clean(image)
    vol, _, _ = await open_rw(image, read_only=True)
    try:
        ours = await our_listing(vol)
    finally:
        await vol.close()
    assert ours == strip_protection(want), diff(ours, strip_protection(want))
