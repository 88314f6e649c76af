"""Review of issue 4 (the FFS write paths): full volumes, crash images (between and
inside write-backs), cancellation, LNFS promotion, and a wider random-operation model
checked after every step.  A test whose docstring names a failure failed before the fix
committed with it; the others guard what the fixes must not break."""

from __future__ import annotations

import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
from amitools.fs.ADFSVolume import ADFSVolume
from amitools.fs.blkdev.BlkDevFactory import BlkDevFactory
from amitools.fs.FSString import FSString
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import (
    DirectoryNotEmpty,
    Exists,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotFound,
)
from amigafuse.fs.api import Kind, SetAttrs
from amigafuse.fs.ffs import ENGINE, open_volume
from amigafuse.fs.ffs.bitmap import Bitmap, _clear_bits, _swap_longs
from amigafuse.fs.ffs.layout import upper_name
from amigafuse.fs.ffs.writer import ZERO_CHUNK
from tests.conftest import content
from tests.engine.test_ffs_cancel import CancellingDevice

DOS5 = 0x444F5305
DOS7 = 0x444F5307


async def fresh(dostype: int, blocks: int, bs: int = 512) -> tuple[MemoryBlockDevice, VolumeGeometry]:
    dev = MemoryBlockDevice(blocks * (bs // 512))
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs, fs_block_count=blocks, reserved=2)
    await ENGINE.format_volume(dev, geo, "Review2")
    return dev, geo


async def fill(vol: Any, dir_id: int, leave: int = 0) -> None:
    """Write filler files until exactly ``leave`` (0 or 1) blocks are free: the one
    left is a one-block file's data, freed at the end."""
    spacer = await vol.create(dir_id, "zz_spacer") if leave else None
    if spacer is not None:
        await vol.write(spacer.object_id, 0, b"s")
    f = await vol.create(dir_id, "zz_filler")
    size = 0
    step = vol.block_size * 16
    while step >= 1 and (await vol.statfs()).free_blocks:
        try:
            await vol.write(f.object_id, size, bytes(step))
            size += step
        except NoSpace:
            step //= 2
    assert (await vol.statfs()).free_blocks == 0
    if spacer is not None:
        await vol.truncate(spacer.object_id, 0)
        assert (await vol.statfs()).free_blocks == 1


async def clean(dev: MemoryBlockDevice, geo: VolumeGeometry) -> list[str]:
    """The checker's errors *and warnings* on what is on ``dev`` now (a copy, opened
    read-only), except the bitmap-valid flag a live read-write volume keeps clear.  We
    write no block a warning is about (unsorted hash chains, stale dircache records,
    blocks past a file's end, OFS sequence numbers)."""
    snap = MemoryBlockDevice(data=bytes(dev.data), read_only=True)
    report = await ENGINE.check_volume(snap, geo, False)
    return [e for e in report.errors if "bitmap-valid flag" not in e] + report.warnings


# ------------------------------------------------------------------ full volumes
async def test_dcfs_comment_that_needs_a_new_dircache_block_on_a_full_volume() -> None:
    """setattr(comment) on DOS\\5 whose record no longer fits its dircache block, on a
    full volume: the record was removed, the new block could not be found, NoSpace left
    the directory without a record of the file (check: "dircache lacks entry")."""
    dev, geo = await fresh(DOS5, 400)
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "d")
    ids = [(await vol.create(d.object_id, f"file_with_a_name_{i:02}")).object_id for i in range(10)]
    await fill(vol, vol.root_id)
    assert (await vol.statfs()).free_blocks == 0
    refused = 0
    for oid in ids:
        try:
            await vol.setattr(oid, SetAttrs(comment="c" * 79))
        except NoSpace:
            refused += 1
            assert (await vol.getattr(oid)).comment == ""
        await vol.sync()
        assert await clean(dev, geo) == []
    assert refused  # the dircache block did overflow
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


async def _full_dircache_dir(vol: Any, parent: int, name: str) -> int:
    """A new directory whose dircache blocks are all full: files are created until a
    record needs a new block, then the last one is removed again (its block goes)."""
    d: int = (await vol.mkdir(parent, name)).object_id
    block = vol._block_for(d)
    for i in range(200):
        await vol.create(d, f"a_rather_long_file_name_{i:03}")
        if len(vol._dc_blocks(block)) == 2:
            await vol.unlink(d, f"a_rather_long_file_name_{i:03}")
            assert len(vol._dc_blocks(block)) == 1
            return d
    raise AssertionError("the dircache never grew")


