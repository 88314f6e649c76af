"""ReadLease and the block devices' read_lease: the same bytes as read, through windows
(partitions, sub-sector filesystem blocks); the image-file device's pooled buffers are
reused only after their lease is released; released leases cannot be read."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amigafuse.blockdev import (
    FileBlockDevice,
    FsBlockIO,
    MemoryBlockDevice,
    PartitionDevice,
    ReadLease,
)
from amigafuse.blockdev.file import LEND_MAX_BYTES, LEND_POOL
from amigafuse.errors import MediumError, OutOfRange


def test_a_lease_releases_once_and_then_reads_nothing() -> None:
    calls: list[int] = []
    lease = ReadLease(memoryview(bytearray(b"abcdef")), lambda: calls.append(1))
    lent_before = lease.lent
    narrow = lease.narrowed(1, 4)
    assert lent_before and not lease.lent and bytes(narrow.view) == b"bcd"
    lease.release()  # gave its release to `narrow`: nothing happens
    assert calls == []
    with narrow:
        pass
    narrow.release()
    assert calls == [1]
    assert len(narrow.view) == 0 and not narrow.lent
    owned = ReadLease.of(b"xyz")
    assert not owned.lent and bytes(owned.view) == b"xyz"
    owned.release()
    assert bytes(owned.view) == b"xyz"  # nothing lent, nothing taken away


async def test_file_leases_reuse_buffers_only_after_release(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(4 << 20)
    path = tmp_path / "img"
    path.write_bytes(data)
    dev = FileBlockDevice(str(path), read_only=True)
    a = await dev.read_lease(0, 2048)
    b = await dev.read_lease(2048, 2048)
    assert a.lent and b.lent
    assert a.view.obj is not b.view.obj  # held leases never share a buffer
    assert a.view == data[: 1 << 20] and b.view == data[1 << 20 : 2 << 20]
    buf_a = a.view.obj
    a.release()
    c = await dev.read_lease(100, 3)
    assert c.view.obj is buf_a  # reused once released
    assert c.view == data[100 * 512 : 103 * 512]
    assert b.view == data[1 << 20 : 2 << 20]  # untouched by the reuse
    big = await dev.read_lease(0, LEND_MAX_BYTES // 512 + 1)  # too big to lend: copied
    assert not big.lent and big.view == data[: LEND_MAX_BYTES + 512]
    # many leases held and released: the pool keeps at most LEND_POOL buffers
    held = [await dev.read_lease(i, 1) for i in range(LEND_POOL + 4)]
    for lease in [*held, b, c]:
        lease.release()
    assert len(dev._pool) == LEND_POOL
    with pytest.raises(OutOfRange):
        await dev.read_lease(dev.block_count, 1)
    await dev.aclose()


async def test_a_truncated_image_is_a_medium_error_and_keeps_the_buffer(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(64 * 512))
    dev = FileBlockDevice(str(path), read_only=True)
    (await dev.read_lease(0, 1)).release()
    os.truncate(path, 10 * 512)
    with pytest.raises(MediumError):
        await dev.read_lease(8, 8)
    assert len(dev._pool) == 1
    await dev.aclose()


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(512, 512), (512, 4096), (4096, 512), (4096, 4096)]),
       st.integers(0, 40), st.integers(0, 12), st.integers(0, 8))
async def test_window_leases_are_the_windows_bytes(sizes: tuple[int, int], first: int,
                                                  block: int, count: int) -> None:
    dev_bs, fs_bs = sizes
    data = random.Random(first).randbytes(64 * 4096)
    dev = MemoryBlockDevice(len(data) // dev_bs, dev_bs, data=data)
    start = first * 4096 // dev_bs
    part = PartitionDevice(dev, start, dev.block_count - start)
    io = FsBlockIO(part, fs_bs)
    if block + count > io.block_count:
        with pytest.raises(OutOfRange):
            await io.read_lease(block, count)
        return
    with await io.read_lease(block, count) as lease:
        assert lease.view == await io.read(block, count)
        offset = start * dev_bs + block * fs_bs
        assert lease.view == data[offset : offset + count * fs_bs]
