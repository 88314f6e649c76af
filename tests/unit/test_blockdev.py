"""Block-device contract: memory, file, partition windows and filesystem-block access."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.amiga.dates import DateStamp
from amigafuse.amiga.dostype import DOS3, SFS2, dostype_from_str, dostype_to_str, parse_type
from amigafuse.blockdev import FileBlockDevice, FsBlockIO, MemoryBlockDevice, PartitionDevice
from amigafuse.errors import OutOfRange, WriteProtected


async def test_memory_round_trip_and_range() -> None:
    dev = MemoryBlockDevice(16, 512)
    await dev.write(3, b"\xaa" * 1024)
    assert await dev.read(3, 2) == b"\xaa" * 1024
    assert await dev.read(5, 1) == bytes(512)
    with pytest.raises(OutOfRange):
        await dev.read(15, 2)
    with pytest.raises(OutOfRange):
        await dev.write(-1, bytes(512))
    with pytest.raises(ValueError):
        await dev.write(0, bytes(100))


async def test_file_device(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(8192) + b"x" * 100)  # trailing partial block is ignored
    dev = FileBlockDevice(str(path))
    assert dev.block_count == 16
    await dev.write(15, b"\x01" * 512)
    await dev.flush()
    assert path.read_bytes()[15 * 512 : 16 * 512] == b"\x01" * 512
    await dev.aclose()
    ro = FileBlockDevice(str(path), read_only=True)
    assert await ro.read(15, 1) == b"\x01" * 512
    with pytest.raises(WriteProtected):
        await ro.write(0, bytes(512))
    await ro.aclose()


async def test_file_without_write_bits_opens_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(1024))
    path.chmod(0o444)
    dev = FileBlockDevice(str(path))  # root would be allowed to write: we refuse anyway
    assert dev.read_only
    with pytest.raises(WriteProtected):
        await dev.write(0, b"\xff" * 512)
    await dev.aclose()
    assert path.read_bytes() == bytes(1024)


async def test_partition_window_confines_writes() -> None:
    dev = MemoryBlockDevice(100, 512)
    part = PartitionDevice(dev, 10, 20)
    await part.write(0, b"\x55" * 512)
    assert dev.data[10 * 512] == 0x55
    with pytest.raises(OutOfRange):
        await part.write(20, bytes(512))
    with pytest.raises(OutOfRange):
        PartitionDevice(dev, 90, 20)
    assert PartitionDevice(dev, 0, 1, read_only=True).read_only


@pytest.mark.parametrize(("dev_bs", "fs_bs"), [(512, 512), (512, 2048), (4096, 512), (4096, 8192)])
async def test_fs_block_io(dev_bs: int, fs_bs: int) -> None:
    dev = MemoryBlockDevice(64 * 8192 // dev_bs, dev_bs)
    io = FsBlockIO(dev, fs_bs)
    assert io.block_count == 64 * 8192 // fs_bs
    payload = bytes(range(256)) * (fs_bs // 256)
    await io.write(3, payload)
    assert await io.read(3) == payload
    assert dev.data[3 * fs_bs : 4 * fs_bs] == payload
    # neighbours untouched
    assert await io.read(2) == bytes(fs_bs)
    assert await io.read(4) == bytes(fs_bs)
    with pytest.raises(OutOfRange):
        await io.read(io.block_count, 1)


async def test_fs_block_io_concurrent_sub_sector_writers() -> None:
    dev = MemoryBlockDevice(4, 4096)
    io = FsBlockIO(dev, 512)
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(io.write, i, bytes([i + 1]) * 512)
    for i in range(8):
        assert await io.read(i) == bytes([i + 1]) * 512


def test_dostype_names() -> None:
    assert dostype_from_str("DOS\\3") == DOS3
    assert dostype_to_str(SFS2) == "SFS\\2"
    assert parse_type("ffs+intl") == DOS3
    assert parse_type("DOS3") == DOS3
    assert parse_type("0x53465302") == SFS2
    with pytest.raises(ValueError):
        dostype_from_str("nonsense")


@given(st.integers(min_value=0, max_value=(1 << 31)), st.integers(0, 1439), st.integers(0, 2999))
def test_datestamp_round_trip(days: int, minutes: int, ticks: int) -> None:
    stamp = DateStamp(days, minutes, ticks)
    assert DateStamp.from_unix_ns(stamp.to_unix_ns()) == stamp


def test_datestamp_epoch() -> None:
    assert DateStamp(0, 0, 0).to_unix() == 252460800
    assert DateStamp.from_unix(252460800 + 86400 + 61.5) == DateStamp(1, 1, 75)
    assert DateStamp.from_unix(0) == DateStamp(0, 0, 0)  # before 1978 clamps


async def test_requests_in_flight_hint(tmp_path: Path) -> None:
    from amigafuse.blockdev.base import BlockDevice

    class Queued(MemoryBlockDevice):
        @property
        def requests_in_flight(self) -> int:
            return BlockDevice.requests_in_flight.fget(self)  # type: ignore[attr-defined,no-any-return]

    image = tmp_path / "img"
    image.write_bytes(bytes(8192))
    mem = MemoryBlockDevice(16)
    f = FileBlockDevice(str(image))
    # devices that never suspend say 1; the contract's default for queued devices is 8
    assert mem.requests_in_flight == 1 and f.requests_in_flight == 1
    assert Queued(16).requests_in_flight == 8
    # windows and filesystem-block access pass the device's hint on
    assert PartitionDevice(Queued(16), 2, 8).requests_in_flight == 8
    assert FsBlockIO(PartitionDevice(mem, 0, 16), 1024).requests_in_flight == 1
    assert FsBlockIO(Queued(16), 512).requests_in_flight == 8
    await f.aclose()