async def test_dcfs_create_and_rename_when_the_dircache_block_is_full_on_a_full_volume() -> None:
    """create/rename into a DOS\\5 directory whose dircache blocks are full, on a full
    volume: the header was hooked into its hash chain before the dircache block for its
    record was looked for; NoSpace then left an entry without a record."""
    dev, geo = await fresh(DOS5, 400)
    vol = await open_volume(dev, geo, False)
    e = await vol.mkdir(vol.root_id, "e")
    for i in range(2):
        await vol.create(e.object_id, f"moving_{i}")
    d = await _full_dircache_dir(vol, vol.root_id, "d")
    before = {s.name for s in await vol.readdir(d)}
    await fill(vol, vol.root_id, leave=1)
    assert (await vol.statfs()).free_blocks == 1
    with pytest.raises(NoSpace):  # the header fits, its dircache record does not
        await vol.create(d, "one_more")
    assert {s.name for s in await vol.readdir(d)} == before
    await vol.sync()
    assert await clean(dev, geo) == []
    spacer = await vol.lookup(vol.root_id, "zz_spacer")
    await vol.write(spacer.object_id, 0, b"s")  # the last block
    assert (await vol.statfs()).free_blocks == 0
    with pytest.raises(NoSpace):
        await vol.rename(e.object_id, "moving_0", d, "moved_0")
    assert {s.name for s in await vol.readdir(e.object_id)} == {"moving_0", "moving_1"}
    await vol.sync()
    assert await clean(dev, geo) == []
    await vol.rename(e.object_id, "moving_1", e.object_id, "renamed_1")  # room in its own
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


async def test_lnfs_rename_that_moves_the_comment_to_a_block_on_a_full_volume() -> None:
    """rename on DOS\\7 to a longer name that pushes the comment out of the shared field
    into a T_COMMENT block, on a full volume: the entry had been taken out of its hash
    chain before the comment block was allocated; NoSpace then lost the file."""
    dev, geo = await fresh(DOS7, 400)
    vol = await open_volume(dev, geo, False)
    f = await vol.create(vol.root_id, "short")
    await vol.write(f.object_id, 0, b"keep me")
    await vol.setattr(f.object_id, SetAttrs(comment="k" * 70))  # 2+5+70 fits the field
    await fill(vol, vol.root_id)
    assert (await vol.statfs()).free_blocks == 0
    with pytest.raises(NoSpace):
        await vol.rename(vol.root_id, "short", vol.root_id, "n" * 60)  # 2+60+70 does not
    st = await vol.lookup(vol.root_id, "short")
    assert st.comment == "k" * 70 and await vol.read(st.object_id, 0, 100) == b"keep me"
    await vol.sync()
    assert await clean(dev, geo) == []
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


# ------------------------------------------------------------------ crash images
async def test_blocks_freed_since_the_last_write_back_are_not_reused_before_it() -> None:
    """The image as it is on the device between write-backs (a crash): deleted headers
    still hang in their hash chains on the disk until the next write-back, so their
    blocks must not take new data before it.  They did (freed at once in the bitmap):
    a big file's data landed on them, the tree on the disk had checksum errors, and the
    next mount could not validate the volume (read-only, check --repair refused)."""
    dev, geo = await fresh(0x444F5303, 3000)
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "d")
    for i in range(12):
        f = await vol.create(d.object_id, f"f{i}")
        await vol.write(f.object_id, 0, content(f"f{i}", 1000))
    await vol.sync()
    for i in range(12):
        await vol.unlink(d.object_id, f"f{i}")
    big = await vol.create(vol.root_id, "big")
    await vol.write(big.object_id, 0, content("big", 300_000))  # written through, not staged
    crash = MemoryBlockDevice(data=bytes(dev.data))  # no write-back since the deletes
    await vol.close()
    after = await open_volume(crash, geo, False)
    assert not after.read_only, after.info.notes
    assert any("validated" in n for n in after.info.notes)
    dd = await after.lookup(after.root_id, "d")
    names = sorted(s.name for s in await after.readdir(dd.object_id))
    assert names == sorted(f"f{i}" for i in range(12))  # the old state
    st = await after.lookup(dd.object_id, "f3")
    assert await after.read(st.object_id, 0, 2000) == content("f3", 1000)
    await after.close()
    assert (await ENGINE.check_volume(crash, geo, False)).errors == []
    # and what was closed is the new state
    vol = await open_volume(dev, geo, True)
    assert await vol.readdir((await vol.lookup(vol.root_id, "d")).object_id) == []
    st = await vol.lookup(vol.root_id, "big")
    assert await vol.read(st.object_id, 0, 400_000) == content("big", 300_000)
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


