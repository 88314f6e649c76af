"""Damaged SFS volumes end in clear errors (AmigaFuseError subclasses), never a hang
or another exception: random corruption of metadata blocks (with and without fixing
the checksum), loops, truncated images."""

from __future__ import annotations

import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amigafuse.amiga.dostype import SFS0
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.errors import AmigaFuseError, ChainLoopError, CorruptError
from amigafuse.fs.api import Kind, Volume
from amigafuse.fs.sfs import check_volume, codec, open_volume
from tests.engine.test_sfs_crash import base_image

_IMAGE: list[tuple[bytes, VolumeGeometry]] = []


def image() -> tuple[bytes, VolumeGeometry]:
    if not _IMAGE:
        _IMAGE.append(trio.run(base_image, SFS0, 512))
    return _IMAGE[0]


async def exercise(vol: Volume) -> None:
    async def walk(dir_id: int, depth: int) -> None:
        for s in await vol.readdir(dir_id):
            if s.kind is Kind.DIR and depth < 20:
                await walk(s.object_id, depth + 1)
            elif s.kind is Kind.FILE:
                await vol.read(s.object_id, 0, s.size)
            else:
                await vol.readlink(s.object_id)

    await walk(vol.root_id, 0)
    await vol.statfs()


async def attempt(data: bytes, geo: VolumeGeometry, writable: bool) -> None:
    with trio.fail_after(30):
        dev = MemoryBlockDevice(data=data)
        try:
            vol = await open_volume(dev, geo, not writable)
            await exercise(vol)
            if writable:
                st = await vol.create(vol.root_id, "newfile")
                await vol.write(st.object_id, 0, b"data" * 300)
                await vol.unlink(vol.root_id, "old.bin")
                await vol.close()
        except AmigaFuseError:
            pass
        await check_volume(MemoryBlockDevice(data=data), geo, False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block=st.integers(0, 90),
    offset=st.integers(0, 511),
    value=st.integers(0, 0xFFFFFFFF),
    fix_checksum=st.booleans(),
    writable=st.booleans(),
)
def test_random_metadata_corruption(block: int, offset: int, value: int, fix_checksum: bool, writable: bool) -> None:
    data, geo = image()
    raw = bytearray(data)
    start = block * 512
    off = min(offset, 508) & ~3
    struct.pack_into(">I", raw, start + off, value)
    if fix_checksum:
        blk = bytearray(raw[start : start + 512])
        codec.set_checksum(blk)
        raw[start : start + 512] = blk
    trio.run(attempt, bytes(raw), geo, writable)


async def test_directory_chain_loop_is_reported() -> None:
    data, geo = image()
    raw = bytearray(data)
    # The root directory's first container (block 8) now says its next is itself.
    blk = bytearray(raw[8 * 512 : 9 * 512])
    struct.pack_into(">I", blk, 16, 8)
    codec.set_checksum(blk)
    raw[8 * 512 : 9 * 512] = blk
    vol = await open_volume(MemoryBlockDevice(data=bytes(raw)), geo, True)
    with pytest.raises(ChainLoopError):
        await vol.readdir(vol.root_id)
    rep = await check_volume(MemoryBlockDevice(data=bytes(raw)), geo, False)
    assert not rep.clean


async def test_truncated_image_is_refused() -> None:
    data, geo = image()
    with pytest.raises(CorruptError):
        await open_volume(MemoryBlockDevice(data=data[: len(data) // 2]), geo, True)


async def test_both_roots_bad() -> None:
    data, geo = image()
    raw = bytearray(data)
    raw[100] ^= 0xFF
    raw[-412] ^= 0xFF
    with pytest.raises(CorruptError, match="no valid SFS root"):
        await open_volume(MemoryBlockDevice(data=bytes(raw)), geo, True)
    # One bad root: the other one is used, with a note.
    raw = bytearray(data)
    raw[100] ^= 0xFF
    vol = await open_volume(MemoryBlockDevice(data=bytes(raw)), geo, True)
    assert any("only one valid root" in n for n in vol.info.notes)


async def test_file_blocks_marked_free_give_corrupt_error_on_delete() -> None:
    data, geo = image()
    raw = bytearray(data)
    # Mark every block free in the first bitmap block: deleting a file then finds its
    # blocks already free.
    blk = bytearray(raw[34 * 512 : 35 * 512])
    blk[12:] = b"\xff" * 500
    codec.set_checksum(blk)
    raw[34 * 512 : 35 * 512] = blk
    vol = await open_volume(MemoryBlockDevice(data=bytes(raw)), geo, False)
    # Deleting moves the file into .recycled (no blocks freed); deleting it there frees.
    await vol.unlink(vol.root_id, "old.bin")
    rec = await vol.lookup(vol.root_id, ".recycled")
    with pytest.raises(CorruptError):
        await vol.unlink(rec.object_id, "old.bin")
    # The failed operation left nothing behind: the file is still there.
    assert (await vol.lookup(rec.object_id, "old.bin")).size == 40000
