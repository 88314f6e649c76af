"""SFS near a full volume (issue 6 review): random operations driven to ENOSPC and back
against a model, the checker (root info counters included) after every step, so an
ENOSPC that left half an operation behind is caught at once.  Files unlinked while
"open" are marked busy (``Volume.set_busy``, as the FUSE layer does) and must stay
readable and writable through their id from ``.recycled`` whatever the purges do.

Also: a volume filled to its last block still deletes and renames (a delete that needs
a new ``.recycled`` entry or transaction records succeeds or fails cleanly, never
wedges the volume)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.errors import Exists, NoSpace, NotFound
from amigafuse.fs.sfs import check_volume, codec, format_volume, open_volume
from amigafuse.fs.sfs.volume import SfsVolume
from tests.conftest import content

REC = codec.RECYCLEDNODE
NAMES = st.sampled_from(["a", "B", "c", "x" * 107, "y" * 104, "Z" * 100])


class NearFullModel(RuleBasedStateMachine):
    """Files in the root against a model; ``open`` holds files unlinked while busy."""

    dostype = SFS0
    block_size = 512
    device_bytes = 1 << 20

    def __init__(self) -> None:
        super().__init__()
        self.dev = MemoryBlockDevice(self.device_bytes // 512, 512)
        self.geo = VolumeGeometry(dostype=self.dostype, fs_block_size=self.block_size)
        trio.run(format_volume, self.dev, self.geo, "Model")
        self.vol = self._open()
        self.model: dict[str, bytes] = {}
        self.open: dict[int, bytes] = {}  # id -> content of a busy file in .recycled
        self.serial = 0

    def _open(self) -> SfsVolume:
        vol = trio.run(open_volume, self.dev, self.geo, False)
        assert isinstance(vol, SfsVolume)
        return vol

    def call(self, fn: Any, *args: Any) -> Any:
        return trio.run(fn, *args)

    def oid(self, name: str) -> int:
        return int(self.call(self.vol.lookup, self.vol.root_id, name).object_id)

    def fresh_name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    # ------------------------------------------------------------------ filling
    @rule(name=NAMES, size=st.integers(0, 200_000))
    def write_file(self, name: str, size: int) -> None:
        if name not in self.model:
            try:
                self.call(self.vol.create, self.vol.root_id, name)
            except NoSpace:
                event("create: ENOSPC")
                return
            self.model[name] = b""
        data = content(f"{name}{self.serial}", size)
        self.serial += 1
        try:
            self.call(self.vol.write, self.oid(name), 0, data)
        except NoSpace:
            event("write: ENOSPC")
            return
        old = self.model[name]
        self.model[name] = data + old[len(data) :]

    @rule(blocks=st.sampled_from([1, 3, 16]))
    def fill(self, blocks: int) -> None:
        """A new file written in chunks until ENOSPC, then topped up block by block
        until ENOSPC again: the volume ends full to its last block (bounded).  Chunks
        straddle block boundaries and are large enough to keep the writes few."""
        name = self.fresh_name("fill")
        try:
            oid = int(self.call(self.vol.create, self.vol.root_id, name).object_id)
        except NoSpace:
            event("create: ENOSPC")
            return
        self.model[name] = b""
        chunk = max(blocks * self.block_size + 100, self.device_bytes // 200)
        pos = 0
        for i in range(400):
            data = bytes([i & 255]) * chunk
            try:
                self.call(self.vol.write, oid, pos, data)
            except NoSpace:
                if chunk == self.block_size:
                    event("fill: ENOSPC")
                    return
                chunk = self.block_size  # top up
                continue
            self.model[name] += data
            pos += chunk
        raise AssertionError("the volume never filled up")

    @rule(count=st.integers(1, 60))
    def tiny_files(self, count: int) -> None:
        """Empty files with long names: fills object containers and node space."""
        for _ in range(count):
            name = self.fresh_name("t" * 90)
            try:
                self.call(self.vol.create, self.vol.root_id, name)
            except NoSpace:
                event("tiny: ENOSPC")
                return
            self.model[name] = b""

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), size=st.integers(0, 60_000))
    def truncate(self, data: st.DataObject, size: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        try:
            self.call(self.vol.truncate, self.oid(name), size)
        except NoSpace:
            event("truncate: ENOSPC")
            return
        old = self.model[name]
        self.model[name] = old[:size] + bytes(max(0, size - len(old)))

    # ------------------------------------------------------------------ deleting
    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), keep_open=st.booleans())
    def unlink(self, data: st.DataObject, keep_open: bool) -> None:
        """Never ENOSPC: a full volume deletes at once instead of recycling."""
        name = data.draw(st.sampled_from(sorted(self.model)))
        oid = self.oid(name)
        if keep_open:
            self.vol.set_busy(oid, True)
        self.call(self.vol.unlink, self.vol.root_id, name)
        body = self.model.pop(name)
        if not keep_open:
            return
        try:
            self.call(self.vol.getattr, oid)
        except NotFound:
            event("unlink: deleted at once (full volume)")
            self.vol.set_busy(oid, False)
            return
        self.open[oid] = body

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), offset=st.integers(0, 40_000), size=st.integers(0, 40_000))
    def write_open(self, data: st.DataObject, offset: int, size: int) -> None:
        """A busy file in .recycled is never purged: NotFound here is a failure."""
        oid = data.draw(st.sampled_from(sorted(self.open)))
        try:
            if size:
                self.call(self.vol.write, oid, offset, b"o" * size)
            else:
                self.call(self.vol.truncate, oid, offset)
        except NoSpace:
            event("write_open: ENOSPC")
            return
        old = self.open[oid]
        if size:
            old = old + bytes(max(0, offset - len(old)))
            self.open[oid] = old[:offset] + b"o" * size + old[offset + size :]
        else:
            self.open[oid] = old[:offset] + bytes(max(0, offset - len(old)))

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def close_open(self, data: st.DataObject) -> None:
        """The last handle goes: the file stays in .recycled, purgeable from now on."""
        oid = data.draw(st.sampled_from(sorted(self.open)))
        self.vol.set_busy(oid, False)
        del self.open[oid]

    @rule(data=st.data(), delete=st.booleans())
    def in_recycled(self, data: st.DataObject, delete: bool) -> None:
        held = sorted(s.name for s in self.call(self.vol.readdir, REC))
        if not held:
            return
        name = data.draw(st.sampled_from(held))
        oid = int(self.call(self.vol.lookup, REC, name).object_id)
        if delete:
            self.call(self.vol.unlink, REC, name)  # never needs space
            if self.open.pop(oid, None) is not None:
                self.vol.set_busy(oid, False)
            with pytest.raises(NotFound):
                self.call(self.vol.read, oid, 0, 1)
            return
        back = self.fresh_name("back")
        try:
            self.call(self.vol.rename, REC, name, self.vol.root_id, back)
        except NoSpace:
            event("restore: ENOSPC")
            return
        st_ = self.call(self.vol.getattr, oid)
        self.model[back] = self.call(self.vol.read, oid, 0, st_.size + 10)
        if oid in self.open:
            assert self.model[back] == self.open.pop(oid)
            self.vol.set_busy(oid, False)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), name=NAMES)
    def rename_over(self, data: st.DataObject, name: str) -> None:
        src = data.draw(st.sampled_from(sorted(self.model)))
        if src == name:
            return
        try:
            self.call(self.vol.rename, self.vol.root_id, src, self.vol.root_id, name)
        except NoSpace:
            event("rename: ENOSPC")
            return
        self.model[name] = self.model.pop(src)

    @rule()
    def drain(self) -> None:
        """Back from full: close the open files, delete every file and empty
        .recycled; then a new file of a few blocks must fit."""
        for oid in self.open:
            self.vol.set_busy(oid, False)
        self.open.clear()
        for name in sorted(self.model):
            self.call(self.vol.unlink, self.vol.root_id, name)
        self.model.clear()
        for s in self.call(self.vol.readdir, REC):
            self.call(self.vol.unlink, REC, s.name)
        name = self.fresh_name("after")
        oid = int(self.call(self.vol.create, self.vol.root_id, name).object_id)
        self.call(self.vol.write, oid, 0, b"back" * self.block_size)
        self.model[name] = b"back" * self.block_size

    @rule()
    def reopen(self) -> None:
        self.call(self.vol.close)
        self.vol = self._open()
        self.open.clear()  # a new session: nothing is open

    # ------------------------------------------------------------------ checks
    @invariant()
    def checked(self) -> None:
        async def go() -> None:
            await self.vol.sync()
            rep = await check_volume(self.dev, self.geo, True)
            assert rep.clean, rep.errors
            assert not rep.warnings, rep.warnings
            listed = {s.name: s for s in await self.vol.readdir(self.vol.root_id)}
            assert sorted(listed) == sorted(self.model)
            for name, body in self.model.items():
                st_ = listed[name]
                assert st_.size == len(body), name
                if body:
                    assert await self.vol.read(st_.object_id, 0, st_.size + 10) == body, name
            for oid, body in self.open.items():
                assert await self.vol.read(oid, 0, len(body) + 10) == body, oid
            sf = await self.vol.statfs()
            assert 0 <= sf.free_blocks <= sf.total_blocks

        trio.run(go)

    def teardown(self) -> None:
        trio.run(self.vol.close)


class NearFull1K(NearFullModel):
    dostype = SFS2
    block_size = 1024


class NearFull4K(NearFullModel):
    block_size = 4096
    device_bytes = 2 << 20


@pytest.mark.parametrize("machine", [NearFullModel, NearFull1K, NearFull4K])
def test_random_operations_to_enospc_and_back(machine: type[NearFullModel]) -> None:
    case = machine.TestCase
    case.settings = settings(
        max_examples=int(os.environ.get("SFS_NEARFULL_EXAMPLES", "5")),
        stateful_step_count=int(os.environ.get("SFS_NEARFULL_STEPS", "20")),
        deadline=None,
    )
    case().runTest()


# ---------------------------------------------------------------------------------
# A volume filled to its last block.


async def _clean(dev: MemoryBlockDevice, geo: VolumeGeometry, vol: SfsVolume) -> None:
    await vol.sync()
    rep = await check_volume(dev, geo, False)
    assert rep.clean, rep.errors
    assert not rep.warnings, rep.warnings


async def _fill_to_the_last_block(vol: SfsVolume, bs: int) -> None:
    """Data in block-sized writes until ENOSPC, then empty files until ENOSPC: no data
    block and no room for another object is left."""
    big = await vol.create(vol.root_id, "big")
    pos = 0
    for _ in range(1 << 16):
        try:
            await vol.write(big.object_id, pos, content(f"big{pos}", bs))
        except NoSpace:
            break
        pos += bs
    else:
        raise AssertionError("never full")
    for i in range(1 << 16):
        try:
            await vol.create(vol.root_id, f"{i:05d}" + "t" * 100)
        except NoSpace:
            break
    else:
        raise AssertionError("never full")
    with pytest.raises(NoSpace):
        await vol.write(big.object_id, pos, b"x")


@pytest.mark.parametrize(
    ("bs", "dostype", "recycled"), [(512, SFS0, True), (1024, SFS2, True), (4096, SFS0, True), (512, SFS0, False)]
)
async def test_a_volume_full_to_the_last_block_still_deletes_and_renames(bs: int, dostype: int, recycled: bool) -> None:
    dev = MemoryBlockDevice((2 << 20) // 512, 512)
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs)
    await format_volume(dev, geo, "Full", recycled=recycled)
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol, SfsVolume)
    keep = {f"k{i}": content(f"k{i}", 3000 * i + 1) for i in range(1, 7)}
    for name, body in keep.items():
        st_ = await vol.create(vol.root_id, name)
        await vol.write(st_.object_id, 0, body)
    await vol.mkdir(vol.root_id, "empty")
    busy = await vol.create(vol.root_id, "busy")
    await vol.write(busy.object_id, 0, b"busy" * 300)
    vol.set_busy(busy.object_id, True)
    await vol.unlink(vol.root_id, "busy")
    await _fill_to_the_last_block(vol, bs)
    await _clean(dev, geo, vol)

    # A delete that needs a .recycled entry (or transaction records): done, whatever
    # the room (moved, or deleted at once).
    await vol.unlink(vol.root_id, "k1")
    with pytest.raises(NotFound):
        await vol.lookup(vol.root_id, "k1")
    await _clean(dev, geo, vol)
    # A rename to a long name may need a new container: done or refused whole.
    try:
        await vol.rename(vol.root_id, "k2", vol.root_id, "L" * 107)
        moved = "L" * 107
    except NoSpace:
        moved = "k2"
    st_ = await vol.lookup(vol.root_id, moved)
    assert await vol.read(st_.object_id, 0, 1 << 20) == keep["k2"]
    await _clean(dev, geo, vol)
    # A rename over an existing file (the replaced one recycled or deleted at once).
    await vol.rename(vol.root_id, "k3", vol.root_id, "k4")
    st_ = await vol.lookup(vol.root_id, "k4")
    assert await vol.read(st_.object_id, 0, 1 << 20) == keep["k3"]
    await _clean(dev, geo, vol)
    await vol.rmdir(vol.root_id, "empty")
    await _clean(dev, geo, vol)
    if recycled:
        # The busy file was never purged for room; deletes inside .recycled work.
        assert await vol.read(busy.object_id, 0, 2000) == b"busy" * 300
        for s in await vol.readdir(REC):
            if s.object_id != busy.object_id:
                await vol.unlink(REC, s.name)
        await _clean(dev, geo, vol)
    # Not wedged: after a delete, writing works again.
    await vol.unlink(vol.root_id, "big")
    st_ = await vol.create(vol.root_id, "again")
    await vol.write(st_.object_id, 0, content("again", 10 * bs))
    assert await vol.read(st_.object_id, 0, 20 * bs) == content("again", 10 * bs)
    for name in ("k5", "k6"):
        st_ = await vol.lookup(vol.root_id, name)
        assert await vol.read(st_.object_id, 0, 1 << 20) == keep[name]
    await _clean(dev, geo, vol)
    await vol.close()


@pytest.mark.parametrize(("bs", "dostype"), [(512, SFS0), (1024, SFS2), (4096, SFS0)])
async def test_enospc_changes_nothing_on_disk(bs: int, dostype: int) -> None:
    """On a full volume with nothing in ``.recycled`` to purge, every operation that
    needs room is refused whole: after a sync the device holds the very same bytes."""
    dev = MemoryBlockDevice((2 << 20) // 512, 512)
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs)
    await format_volume(dev, geo, "Full")
    vol = await open_volume(dev, geo, False)
    assert isinstance(vol, SfsVolume)
    small = await vol.create(vol.root_id, "small")
    await vol.write(small.object_id, 0, b"s" * 100)
    await vol.mkdir(vol.root_id, "dir")
    await _fill_to_the_last_block(vol, bs)
    await vol.sync()
    before = bytes(dev.data)
    big = (await vol.lookup(vol.root_id, "big")).object_id
    refused = 0
    size = (await vol.getattr(big)).size
    attempts: list[Any] = [
        lambda: vol.write(big, size, b"x" * (4 * bs)),
        lambda: vol.write(small.object_id, 0, b"y" * (8 * bs)),
        lambda: vol.truncate(small.object_id, 64 * bs),
        lambda: vol.create(vol.root_id, "N" * 107),
        lambda: vol.mkdir(vol.root_id, "M" * 107),
        lambda: vol.symlink(vol.root_id, "S" * 107, "dir/" + "t" * 90),
        lambda: vol.create(vol.root_id, "dir"),  # Exists: refused before any room is needed
    ]
    for attempt in attempts:
        try:
            await attempt()
        except NoSpace:
            refused += 1
        except Exists:
            pass
        await vol.sync()
        assert bytes(dev.data) == before, attempt
    assert refused == len(attempts) - 1
    await _clean(dev, geo, vol)
    await vol.close()