async def test_freed_blocks_come_back_when_the_volume_is_full() -> None:
    """The other side of the rule above: on a full volume, what a delete freed is
    usable by the next write (a write-back first), and statfs counts it at once."""
    dev, geo = await fresh(0x444F5301, 400)
    vol = await open_volume(dev, geo, False)
    g = await vol.create(vol.root_id, "gone")
    await vol.write(g.object_id, 0, bytes(20 * 512))
    await fill(vol, vol.root_id)
    await vol.unlink(vol.root_id, "gone")
    assert (await vol.statfs()).free_blocks >= 21
    h = await vol.create(vol.root_id, "new")
    await vol.write(h.object_id, 0, content("new", 20 * 488))
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


async def test_promotion_on_a_full_dcfs_volume() -> None:
    """Deleting the original name of a hard-linked DOS\\5 file on a full volume: the
    link's dircache record grows by the object's comment and may need a new dircache
    block; the original's header, freed by that same delete, is the one to take."""
    dev, geo = await fresh(DOS5, 400)
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "d")
    f = await vol.create(d.object_id, "orig")
    await vol.write(f.object_id, 0, b"linked data")
    await vol.setattr(f.object_id, SetAttrs(comment="c" * 79))
    full = await _full_dircache_dir(vol, vol.root_id, "full")
    await vol.unlink(full, "a_rather_long_file_name_000")  # room for the link's record only
    await vol.link(f.object_id, full, "the_link")
    await fill(vol, vol.root_id)
    await vol.unlink(d.object_id, "orig")
    st = await vol.lookup(full, "the_link")
    assert st.comment == "c" * 79 and await vol.read(st.object_id, 0, 100) == b"linked data"
    await vol.sync()
    assert await clean(dev, geo) == []
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []


@pytest.mark.parametrize("full", [False, True])
async def test_lnfs_promotion_to_a_long_link_name_moves_the_comment_to_a_block(full: bool) -> None:
    """Deleting the original name of a DOS\7 file whose hard link has a long name: the
    promoted header takes the link's name, and name + comment no longer fit the shared
    112-byte field.  The header was packed over its size (struct.error at every later
    write-back: nothing could be written any more, not even at unmount).  Found by the
    wide model (32768-byte blocks).  On a full volume the comment block is the freed
    original header."""
    dev, geo = await fresh(DOS7, 400)
    vol = await open_volume(dev, geo, False)
    f = await vol.create(vol.root_id, "a")
    await vol.write(f.object_id, 0, b"data")
    await vol.setattr(f.object_id, SetAttrs(comment="c" * 20))
    await vol.link(f.object_id, vol.root_id, "L" * 107)
    if full:
        await fill(vol, vol.root_id)
    await vol.unlink(vol.root_id, "a")
    await vol.sync()
    assert await clean(dev, geo) == []
    st = await vol.lookup(vol.root_id, "L" * 107)
    assert st.comment == "c" * 20 and await vol.read(st.object_id, 0, 10) == b"data"
    await vol.close()
    assert (await ENGINE.check_volume(dev, geo, False)).errors == []
    vol = await open_volume(dev, geo, True)
    st = await vol.lookup(vol.root_id, "L" * 107)
    assert st.comment == "c" * 20 and st.nlink == 1


# ------------------------------------------------------------------ cancellation
async def test_rename_onto_an_existing_name_is_all_or_nothing_when_cancelled() -> None:
    """rename onto an existing name on DOS\\7, the source's comment in a T_COMMENT
    block not yet read: the destination was deleted, then the comment block was read
    (a checkpoint); cancelled there, the destination was gone and the source not
    moved.  Now, cancelled at any device request: the old state or the new one."""
    dev, geo = await fresh(DOS7, 3000)
    vol = await open_volume(dev, geo, False)
    src = await vol.create(vol.root_id, "s" * 50)
    await vol.write(src.object_id, 0, b"source")
    await vol.setattr(src.object_id, SetAttrs(comment="m" * 79))  # 2+50+79 > 112: a block
    dst = await vol.create(vol.root_id, "dst")
    await vol.write(dst.object_id, 0, b"destination")
    await vol.close()
    raw = bytes(dev.data)

    async def op(v: Any) -> None:
        await v.rename(v.root_id, "s" * 50, v.root_id, "dst")

    probe = CancellingDevice(raw)
    v = await open_volume(probe, geo, False)
    start = probe.count
    await op(v)
    total = probe.count - start
    await v.close()
    assert total >= 2
    for k in range(1, total + 1):
        cdev = CancellingDevice(raw)
        v = await open_volume(cdev, geo, False)
        with trio.CancelScope() as scope:
            cdev.scope = scope
            cdev.cancel_at = cdev.count + k
            await op(v)
        cdev.scope = None
        await v.close()
        assert (await ENGINE.check_volume(cdev, geo, False)).errors == [], k
        after = await open_volume(cdev, geo, True)
        found = {s.name: s for s in await after.readdir(after.root_id)}
        if "s" * 50 in found:  # old state
            assert await after.read(found["dst"].object_id, 0, 100) == b"destination", k
        else:  # new state
            assert await after.read(found["dst"].object_id, 0, 100) == b"source", k
            assert found["dst"].comment == "m" * 79, k


