"""The FFS engine's per-file costs that ``cp -a`` of many small files pays (issue 5,
"Speed"): the shortcuts taken there must give what the plain ways give.

* ``EntryBlock.new`` fills the frozen dataclass without its ``__init__``: the same
  fields as the constructor plus ``with_name_comment``, and the same bytes on disk;
* the directory-name index is counted every ``INDEX_CHECK_EVERY`` operations instead of
  on every one: past ``INDEX_LIMIT`` it is still dropped, and lookups stay right after;
* a write sets size, archive bit and date in one step: the header says what it said
  before (size, archive bit cleared, date of the write).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amigafuse.amiga.dates import DateStamp
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.fs.api import FIBF_ARCHIVE, Kind, SetAttrs, Stat
from amigafuse.fs.ffs import ENGINE, open_volume
from amigafuse.fs.ffs import volume as ffs_volume
from amigafuse.fs.ffs.layout import (
    MAX_NAME_LNFS,
    MAX_NAME_STD,
    ST_FILE,
    ST_SOFTLINK,
    ST_USERDIR,
    T_HEADER,
    EntryBlock,
    table_size,
)
from amigafuse.fs.ffs.writer import FfsVolume


def reference_new(
    block_size: int, lnfs: bool, *, header_key: int, sec_type: int, parent: int,
    name: bytes, date: DateStamp, protect: int,
) -> EntryBlock:  # fmt: skip
    """EntryBlock.new as it was built before (the dataclass constructor, then the name)."""
    blank = EntryBlock(
        block_size, lnfs, T_HEADER, header_key, 0, 0, 0, 0, (0,) * table_size(block_size),
        0, 0, 0, protect, 0, bytes(112 if lnfs else 92), 0, bytes(8) if lnfs else b"",
        date.days, date.minutes, date.ticks, b"" if lnfs else bytes(32), 0, 0, 0,
        bytes(20), 0, parent, 0, sec_type,
    )  # fmt: skip
    return blank.with_name_comment(name, b"")


@settings(max_examples=150, deadline=None)
@given(
    lnfs=st.booleans(),
    block_size=st.sampled_from([512, 1024, 4096]),
    header_key=st.integers(0, 0xFFFFFFFF),
    parent=st.integers(0, 0xFFFFFFFF),
    sec_type=st.sampled_from([ST_FILE, ST_USERDIR, ST_SOFTLINK]),
    protect=st.integers(0, 0xFFFFFFFF),
    days=st.integers(0, 0xFFFFFFFF),
    minutes=st.integers(0, 1439),
    ticks=st.integers(0, 2999),
    data=st.data(),
)
def test_new_entry_is_what_the_constructor_builds(
    lnfs: bool, block_size: int, header_key: int, parent: int, sec_type: int, protect: int,
    days: int, minutes: int, ticks: int, data: st.DataObject,
) -> None:  # fmt: skip
    name = data.draw(st.binary(min_size=1, max_size=MAX_NAME_LNFS if lnfs else MAX_NAME_STD))
    kw = dict(header_key=header_key, sec_type=sec_type, parent=parent, name=name,
              date=DateStamp(days, minutes, ticks), protect=protect)  # fmt: skip
    got = EntryBlock.new(block_size, lnfs, **kw)  # type: ignore[arg-type]
    want = reference_new(block_size, lnfs, **kw)  # type: ignore[arg-type]
    assert got == want
    assert got.__dict__ == want.__dict__  # no field more or less
    assert got.name == name and got.inline_comment == b""
    assert got.pack() == want.pack()
    assert EntryBlock.unpack(got.pack(), lnfs) == got


def test_new_entry_refuses_a_name_too_long_as_before() -> None:
    date = DateStamp(1, 2, 3)
    with pytest.raises(ValueError):
        EntryBlock.new(512, False, header_key=5, sec_type=ST_FILE, parent=4, name=b"x" * 32, date=date)
    with pytest.raises(ValueError):
        reference_new(512, False, header_key=5, sec_type=ST_FILE, parent=4, name=b"x" * 32, date=date, protect=0)


async def _fresh_volume(dostype: int = 0x444F5303) -> FfsVolume:
    dev = MemoryBlockDevice(8000)
    geo = VolumeGeometry(dostype=dostype, fs_block_size=512, fs_block_count=8000, reserved=2)
    await ENGINE.format_volume(dev, geo, "Small")
    return await open_volume(dev, geo, False)


async def test_the_name_index_is_still_dropped_past_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    vol = await _fresh_volume()
    root = vol.root_id
    dirs = [await vol.mkdir(root, f"d{i}") for i in range(3)]
    for d in dirs:
        for j in range(4):
            await vol.create(d.object_id, f"f{j}")
        await vol.readdir(d.object_id)  # builds the directory's name index
    assert sum(map(len, vol._index.values())) >= 12
    monkeypatch.setattr(ffs_volume, "INDEX_LIMIT", 5)
    for _ in range(ffs_volume.INDEX_CHECK_EVERY):
        vol._maybe_evict()
    assert vol._index == {}  # counted once in INDEX_CHECK_EVERY calls, and dropped
    # lookups without the index find the same entries; a miss is still a miss
    for d in dirs:
        assert (await vol.lookup(d.object_id, "F3")).name == "f3"
        with pytest.raises(Exception) as exc:
            await vol.lookup(d.object_id, "f9")
        assert getattr(exc.value, "errno", None) == 2
    await vol.close()


async def test_the_index_is_not_dropped_below_its_limit() -> None:
    vol = await _fresh_volume()
    d = await vol.mkdir(vol.root_id, "d")
    await vol.create(d.object_id, "f")
    await vol.readdir(d.object_id)
    index = dict(vol._index)
    for _ in range(2 * ffs_volume.INDEX_CHECK_EVERY):
        vol._maybe_evict()
    assert vol._index == index
    await vol.close()


@pytest.mark.parametrize("dostype", [0x444F5301, 0x444F5303, 0x444F5305, 0x444F5307])
async def test_a_write_sets_size_archive_bit_and_date_together(dostype: int) -> None:
    vol = await _fresh_volume(dostype)
    f = await vol.create(vol.root_id, "file", protection=FIBF_ARCHIVE | 0x0F00)
    old = DateStamp(100, 10, 5)
    await vol.setattr(f.object_id, SetAttrs(date=old))
    assert (await vol.getattr(f.object_id)).protection & FIBF_ARCHIVE
    assert await vol.write(f.object_id, 0, b"x" * 700) == 700
    st = await vol.getattr(f.object_id)
    assert st.size == 700
    assert st.protection == 0x0F00  # the archive bit cleared, nothing else
    assert st.date > old  # the write's time
    block = vol._block_for(f.object_id)
    e = vol._meta[block]
    assert isinstance(e, EntryBlock) and e.byte_size == 700 and e.date == st.date
    await vol.close()


@pytest.mark.parametrize("dostype", [0x444F5301, 0x444F5305, 0x444F5307])
async def test_setattr_changes_every_field_asked_in_one_step(dostype: int) -> None:
    vol = await _fresh_volume(dostype)
    f = await vol.create(vol.root_id, "file", protection=0x0F)
    date = DateStamp(9000, 700, 1234)
    st = await vol.setattr(f.object_id, SetAttrs(protection=0x1_0000_00F0, date=date, uid=0x1_2345, gid=7))
    assert (st.protection, st.date, st.uid, st.gid) == (0xF0, date, 0x2345, 7)
    only_date = DateStamp(9001, 1, 2)
    st = await vol.setattr(f.object_id, SetAttrs(date=only_date))
    assert (st.protection, st.date, st.uid, st.gid) == (0xF0, only_date, 0x2345, 7)
    st = await vol.setattr(f.object_id, SetAttrs())  # nothing asked: nothing changes
    assert (st.protection, st.date, st.uid, st.gid) == (0xF0, only_date, 0x2345, 7)
    await vol.close()


@pytest.mark.parametrize("dostype", [0x444F5301, 0x444F5305, 0x444F5307])
async def test_stats_are_what_the_constructor_builds(dostype: int) -> None:
    # _stat_real fills Stat without its __init__: every field, equal to a constructed one
    vol = await _fresh_volume(dostype)
    root = vol.root_id
    d = await vol.mkdir(root, "Dir")
    f = await vol.create(d.object_id, "File", protection=0x8F0)
    await vol.write(f.object_id, 0, b"y" * 1500)
    await vol.setattr(f.object_id, SetAttrs(comment="a comment"))
    await vol.symlink(root, "Soft", "Dir/File")
    await vol.link(f.object_id, root, "Hard")
    stats = [await vol.getattr(f.object_id), *await vol.readdir(root), await vol.lookup(d.object_id, "file")]
    assert {s.name for s in stats} >= {"File", "Dir", "Soft", "Hard"}
    for s in stats:
        built = Stat(**{k: getattr(s, k) for k in Stat.__dataclass_fields__})
        assert s == built and s.__dict__ == built.__dict__ and hash(s) == hash(built)
    file_stat = await vol.getattr(f.object_id)
    assert (file_stat.size, file_stat.comment, file_stat.nlink, file_stat.kind) == (1500, "a comment", 2, Kind.FILE)
    assert file_stat.disk_blocks == 1 + -(-1500 // vol.payload)
    await vol.close()
