"""Damaged volumes: flipped bits, looped chains, bad pointers, truncated devices.
Every outcome is a clean AmigaFuseError (EIO for damage) or a correct answer: never
another exception, never a hang, and the undamaged rest stays readable."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import given, settings

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import AmigaFuseError, ChainLoopError, CorruptError
from amigafuse.fs.api import Kind
from amigafuse.fs.ffs import ENGINE, open_volume
from amigafuse.fs.ffs.layout import EntryBlock, RootBlock, hash_name, with_checksum
from tests.engine.test_ffs_common import content

BLOCKS = 1500


async def build(dostype: int) -> tuple[bytes, VolumeGeometry, dict[str, int]]:
    dev = MemoryBlockDevice(BLOCKS)
    geo = VolumeGeometry(dostype=dostype, fs_block_count=BLOCKS, reserved=2)
    await ENGINE.format_volume(dev, geo, "Damage")
    vol = await open_volume(dev, geo, False)
    keys: dict[str, int] = {}
    d = await vol.mkdir(vol.root_id, "dir")
    keys["dir"] = d.object_id
    for i in range(12):
        f = await vol.create(d.object_id if i % 2 else vol.root_id, f"file{i}")
        await vol.write(f.object_id, 0, content(str(i), 300 * i * i))
        keys[f"file{i}"] = f.object_id
    await vol.link(keys["file5"], vol.root_id, "hard5")
    await vol.symlink(d.object_id, "soft", "file3")
    await vol.close()
    return bytes(dev.data), geo, keys


_CACHE: dict[int, tuple[bytes, VolumeGeometry, dict[str, int]]] = {}


def image(dostype: int) -> tuple[bytes, VolumeGeometry, dict[str, int]]:
    if dostype not in _CACHE:
        _CACHE[dostype] = trio.run(build, dostype)
    return _CACHE[dostype]


async def aimage(dostype: int) -> tuple[bytes, VolumeGeometry, dict[str, int]]:
    if dostype not in _CACHE:
        _CACHE[dostype] = await build(dostype)
    return _CACHE[dostype]


async def exercise(dev: MemoryBlockDevice, geo: VolumeGeometry) -> int:
    """Open, walk, read everything, check, write a little.  Returns the number of
    objects read successfully.  Only AmigaFuseError may come out of the engine."""
    ok = 0
    with trio.fail_after(30):
        try:
            vol: Any = await open_volume(dev, geo, True)
        except AmigaFuseError:
            return 0
        stack = [vol.root_id]
        seen = set()
        while stack:
            d = stack.pop()
            if d in seen:
                continue
            seen.add(d)
            try:
                entries = await vol.readdir(d)
            except AmigaFuseError:
                continue
            for s in entries:
                try:
                    if s.kind == Kind.DIR:
                        stack.append(s.object_id)
                    elif s.kind == Kind.FILE:
                        await vol.read(s.object_id, 0, 1 << 20)
                    else:
                        await vol.readlink(s.object_id)
                    await vol.lookup(d, s.name)
                    ok += 1
                except AmigaFuseError:
                    pass
        await vol.statfs()
        await vol.close()
        report = await ENGINE.check_volume(dev, geo, False)
        assert isinstance(report.errors, list)
        try:
            rw: Any = await open_volume(dev, geo, False)
        except AmigaFuseError:
            return ok
        for op in (
            lambda: rw.create(rw.root_id, "new"),
            lambda: rw.mkdir(rw.root_id, "newdir"),
            lambda: rw.unlink(rw.root_id, "file0"),
            lambda: rw.rename(rw.root_id, "file2", rw.root_id, "renamed"),
        ):
            with contextlib.suppress(AmigaFuseError):
                await op()
        with contextlib.suppress(AmigaFuseError):
            await rw.close()
    return ok


@pytest.mark.parametrize("dostype", [0x444F5300, 0x444F5303, 0x444F5305, 0x444F5307])
@settings(max_examples=int(os.environ.get("FFS_CORRUPT_EXAMPLES", "25")))
@given(data=st.data())
def test_flipped_bytes_never_crash(dostype: int, data: st.DataObject) -> None:
    raw, geo, _ = image(dostype)
    buf = bytearray(raw)
    # damage metadata near the root, where headers, bitmap and dircache live
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(600 * 512, 1000 * 512 - 1))
        buf[pos] ^= data.draw(st.integers(1, 255))
    trio.run(exercise, MemoryBlockDevice(data=buf), geo)


def _patch_entry(buf: bytearray, block: int, lnfs: bool = False, **changes: int) -> None:
    e = EntryBlock.unpack(bytes(buf[block * 512 : (block + 1) * 512]), lnfs)
    buf[block * 512 : (block + 1) * 512] = with_checksum(replace(e, **changes).pack())


async def test_looped_hash_chain_is_eio_and_the_rest_readable() -> None:
    raw, geo, keys = await aimage(0x444F5303)
    buf = bytearray(raw)
    _patch_entry(buf, keys["file4"], hash_chain=keys["file4"])
    dev = MemoryBlockDevice(data=buf)
    vol = await open_volume(dev, geo, True)
    listing = {s.name for s in await vol.readdir(vol.root_id)}
    assert "dir" in listing
    assert any("loops" in n for n in vol.info.notes)
    # a name in the looping chain: EIO, never a hang
    slot = hash_name(b"file4", True, 512)
    same_slot = next(n for i in range(10_000) if hash_name((n := f"x{i}").encode(), True, 512) == slot)
    with pytest.raises(ChainLoopError):
        await vol.lookup(vol.root_id, same_slot)
    report = await ENGINE.check_volume(dev, geo, False)
    assert any("loops" in e for e in report.errors)
    assert await exercise(dev, geo) > 5


async def test_bad_extension_pointer() -> None:
    raw, geo, keys = await aimage(0x444F5301)
    buf = bytearray(raw)
    big = keys["file11"]  # 36300 bytes: 71 blocks + an extension block
    _patch_entry(buf, big, extension=BLOCKS + 99)
    dev = MemoryBlockDevice(data=buf)
    vol = await open_volume(dev, geo, True)
    with pytest.raises(CorruptError):
        await vol.read(big, 0, 100_000)
    assert await vol.read(keys["file3"], 0, 10) == content("3", 2700)[:10]
    report = await ENGINE.check_volume(dev, geo, False)
    assert any("outside the volume" in e for e in report.errors)
    # damaged and marked invalid: a read-write open falls back to read-only
    rb = (geo.reserved + BLOCKS - 1) // 2
    r = RootBlock.unpack(bytes(buf[rb * 512 : (rb + 1) * 512]))
    buf[rb * 512 : (rb + 1) * 512] = with_checksum(replace(r, bm_flag=0).pack())
    rw = await open_volume(MemoryBlockDevice(data=buf), geo, False)
    assert rw.info.read_only and any("read-only" in n for n in rw.info.notes)


async def test_checksum_error_and_repair() -> None:
    raw, geo, keys = await aimage(0x444F5305)
    buf = bytearray(raw)
    # flip a data-free bit in the bitmap: the checker finds it, repair fixes it
    rb = (geo.reserved + BLOCKS - 1) // 2
    r = RootBlock.unpack(bytes(buf[rb * 512 : (rb + 1) * 512]))
    bm = r.bm_pages[0]
    buf[bm * 512 + 100] ^= 0xFF
    dev = MemoryBlockDevice(data=buf)
    report = await ENGINE.check_volume(dev, geo, False)
    assert not report.clean and any("checksum" in e for e in report.errors)
    fixed = await ENGINE.check_volume(dev, geo, True)
    assert fixed.clean and fixed.repaired
    # a header with a bad checksum: that object is EIO, the others read
    buf = bytearray(dev.data)
    buf[keys["file6"] * 512 + 300] ^= 1
    dev2 = MemoryBlockDevice(data=buf)
    vol = await open_volume(dev2, geo, True)
    with pytest.raises(CorruptError):
        await vol.getattr(keys["file6"])
    assert (await vol.getattr(keys["file8"])).size == 300 * 64


async def test_truncated_device() -> None:
    raw, geo, _ = await aimage(0x444F5303)
    dev = MemoryBlockDevice(data=raw[: 800 * 512])  # the root lies beyond the end
    with pytest.raises(AmigaFuseError):
        await open_volume(dev, geo, True)
    report = await ENGINE.check_volume(dev, geo, False)
    assert not report.clean