# ------------------------------------------------------------------ the wider model
# Random operation sequences with what test_ffs_model.py leaves out: soft links, hard
# links to files *and* directories with the original deleted (promotion), comments
# (LNFS: in the shared field or a T_COMMENT block), names at and past the length
# limit, case-only renames, renames onto existing names and into the own subtree,
# writes past the end (holes), truncates across extension-block boundaries, and small
# volumes that fill up (NoSpace must change nothing).  After every step the volume is
# written back and the checker must find the image clean (dircache exact, bitmap
# exact, link chains), and the volume must list and read as the model says.
# FFS_REVIEW2_EXAMPLES raises the example count (local campaigns).

REVIEW2_EXAMPLES = int(os.environ.get("FFS_REVIEW2_EXAMPLES", "4"))


class _Obj:
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "file", "dir", "soft"
        self.data = bytearray()
        self.target = ""
        self.comment = ""
        self.names: list[tuple[int, bytes]] = []  # [0]: the object's own header; then its link chain


class WideModel(RuleBasedStateMachine):
    dostype = 0x444F5303
    block_size = 512
    blocks = 1760
    reserved = 2

    def __init__(self) -> None:
        super().__init__()
        self.intl = (self.dostype & 0xFF) >= 2
        self.lnfs = (self.dostype & 0xFF) >= 6
        self.max_name = 107 if self.lnfs else 30
        base = ["a", "A", "b", "Bb", "dir", "x.txt", "F"]
        if self.intl:
            base += ["äö", "ÄÖ", "æble"]
        self.names = [*base, "N" * self.max_name, "n" * self.max_name, "L" * (self.max_name + 1)]
        self.dev = MemoryBlockDevice(self.blocks * (self.block_size // 512))
        self.geo = VolumeGeometry(dostype=self.dostype, fs_block_size=self.block_size,
                                  fs_block_count=self.blocks, reserved=self.reserved)  # fmt: skip
        trio.run(ENGINE.format_volume, self.dev, self.geo, "Wide")
        self.vol: Any = trio.run(open_volume, self.dev, self.geo, False)
        self.root = self.vol.root_id
        self.objs: dict[int, _Obj] = {self.root: _Obj("dir")}
        self.dirs: dict[int, dict[bytes, tuple[str, int]]] = {self.root: {}}
        self.payload = self.block_size if (self.dostype & 1) else self.block_size - 24
        self.table = self.block_size // 4 - 56

    # ---- helpers
    def key(self, name: str) -> bytes:
        return upper_name(name.encode("latin-1"), self.intl)

    def run(self, fn: Any, *args: Any) -> Any:
        return trio.run(fn, *args)

    def entries(self, kinds: tuple[str, ...]) -> list[tuple[int, str, int]]:
        return sorted((d, n, o) for d, ents in self.dirs.items() for n, o in ents.values() if self.objs[o].kind in kinds)

    def parent(self, obj: int) -> int:
        return self.objs[obj].names[0][0] if obj != self.root else self.root

    def inside(self, d: int, obj: int) -> bool:
        """Whether directory ``d`` is ``obj`` or below it (real parents)."""
        for _ in range(1000):
            if d == obj:
                return True
            if d == self.root:
                return False
            d = self.parent(d)
        raise AssertionError("parent loop in the model")

    def drop_name(self, d: int, key: bytes) -> None:
        """Remove one name; the object goes with its last name (a promotion otherwise)."""
        _, obj = self.dirs[d].pop(key)
        o = self.objs[obj]
        o.names.remove((d, key))
        if not o.names:
            del self.objs[obj]
            self.dirs.pop(obj, None)

    def add_name(self, d: int, name: str, obj: int, link: bool) -> None:
        self.dirs[d][self.key(name)] = (name, obj)
        o = self.objs[obj]
        if link:
            o.names.insert(1, (d, self.key(name)))  # a new link heads the link chain
        else:
            o.names.append((d, self.key(name)))

    def expect_nospace_or(self, fn: Any, *args: Any) -> Any:
        try:
            return self.run(fn, *args)
        except NoSpace:
            return NoSpace

    # ---- rules
    @initialize()
    def start(self) -> None:
        pass

    @rule(data=st.data(), kind=st.sampled_from(["file", "dir", "soft"]))
    def create(self, data: st.DataObject, kind: str) -> None:
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        name = data.draw(st.sampled_from(self.names))
        target = data.draw(st.sampled_from(["a", "/dir/x.txt", "Wide:b", "../a"]))
        args: tuple[Any, ...] = (d, name)
        if kind == "file":
            fn = self.vol.create
        elif kind == "dir":
            fn = self.vol.mkdir
        else:
            fn, args = self.vol.symlink, (d, name, target)
        if len(name) > self.max_name:
            with pytest.raises(NameTooLong):
                self.run(fn, *args)
            return
        if self.key(name) in self.dirs[d]:
            with pytest.raises(Exists):
                self.run(fn, *args)
            return
        got = self.expect_nospace_or(fn, *args)
        if got is NoSpace:
            return
        o = _Obj(kind)
        if kind == "soft":
            o.target = target
        self.objs[got.object_id] = o
        if kind == "dir":
            self.dirs[got.object_id] = {}
        self.add_name(d, name, got.object_id, link=False)

    def _write(self, obj: int, offset: int, payload: bytes) -> None:
        got = self.expect_nospace_or(self.vol.write, obj, offset, payload)
        if got is NoSpace:
            return  # nothing changed: the step's comparison says so
        buf = self.objs[obj].data
        if payload:
            if len(buf) < offset:
                buf.extend(bytes(offset - len(buf)))
            buf[offset : offset + len(payload)] = payload

    @precondition(lambda self: self.entries(("file",)))
    @rule(data=st.data(), offset=st.integers(0, 9000), size=st.integers(0, 3000))
    def write(self, data: st.DataObject, offset: int, size: int) -> None:
        _, _, obj = data.draw(st.sampled_from(self.entries(("file",))))
        self._write(obj, offset, bytes((offset * 3 + i * 7) & 0xFF for i in range(size)))

    @precondition(lambda self: self.entries(("file",)))
    @rule(data=st.data(), blocks=st.integers(50, 700))
    def big_write(self, data: st.DataObject, blocks: int) -> None:
        _, _, obj = data.draw(st.sampled_from(self.entries(("file",))))
        offset = len(self.objs[obj].data) if data.draw(st.booleans()) else 0
        self._write(obj, offset, bytes([blocks & 0xFF]) * (blocks * self.payload))

    @precondition(lambda self: self.entries(("file",)))
    @rule(data=st.data(), tables=st.integers(0, 3), delta=st.integers(-2, 2))
    def truncate(self, data: st.DataObject, tables: int, delta: int) -> None:
        """Sizes at extension-block boundaries (one table of data blocks and around)."""
        _, _, obj = data.draw(st.sampled_from(self.entries(("file",))))
        size = max(0, tables * self.table * self.payload + delta * self.payload + data.draw(st.integers(-1, 1)))
        buf = self.objs[obj].data
        if self.expect_nospace_or(self.vol.truncate, obj, size) is NoSpace:
            # growing is done in complete 1 MiB steps (docs/ffs.md): some may be done
            now = self.run(self.vol.getattr, obj).size
            grown = now - len(buf)
            assert grown >= 0 and grown % ZERO_CHUNK == 0 and now < size, (len(buf), now, size)
            buf.extend(bytes(grown))
            return
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))

    @precondition(lambda self: self.entries(("file", "dir")))
    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        _, _, obj = data.draw(st.sampled_from(self.entries(("file", "dir"))))
        if obj == self.root:
            return
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        name = data.draw(st.sampled_from(self.names[:-1]))
        if self.key(name) in self.dirs[d]:
            with pytest.raises(Exists):
                self.run(self.vol.link, obj, d, name)
            return
        got = self.expect_nospace_or(self.vol.link, obj, d, name)
        if got is NoSpace:
            return
        assert got.object_id == obj
        self.add_name(d, name, obj, link=True)

    @precondition(lambda self: self.entries(("file", "soft", "dir")))
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        d, name, obj = data.draw(st.sampled_from(self.entries(("file", "soft", "dir"))))
        o = self.objs[obj]
        if o.kind == "dir":
            is_link = o.names[0] != (d, self.key(name))
            if not is_link and self.dirs[obj]:
                with pytest.raises(DirectoryNotEmpty):
                    self.run(self.vol.rmdir, d, name)
                return
            self.run(self.vol.rmdir, d, name)
        else:
            self.run(self.vol.unlink, d, name)
        self.drop_name(d, self.key(name))

    @precondition(lambda self: self.entries(("file", "dir")))
    @rule(data=st.data(), comment=st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=79))
    def set_comment(self, data: st.DataObject, comment: str) -> None:
        _, _, obj = data.draw(st.sampled_from(self.entries(("file", "dir"))))
        if self.expect_nospace_or(self.vol.setattr, obj, SetAttrs(comment=comment)) is NoSpace:
            return
        self.objs[obj].comment = comment

    @precondition(lambda self: self.entries(("file", "soft", "dir")))
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        d, name, obj = data.draw(st.sampled_from(self.entries(("file", "soft", "dir"))))
        dst = data.draw(st.sampled_from(sorted(self.dirs)))
        if data.draw(st.booleans()):  # a case-only rename in place, or any name
            dst, new = d, name.swapcase()
        else:
            new = data.draw(st.sampled_from(self.names))
        o = self.objs[obj]
        own = o.names[0] == (d, self.key(name))
        if len(new) > self.max_name:
            with pytest.raises(NameTooLong):
                self.run(self.vol.rename, d, name, dst, new)
            return
        if o.kind == "dir" and own and self.inside(dst, obj):
            with pytest.raises(InvalidArgument):
                self.run(self.vol.rename, d, name, dst, new)
            return
        existing = self.dirs[dst].get(self.key(new))
        same_entry = (d, self.key(name)) == (dst, self.key(new))
        if existing is not None and not same_entry:
            eobj = existing[1]
            if eobj == obj:
                self.run(self.vol.rename, d, name, dst, new)
                return  # both names are one object: nothing happens
            eo = self.objs[eobj]
            e_is_link = eo.names[0] != (dst, self.key(new))
            want: type[Exception] | None = None
            if o.kind == "dir" and eo.kind != "dir":
                want = NotADirectory
            elif eo.kind == "dir" and o.kind != "dir":
                want = IsADirectory
            elif eo.kind == "dir" and not e_is_link and self.dirs[eobj]:
                want = DirectoryNotEmpty
            if want is not None:
                with pytest.raises(want):
                    self.run(self.vol.rename, d, name, dst, new)
                return
        if self.expect_nospace_or(self.vol.rename, d, name, dst, new) is NoSpace:
            return
        if existing is not None and not same_entry:
            self.drop_name(dst, self.key(new))
        pos = o.names.index((d, self.key(name)))
        del self.dirs[d][self.key(name)]
        self.dirs[dst][self.key(new)] = (new, obj)
        o.names[pos] = (dst, self.key(new))

    # ---- after every step
    async def _compare(self, vol: Any, by_id: bool = True) -> None:
        """The volume against the model; ``by_id``: the ids too (one session only)."""
        seen = {self.root}
        todo = [(self.root, vol.root_id)]
        while todo:
            d, vd = todo.pop()
            listing = {s.name: s for s in await vol.readdir(vd)}
            assert sorted(listing) == sorted(n for n, _ in self.dirs[d].values())
            for name, obj in self.dirs[d].values():
                s = listing[name]
                o = self.objs[obj]
                assert s.object_id == obj or not by_id, name
                if o.kind == "file":
                    assert s.kind == Kind.FILE and s.size == len(o.data), name
                    assert await vol.read(s.object_id, 0, 1 << 22) == bytes(o.data), name
                    assert s.nlink == len(o.names), name
                elif o.kind == "soft":
                    assert s.kind == Kind.SOFTLINK and await vol.readlink(s.object_id) == o.target
                else:
                    assert s.kind == Kind.DIR
                    if obj not in seen:
                        seen.add(obj)
                        todo.append((obj, s.object_id))
                if o.kind != "soft":
                    assert s.comment == o.comment, name

    @invariant()
    def written_back_clean_and_as_modelled(self) -> None:
        self.run(self.vol.sync)
        assert self.run(clean, self.dev, self.geo) == []
        self.run(self._compare, self.vol)

    def teardown(self) -> None:
        self.run(self.vol.close)
        report = self.run(ENGINE.check_volume, self.dev, self.geo, False)
        assert report.errors == [], report.errors
        self.vol = self.run(open_volume, self.dev, self.geo, True)
        self.run(self._compare, self.vol, False)
        if self.block_size == 512 and self.reserved == 2 and self.blocks == 1760:
            self._amitools_reads_the_same()
        else:
            pass  # amitools' image reader here takes 512-byte blocks and Reserved 2 only

    def _amitools_reads_the_same(self) -> None:
        """amitools (the oracle) on the closed image: the same names, sizes and bytes in
        every directory that holds no link.  amitools 0.8.1 cannot read directories
        holding hard or soft links (BRIEF §7): those are skipped with what is below."""
        links = {(d, k) for o in self.objs.values() for d, k in o.names[1:]}
        links |= {(d, k) for d, ents in self.dirs.items() for k, (_, ob) in ents.items() if self.objs[ob].kind == "soft"}
        if any((self.root, k) in links for k in self.dirs[self.root]):
            return  # amitools' open() already reads the root directory
        if any(not _amitools_can_encode(o.comment) for o in self.objs.values()):
            return  # amitools 0.8.1 NFKC-normalises Latin-1 text ('¸' -> U+0327) and fails
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "wide.adf"
            path.write_bytes(bytes(self.dev.data))
            blkdev = BlkDevFactory().open(str(path), read_only=True)
            ami = ADFSVolume(blkdev)
            ami.open()
            try:
                todo = [(self.root, "")]
                while todo:
                    d, path_s = todo.pop()
                    if any((d, k) in links for k in self.dirs[d]):
                        continue
                    node = ami.get_path_name(FSString(path_s.rstrip("/"))) if path_s else ami.get_root_dir()
                    got = sorted(n.name.get_name().get_unicode() for n in node.get_entries())
                    assert got == sorted(n for n, _ in self.dirs[d].values()), path_s
                    AMITOOLS_DIRS_COMPARED[0] += 1
                    for name, obj in self.dirs[d].values():
                        o = self.objs[obj]
                        if o.kind == "dir":
                            if o.names[0] == (d, self.key(name)):
                                todo.append((obj, f"{path_s}{name}/"))
                        else:
                            assert ami.read_file(FSString(path_s + name)) == bytes(o.data), name
            finally:
                ami.close()
                blkdev.close()


