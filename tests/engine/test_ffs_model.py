"""Random operation sequences against an in-memory model, per DosType and block size;
the checker must find every resulting volume clean, and a reopened volume must match."""

from __future__ import annotations

import os
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import AmigaFuseError, DirectoryNotEmpty, Exists, NotFound
from amigafuse.fs.api import Kind
from amigafuse.fs.ffs import ENGINE, open_volume
from amigafuse.fs.ffs.layout import upper_name

NAMES_ASCII = ["a", "A", "b", "Bb", "file", "FILE2", "x.txt", "dir"]
NAMES_INTL = [*NAMES_ASCII, "äö", "ÄÖ", "ÿ", "æble"]


class FfsModel(RuleBasedStateMachine):
    """The model: objects (files hold bytes) and directories of name -> object."""

    dostype = 0x444F5303
    block_size = 512
    tiny_cache = False

    def __init__(self) -> None:
        super().__init__()
        if self.tiny_cache:
            # every cache far too small: every reload path is taken
            import amigafuse.fs.ffs.volume as ffsvol

            self._saved = (ffsvol.META_CACHE_LIMIT, ffsvol.BLOCKLIST_CACHE_LIMIT, ffsvol.INDEX_LIMIT)
            ffsvol.META_CACHE_LIMIT, ffsvol.BLOCKLIST_CACHE_LIMIT, ffsvol.INDEX_LIMIT = 2, 0, 0
        self.intl = (self.dostype & 0xFF) >= 2
        self.names = NAMES_INTL if self.intl else NAMES_ASCII
        self.dev = MemoryBlockDevice(6000 * (self.block_size // 512))
        self.geo = VolumeGeometry(dostype=self.dostype, fs_block_size=self.block_size,
                                  fs_block_count=6000, reserved=2)  # fmt: skip
        trio.run(ENGINE.format_volume, self.dev, self.geo, "Model")
        self.vol: Any = trio.run(open_volume, self.dev, self.geo, False)
        root = self.vol.root_id
        # model: obj id -> bytes (file) or dict key -> (name, obj) (dir)
        self.files: dict[int, bytearray] = {}
        self.dirs: dict[int, dict[bytes, tuple[str, int]]] = {root: {}}
        self.parent: dict[int, int] = {root: root}

    def key(self, name: str) -> bytes:
        return upper_name(name.encode("latin-1"), self.intl)

    def run(self, fn: Any, *args: Any) -> Any:
        return trio.run(fn, *args)

    def entries(self, want: str) -> list[tuple[int, str, int]]:
        out = []
        for d, ents in self.dirs.items():
            for name, obj in ents.values():
                kind = "dir" if obj in self.dirs else "file"
                if want in (kind, "any"):
                    out.append((d, name, obj))
        return sorted(out)

    @initialize()
    def start(self) -> None:
        pass

    @rule(data=st.data(), is_dir=st.booleans())
    def create(self, data: st.DataObject, is_dir: bool) -> None:
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        name = data.draw(st.sampled_from(self.names))
        fn = self.vol.mkdir if is_dir else self.vol.create
        if self.key(name) in self.dirs[d]:
            with pytest.raises(Exists):
                self.run(fn, d, name)
            return
        stat = self.run(fn, d, name)
        self.dirs[d][self.key(name)] = (name, stat.object_id)
        if is_dir:
            self.dirs[stat.object_id] = {}
            self.parent[stat.object_id] = d
        else:
            self.files[stat.object_id] = bytearray()

    @precondition(lambda self: self.files)
    @rule(data=st.data(), offset=st.integers(0, 3000), size=st.integers(0, 2500))
    def write(self, data: st.DataObject, offset: int, size: int) -> None:
        obj = data.draw(st.sampled_from(sorted(self.files)))
        payload = bytes((offset + i * 7) & 0xFF for i in range(size))
        self.run(self.vol.write, obj, offset, payload)
        buf = self.files[obj]
        if size:
            if len(buf) < offset:
                buf.extend(bytes(offset - len(buf)))
            buf[offset : offset + size] = payload

    @precondition(lambda self: self.files)
    @rule(data=st.data(), size=st.integers(0, 5000))
    def truncate(self, data: st.DataObject, size: int) -> None:
        obj = data.draw(st.sampled_from(sorted(self.files)))
        self.run(self.vol.truncate, obj, size)
        buf = self.files[obj]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        obj = data.draw(st.sampled_from(sorted(self.files)))
        d = data.draw(st.sampled_from(sorted(self.dirs)))
        name = data.draw(st.sampled_from(self.names))
        if self.key(name) in self.dirs[d]:
            with pytest.raises(Exists):
                self.run(self.vol.link, obj, d, name)
            return
        stat = self.run(self.vol.link, obj, d, name)
        assert stat.object_id == obj
        self.dirs[d][self.key(name)] = (name, obj)

    @precondition(lambda self: any(True for _ in self.entries("file")))
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        d, name, obj = data.draw(st.sampled_from(self.entries("file")))
        self.run(self.vol.unlink, d, name)
        del self.dirs[d][self.key(name)]
        if not any(o == obj for ents in self.dirs.values() for _, o in ents.values()):
            del self.files[obj]

    @precondition(lambda self: any(True for _ in self.entries("dir")))
    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        d, name, obj = data.draw(st.sampled_from(self.entries("dir")))
        if self.dirs[obj]:
            with pytest.raises(DirectoryNotEmpty):
                self.run(self.vol.rmdir, d, name)
            return
        self.run(self.vol.rmdir, d, name)
        del self.dirs[d][self.key(name)]
        del self.dirs[obj]

    @precondition(lambda self: any(True for _ in self.entries("any")))
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        d, name, obj = data.draw(st.sampled_from(self.entries("any")))
        dst = data.draw(st.sampled_from(sorted(self.dirs)))
        new = data.draw(st.sampled_from(self.names))
        # into itself?
        p = dst
        inside = False
        for _ in range(100):
            if p == obj:
                inside = True
            if p == self.parent.get(p, p):
                break
            p = self.parent[p]
        try:
            self.run(self.vol.rename, d, name, dst, new)
        except AmigaFuseError as exc:
            existing = self.dirs[dst].get(self.key(new))
            assert inside or (existing is not None and existing[1] != obj), exc
            return
        assert not inside
        existing = self.dirs[dst].get(self.key(new))
        if existing is not None and existing[1] == obj and (d, self.key(name)) != (dst, self.key(new)):
            return  # both names are one object: POSIX does nothing
        del self.dirs[d][self.key(name)]
        if existing is not None and existing[1] != obj:
            gone = existing[1]
            if gone in self.dirs:
                del self.dirs[gone]
            elif not any(o == gone for ents in self.dirs.values() for _, o in ents.values() if o != gone) or True:
                still = [o for ents in self.dirs.values() for _, o in ents.values() if o == gone]
                if len(still) <= 1:
                    self.files.pop(gone, None)
        self.dirs[dst][self.key(new)] = (new, obj)
        if obj in self.dirs:
            self.parent[obj] = dst

    async def _compare(self, vol: Any, by_id: bool) -> None:
        """The volume against the model; ``by_id``: ids too (same session only)."""
        todo = [(self.vol.root_id, vol.root_id)]
        while todo:
            d, vd = todo.pop()
            ents = self.dirs[d]
            listing = {s.name: s for s in await vol.readdir(vd)}
            assert sorted(listing) == sorted(n for n, _ in ents.values())
            for name, obj in ents.values():
                s = listing[name]
                if by_id:
                    assert s.object_id == obj
                if obj in self.files:
                    assert s.kind == Kind.FILE
                    want = bytes(self.files[obj])
                    assert s.size == len(want)
                    assert await vol.read(s.object_id, 0, 1 << 20) == want
                    links = sum(1 for e in self.dirs.values() for _, o in e.values() if o == obj)
                    assert s.nlink == links
                else:
                    assert s.kind == Kind.DIR
                    todo.append((obj, s.object_id))

    def teardown(self) -> None:
        if self.tiny_cache:
            import amigafuse.fs.ffs.volume as ffsvol

            ffsvol.META_CACHE_LIMIT, ffsvol.BLOCKLIST_CACHE_LIMIT, ffsvol.INDEX_LIMIT = self._saved
        self.run(self._compare, self.vol, True)
        self.run(self.vol.close)
        report = self.run(ENGINE.check_volume, self.dev, self.geo, False)
        assert report.errors == [], report.errors
        vol = self.run(open_volume, self.dev, self.geo, True)
        self.run(self._compare, vol, False)


def _make(dostype: int, bs: int, tiny: bool = False) -> type[FfsModel]:
    cls = type(f"Model_{dostype & 0xFF}_{bs}", (FfsModel,), {"dostype": dostype, "block_size": bs, "tiny_cache": tiny})
    examples = int(os.environ.get("FFS_MODEL_EXAMPLES", "12"))
    return settings(max_examples=examples, stateful_step_count=25, deadline=None)(cls)  # type: ignore[no-any-return]


_CASES = [(0x444F5300 + n, bs) for n in range(8) for bs in (512, 4096)]


@pytest.mark.parametrize(("dostype", "bs"), _CASES)
def test_random_operations(dostype: int, bs: int) -> None:
    _make(dostype, bs).TestCase().runTest()


@pytest.mark.parametrize("dostype", [0x444F5300, 0x444F5305])
def test_random_operations_with_tiny_caches(dostype: int) -> None:
    _make(dostype, 512, tiny=True).TestCase().runTest()


def test_notfound_in_model_names() -> None:
    m = FfsModel()
    with pytest.raises(NotFound):
        trio.run(m.vol.lookup, m.vol.root_id, "missing")
    m.teardown()
