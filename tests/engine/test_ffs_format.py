"""format_volume: block sizes, Reserved, big volumes with bitmap extension blocks,
labels; LNFS long names and comment blocks end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.file import FileBlockDevice
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import NameTooLong, NoSpace, UsageError
from amigafuse.fs.api import SetAttrs
from amigafuse.fs.ffs import ENGINE, open_volume
from amigafuse.fs.ffs.format import plan_layout
from amigafuse.fs.ffs.layout import BitmapExtBlock, BootBlock, RootBlock


@pytest.mark.parametrize(("bs", "reserved"), [(512, 2), (512, 4), (1024, 2), (2048, 1), (32768, 1)])
async def test_format_geometries(bs: int, reserved: int) -> None:
    blocks = 3000 if bs <= 2048 else 300
    dev = MemoryBlockDevice(blocks * bs // 512)
    geo = VolumeGeometry(dostype=0x444F5307, fs_block_size=bs, fs_block_count=blocks, reserved=reserved)
    await ENGINE.format_volume(dev, geo, "Geo")
    boot = BootBlock.unpack(bytes(dev.data[:1024]))
    assert boot.disk_type == 0x444F5307
    vol = await open_volume(dev, geo, False)
    assert vol.root_block == (reserved + blocks - 1) // 2
    st = await vol.statfs()
    assert st.block_size == bs and st.total_blocks == blocks - reserved
    f = await vol.create(vol.root_id, "x" * 107)
    await vol.write(f.object_id, 0, b"data" * 5000)
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).clean


async def test_big_volume_uses_bitmap_extension_blocks(tmp_path: Path) -> None:
    path = tmp_path / "big.hdf"
    blocks = 3 << 20  # 1.5 GiB of 512-byte blocks: 745 bitmap blocks, 25 in the root
    with open(path, "wb") as f:
        f.truncate(blocks * 512)
    dev = FileBlockDevice(str(path))
    geo = VolumeGeometry(dostype=0x444F5303, fs_block_count=blocks, reserved=2)
    root_block, _, pages, exts = plan_layout(blocks, 2, 512, False)
    assert len(pages) == -(-(blocks - 2) // (127 * 32)) and len(exts) == 6
    await ENGINE.format_volume(dev, geo, "Big")
    root = RootBlock.unpack(await dev.read(root_block, 1))
    assert root.bm_ext == exts[0]
    ext0 = BitmapExtBlock.unpack(await dev.read(exts[0], 1))
    assert ext0.bm_pages[0] == pages[25] and ext0.bm_ext == exts[1]
    vol = await open_volume(dev, geo, False)
    assert (await vol.statfs()).free_blocks == blocks - 2 - 1 - len(pages) - len(exts)
    f = await vol.create(vol.root_id, "f")
    await vol.write(f.object_id, 0, b"q" * 100_000)
    await vol.close()
    report = await ENGINE.check_volume(dev, geo, False)
    assert report.errors == []


async def test_format_refuses() -> None:
    dev = MemoryBlockDevice(100)
    with pytest.raises(UsageError):
        await ENGINE.format_volume(dev, VolumeGeometry(dostype=0x53465300, fs_block_count=100), "x")
    with pytest.raises(NameTooLong):
        await ENGINE.format_volume(dev, VolumeGeometry(dostype=0x444F5301, fs_block_count=100), "x" * 31)
    with pytest.raises(NoSpace):
        await ENGINE.format_volume(MemoryBlockDevice(8), VolumeGeometry(dostype=0x444F5301, fs_block_count=8), "x")


async def test_lnfs_names_and_comment_blocks() -> None:
    dev = MemoryBlockDevice(4000)
    geo = VolumeGeometry(dostype=0x444F5307, fs_block_count=4000, reserved=2)
    await ENGINE.format_volume(dev, geo, "Long")
    vol = await open_volume(dev, geo, False)
    long_name = "L" * 100
    f = await vol.create(vol.root_id, long_name)
    with pytest.raises(NameTooLong):
        await vol.create(vol.root_id, "y" * 108)
    free0 = (await vol.statfs()).free_blocks
    st = await vol.setattr(f.object_id, SetAttrs(comment="c" * 79))  # does not fit: a T_COMMENT block
    assert st.comment == "c" * 79
    assert (await vol.statfs()).free_blocks == free0 - 1
    await vol.rename(vol.root_id, long_name, vol.root_id, "short")  # now it fits inline again
    assert (await vol.lookup(vol.root_id, "SHORT")).comment == "c" * 79
    assert (await vol.statfs()).free_blocks == free0
    await vol.rename(vol.root_id, "short", vol.root_id, "M" * 107)  # and back into a block
    await vol.set_label("Renamed")
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).clean
    vol = await open_volume(dev, geo, True)
    st = await vol.lookup(vol.root_id, "m" * 107)
    assert st.comment == "c" * 79 and st.name == "M" * 107
    assert vol.info.label == "Renamed"


async def test_root_one_block_later_is_found() -> None:
    """Partition tables that count one or two blocks fewer than the formatter did: the
    root is then one block past the rule, where Linux affs also looks."""
    dev = MemoryBlockDevice(3002)
    await ENGINE.format_volume(dev, VolumeGeometry(dostype=0x444F5301, fs_block_count=3002, reserved=2), "Plus1")
    geo = VolumeGeometry(dostype=0x444F5301, fs_block_count=3000, reserved=2)
    vol = await open_volume(dev, geo, True)
    assert vol.root_block == 1501 and vol.info.label == "Plus1"