AMITOOLS_DIRS_COMPARED = [0]


def _amitools_can_encode(text: str) -> bool:
    try:
        unicodedata.normalize("NFKC", text).encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _wide(dostype: int, bs: int, blocks: int, reserved: int = 2) -> type[WideModel]:
    name = f"Wide_{dostype & 0xFF}_{bs}_{blocks}_{reserved}"
    cls = type(name, (WideModel,), {"dostype": dostype, "block_size": bs, "blocks": blocks, "reserved": reserved})
    wrapped: type[WideModel] = settings(max_examples=REVIEW2_EXAMPLES, stateful_step_count=20, deadline=None)(cls)
    return wrapped


_WIDE = [
    (0x444F5300, 512, 1760, 2), (0x444F5301, 1024, 600, 3), (0x444F5302, 512, 1760, 2),
    (0x444F5303, 4096, 200, 2), (0x444F5304, 512, 1760, 2), (0x444F5305, 1024, 700, 4),
    (0x444F5306, 512, 1760, 2), (0x444F5307, 32768, 64, 2),
]  # fmt: skip


@pytest.mark.parametrize(("dostype", "bs", "blocks", "reserved"), _WIDE)
def test_wide_random_operations(dostype: int, bs: int, blocks: int, reserved: int) -> None:
    _wide(dostype, bs, blocks, reserved).TestCase().runTest()


