"""A bitmap (checksum valid) that calls a file's header free: damage only a walk of the
whole tree reveals.  Read-only, the file is still listed *and read* (rescuing data off a
damaged disk); read-write, operations on it fail with EIO naming the block instead of a
misleading ENOENT, and `check` reports the block."""

from __future__ import annotations

import errno
import struct

import pytest

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import CorruptError
from amigafuse.fs.ffs import ENGINE as FFS
from amigafuse.fs.ffs.layout import with_checksum

BLOCKS, BS, DOS3 = 400, 512, 0x444F5303
ROOT = (2 + BLOCKS - 1) // 2
GEO = VolumeGeometry(dostype=DOS3, fs_block_count=BLOCKS, reserved=2)


async def damaged() -> tuple[bytearray, int]:
    dev = MemoryBlockDevice(BLOCKS)
    await FFS.format_volume(dev, GEO, "Damaged")
    vol = await FFS.open_volume(dev, GEO, False)
    header = (await vol.create(vol.root_id, "alpha")).object_id
    await vol.write(header, 0, b"alpha" * 10)
    await vol.close()
    raw = bytearray(dev.data)
    bitmap = struct.unpack_from(">L", raw, ROOT * BS + BS - 196)[0]  # bm_pages[0]
    bit = header - 2
    off = bitmap * BS + 4 + bit // 32 * 4
    struct.pack_into(">L", raw, off, struct.unpack_from(">L", raw, off)[0] | 1 << bit % 32)
    raw[bitmap * BS : bitmap * BS + BS] = with_checksum(raw[bitmap * BS : bitmap * BS + BS], 0)
    return raw, header


async def test_read_only_still_reads_a_file_whose_header_the_bitmap_calls_free() -> None:
    raw, _ = await damaged()
    vol = await FFS.open_volume(MemoryBlockDevice(data=raw), GEO, True)
    (st,) = await vol.readdir(vol.root_id)
    assert st.name == "alpha"
    assert await vol.read(st.object_id, 0, 100) == b"alpha" * 10
    assert (await vol.getattr(st.object_id)).size == 50


async def test_read_write_refuses_it_with_eio_naming_the_block() -> None:
    raw, header = await damaged()
    dev = MemoryBlockDevice(data=raw)
    vol = await FFS.open_volume(dev, GEO, False)
    st = await vol.lookup(vol.root_id, "alpha")
    with pytest.raises(CorruptError) as exc:
        await vol.write(st.object_id, 0, b"changed")
    assert exc.value.errno == errno.EIO and f"header block {header}" in str(exc.value)
    await vol.close()
    report = await FFS.check_volume(dev, GEO, False)
    assert any(f"[{header}]" in e and "marked free" in e for e in report.errors), report.errors
