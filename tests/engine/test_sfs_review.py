"""Review of the SFS engine's second-session changes (issue 6): the root info's
counters of ``.recycled`` (deletedfiles/deletedblocks) stay exact after operations on
files that sit there, and the checker stays clean after every mutation."""

from __future__ import annotations

import pytest

from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.fs.sfs import check_volume, codec, format_volume, open_volume
from amigafuse.fs.sfs.volume import SfsVolume

REC = codec.RECYCLEDNODE


async def fresh(bs: int = 512, dostype: int = SFS0) -> tuple[MemoryBlockDevice, VolumeGeometry, SfsVolume]:
    dev = MemoryBlockDevice(4 * 1024 * 1024 // 512, 512)
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs)
    await format_volume(dev, geo, "Rev")
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol, SfsVolume)
    return dev, geo, vol


async def clean(dev: MemoryBlockDevice, geo: VolumeGeometry, vol: SfsVolume) -> None:
    """Commit and run the checker (counters included) on the device."""
    await vol.sync()
    rep = await check_volume(dev, geo, True)
    assert rep.clean, rep.errors
    assert not rep.warnings, rep.warnings


async def counters(vol: SfsVolume) -> tuple[int, int]:
    ri = await vol.r.root_info()
    return ri.deletedfiles, ri.deletedblocks


@pytest.mark.parametrize(("bs", "dostype"), [(512, SFS0), (1024, SFS2), (4096, SFS0)])
async def test_an_open_file_written_after_it_was_recycled_keeps_the_counters_exact(bs: int, dostype: int) -> None:
    """FUSE keeps an unlinked open file's node: writes and truncates still reach it
    in ``.recycled``.  The root info's block count must follow its size."""
    dev, geo, vol = await fresh(bs, dostype)
    st = await vol.create(vol.root_id, "open.bin")
    await vol.write(st.object_id, 0, b"a" * 100)
    await vol.unlink(vol.root_id, "open.bin")
    assert await counters(vol) == (1, 1)
    await clean(dev, geo, vol)
    await vol.write(st.object_id, 100, b"b" * (5 * bs))  # grows inside .recycled
    await clean(dev, geo, vol)
    await vol.truncate(st.object_id, 0)
    await clean(dev, geo, vol)
    await vol.truncate(st.object_id, 3 * bs + 1)
    await clean(dev, geo, vol)
    await vol.unlink(REC, "open.bin")
    assert await counters(vol) == (0, 0)
    await clean(dev, geo, vol)
    await vol.close()