# ------------------------------------------------------------------ crash inside a write-back
class SnapshotDevice(MemoryBlockDevice):
    """Keeps a copy of the image before each write while ``snaps`` is a list."""

    snaps: list[bytes] | None = None

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        if self.snaps is not None:
            self.snaps.append(bytes(self.data))
        await super().write(lba, data)


@pytest.mark.parametrize("dostype", [0x444F5300, 0x444F5303, 0x444F5305, DOS7])
async def test_a_crash_anywhere_inside_a_write_back_is_validated(dostype: int) -> None:
    """The image as it was before each write request of a write-back (creates, deletes,
    renames, appends, a new directory) must validate on the next read-write mount
    (docs: "a volume whose bitmap is marked invalid and will be validated") and then be
    clean; every file reads its old or its new contents.  Before, the blocks went out
    in block order: directories and file headers named new headers and extension
    blocks not yet written, 70-90% of the crash images walked into checksum errors and
    mounted read-only (check --repair refused them), and DOS\\5 validated with dircaches
    not matching their directories."""
    dev = SnapshotDevice(6000)
    geo = VolumeGeometry(dostype=dostype, fs_block_count=6000, reserved=2)
    await ENGINE.format_volume(dev, geo, "Crash")
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "d")
    for i in range(24):
        f = await vol.create(d.object_id, f"old{i}")
        await vol.write(f.object_id, 0, content(f"o{i}", 3000))
    await vol.sync()
    e = await vol.mkdir(vol.root_id, "e")
    for i in range(10):
        f = await vol.create(d.object_id, f"new{i}")
        await vol.write(f.object_id, 0, content(f"n{i}", 2000))
    for i in range(0, 24, 4):
        await vol.unlink(d.object_id, f"old{i}")
    for i in range(1, 24, 4):
        await vol.rename(d.object_id, f"old{i}", e.object_id, f"old{i}")
    for i in range(2, 24, 4):
        f = await vol.lookup(d.object_id, f"old{i}")
        await vol.write(f.object_id, 3000, content("app", 70_000))
    dev.snaps = []
    await vol.close()
    snaps = dev.snaps
    assert len(snaps) >= 5
    old = {f"old{i}": content(f"o{i}", 3000) for i in range(24)}
    new = {f"new{i}": content(f"n{i}", 2000) for i in range(10)}
    grown = {f"old{i}": content(f"o{i}", 3000) + content("app", 70_000) for i in range(2, 24, 4)}
    for k, raw in enumerate(snaps):
        crash = MemoryBlockDevice(data=raw)
        v = await open_volume(crash, geo, False)
        assert not v.read_only, (k, v.info.notes)
        for dname in ("d", "e"):
            try:
                dd = await v.lookup(v.root_id, dname)
            except NotFound:
                assert dname == "e", k
                continue
            for s in await v.readdir(dd.object_id):
                got = await v.read(s.object_id, 0, 1 << 20)
                assert got in (old.get(s.name), new.get(s.name), grown.get(s.name)), (k, s.name)
        await v.close()
        report = await ENGINE.check_volume(crash, geo, False)
        assert report.errors == [], (k, report.errors)


@pytest.mark.parametrize("dostype", [0x444F5300, 0x444F5305])
async def test_a_write_back_cancelled_at_any_request_is_finished_by_the_next(dostype: int) -> None:
    """sync() cancelled at each of its device requests in turn: the volume stays
    usable, the next close writes everything, and the result is the new state, clean."""
    dev = MemoryBlockDevice(3000)
    geo = VolumeGeometry(dostype=dostype, fs_block_count=3000, reserved=2)
    await ENGINE.format_volume(dev, geo, "Cancel")
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "d")
    for i in range(6):
        f = await vol.create(d.object_id, f"f{i}")
        await vol.write(f.object_id, 0, content(f"f{i}", 1500))
    await vol.close()
    raw = bytes(dev.data)

    async def changes(v: Any) -> None:
        dd = await v.lookup(v.root_id, "d")
        await v.unlink(dd.object_id, "f0")
        await v.rename(dd.object_id, "f1", v.root_id, "moved")
        g = await v.create(dd.object_id, "g")
        await v.write(g.object_id, 0, content("g", 90_000))
        f2 = await v.lookup(dd.object_id, "f2")
        await v.write(f2.object_id, 1500, content("more", 40_000))

    probe = CancellingDevice(raw)
    v = await open_volume(probe, geo, False)
    await changes(v)
    start = probe.count
    await v.sync()
    total = probe.count - start
    await v.close()
    assert total >= 3
    for k in range(1, total + 1):
        cdev = CancellingDevice(raw)
        v = await open_volume(cdev, geo, False)
        await changes(v)
        with trio.CancelScope() as scope:
            cdev.scope = scope
            cdev.cancel_at = cdev.count + k
            await v.sync()
        cdev.scope = None
        assert scope.cancelled_caught, k
        await v.close()
        assert (await ENGINE.check_volume(cdev, geo, False)).errors == [], k
        after = await open_volume(cdev, geo, True)
        dd = await after.lookup(after.root_id, "d")
        assert sorted(s.name for s in await after.readdir(dd.object_id)) == ["f2", "f3", "f4", "f5", "g"], k
        g = await after.lookup(dd.object_id, "g")
        assert await after.read(g.object_id, 0, 1 << 20) == content("g", 90_000), k
        f2 = await after.lookup(dd.object_id, "f2")
        assert await after.read(f2.object_id, 0, 1 << 20) == content("f2", 1500) + content("more", 40_000), k
        moved = await after.lookup(after.root_id, "moved")
        assert await after.read(moved.object_id, 0, 1 << 20) == content("f1", 1500), k


# ------------------------------------------------------------------ bitmap tail
@settings(max_examples=60, deadline=None)
@given(raw=st.binary(min_size=1, max_size=64), data=st.data())
def test_clearing_the_bitmap_tail_matches_bit_by_bit(raw: bytes, data: st.DataObject) -> None:
    """The bits past a volume's last block are cleared whole bytes at a time now (was
    bit by bit: ~90 ms per write-back of the last page on 32 KiB blocks)."""
    first = data.draw(st.integers(0, len(raw) * 8))
    want = bytearray(raw)
    for bit in range(first, len(raw) * 8):
        want[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
    got = bytearray(raw)
    _clear_bits(got, first)
    assert got == want


@pytest.mark.parametrize(("bs", "blocks"), [(512, 1000), (32768, 64), (4096, 9000)])
def test_a_full_bitmap_never_frees_blocks_past_the_end(bs: int, blocks: int) -> None:
    bm = Bitmap(2, blocks - 2, bs)
    bm.set_all(True)
    assert bm.free_count() == blocks - 2
    last = bm.page_map(bm.pages - 1)
    bits = int.from_bytes(_swap_longs(last), "little")
    assert bits == (1 << (blocks - 2 - (bm.pages - 1) * bm.bits_per_block)) - 1
