"""Random operation sequences on SFS volumes against a simple model, the checker after
each sequence (hypothesis RuleBasedStateMachine)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.errors import DirectoryNotEmpty, NoSpace
from amigafuse.fs.api import Kind, SetAttrs, Volume
from amigafuse.fs.sfs import check_volume, format_volume, open_volume

NAMES = st.sampled_from(["a", "b", "c", "dd", "e" * 40, "f.txt", "g" * 100])


def run(fn: Any, *args: Any) -> Any:
    return trio.run(fn, *args)


class SfsModel(RuleBasedStateMachine):
    dostype = SFS0
    block_size = 512
    device_bytes = 4 << 20

    def __init__(self) -> None:
        super().__init__()
        self.dev = MemoryBlockDevice(self.device_bytes // 512, 512)
        self.geo = VolumeGeometry(dostype=self.dostype, fs_block_size=self.block_size)
        run(format_volume, self.dev, self.geo, "Model")
        self.vol: Volume = run(open_volume, self.dev, self.geo, False)
        # path tuple -> bytes (file) or None (directory); () is the root
        self.model: dict[tuple[str, ...], bytes | None] = {(): None}
        self.comments: dict[tuple[str, ...], str] = {}

    # ------------------------------------------------------------------ helpers
    def dirs(self) -> list[tuple[str, ...]]:
        return sorted(p for p, v in self.model.items() if v is None)

    def files(self) -> list[tuple[str, ...]]:
        return sorted(p for p, v in self.model.items() if v is not None)

    def resolve(self, path: tuple[str, ...]) -> int:
        async def go() -> int:
            cur = self.vol.root_id
            for part in path:
                cur = (await self.vol.lookup(cur, part)).object_id
            return cur

        return run(go)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ rules
    @rule(data=st.data(), name=NAMES)
    def create(self, data: st.DataObject, name: str) -> None:
        parent = data.draw(st.sampled_from(self.dirs()))
        path = (*parent, name)
        if path in self.model:
            return
        try:
            pid = self.resolve(parent)
            run(self.vol.create, pid, name)
        except NoSpace:
            return
        self.model[path] = b""

    @rule(data=st.data(), count=st.integers(10, 60))
    def create_many(self, data: st.DataObject, count: int) -> None:
        parent = data.draw(st.sampled_from(self.dirs()))
        pid = self.resolve(parent)
        for i in range(count):
            path = (*parent, f"many_{i:03d}_{'x' * (i % 30)}")
            if path in self.model:
                continue
            try:
                run(self.vol.create, pid, path[-1])
            except NoSpace:
                return
            self.model[path] = b""

    @rule(data=st.data(), name=NAMES)
    def mkdir(self, data: st.DataObject, name: str) -> None:
        parent = data.draw(st.sampled_from(self.dirs()))
        path = (*parent, name)
        if path in self.model or len(parent) > 4:
            return
        try:
            pid = self.resolve(parent)
            run(self.vol.mkdir, pid, name)
        except NoSpace:
            return
        self.model[path] = None

    @precondition(lambda self: self.files())
    @rule(data=st.data(), offset=st.integers(0, 70000), size=st.integers(1, 20000), byte=st.integers(0, 255))
    def write(self, data: st.DataObject, offset: int, size: int, byte: int) -> None:
        path = data.draw(st.sampled_from(self.files()))
        payload = bytes([byte]) * size
        try:
            oid = self.resolve(path)
            run(self.vol.write, oid, offset, payload)
        except NoSpace:
            return
        old = self.model[path] or b""
        if offset > len(old):
            old = old + bytes(offset - len(old))
        self.model[path] = old[:offset] + payload + old[offset + size :]

    @precondition(lambda self: self.files())
    @rule(data=st.data(), size=st.integers(0, 80000))
    def truncate(self, data: st.DataObject, size: int) -> None:
        path = data.draw(st.sampled_from(self.files()))
        try:
            oid = self.resolve(path)
            run(self.vol.truncate, oid, size)
        except NoSpace:
            return
        old = self.model[path] or b""
        self.model[path] = old[:size] + bytes(max(0, size - len(old)))

    @precondition(lambda self: self.files())
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self.files()))
        run(self.vol.unlink, self.resolve(path[:-1]), path[-1])
        del self.model[path]
        self.comments.pop(path, None)

    @precondition(lambda self: len(self.dirs()) > 1)
    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self.dirs()[1:]))
        empty = not any(p[: len(path)] == path and p != path for p in self.model)
        try:
            pid = self.resolve(path[:-1])
            run(self.vol.rmdir, pid, path[-1])
        except DirectoryNotEmpty:
            assert not empty
            return
        assert empty
        del self.model[path]
        self.comments.pop(path, None)

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data(), name=NAMES)
    def rename(self, data: st.DataObject, name: str) -> None:
        src = data.draw(st.sampled_from(sorted(p for p in self.model if p)))
        dst_dir = data.draw(st.sampled_from(self.dirs()))
        dst = (*dst_dir, name)
        if dst_dir[: len(src)] == src or dst in self.model or src == dst:
            return
        run(self.vol.rename, self.resolve(src[:-1]), src[-1], self.resolve(dst_dir), name)
        moved = {p: v for p, v in self.model.items() if p[: len(src)] == src}
        for p in moved:
            del self.model[p]
        for p, v in moved.items():
            self.model[dst + p[len(src) :]] = v
        self.comments = {}

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data(), comment=st.text(alphabet="abcXYZ ", max_size=79), prot=st.integers(0, 0xFF))
    def setattr(self, data: st.DataObject, comment: str, prot: int) -> None:
        path = data.draw(st.sampled_from(sorted(p for p in self.model if p)))
        st_ = run(self.vol.setattr, self.resolve(path), SetAttrs(comment=comment, protection=prot))
        assert st_.comment == comment and st_.protection == prot
        self.comments[path] = comment

    @rule()
    def sync(self) -> None:
        run(self.vol.sync)

    @rule()
    def reopen(self) -> None:
        run(self.vol.close)
        self.vol = run(open_volume, self.dev, self.geo, False)
        assert not self.vol.info.notes

    # ------------------------------------------------------------------ final check
    def teardown(self) -> None:
        async def verify() -> None:
            await self.vol.close()
            vol = await open_volume(self.dev, self.geo, True)
            seen: dict[tuple[str, ...], bytes | None] = {(): None}

            async def walk(dir_id: int, prefix: tuple[str, ...]) -> None:
                for s in await vol.readdir(dir_id):
                    p = (*prefix, s.name)
                    if s.kind is Kind.DIR:
                        seen[p] = None
                        await walk(s.object_id, p)
                    else:
                        seen[p] = await vol.read(s.object_id, 0, s.size + 10)
                        assert s.size == len(seen[p] or b"")
                    if p in self.comments:
                        assert s.comment == self.comments[p]

            await walk(vol.root_id, ())
            assert seen == self.model
            rep = await check_volume(self.dev, self.geo, False)
            assert rep.clean, rep.errors
            assert not rep.warnings, rep.warnings

        run(verify)


class Sfs0Small(SfsModel):
    pass


class Sfs2Small(SfsModel):
    dostype = SFS2


class Sfs0Big(SfsModel):
    block_size = 4096
    device_bytes = 8 << 20


class Sfs2Big(SfsModel):
    dostype = SFS2
    block_size = 4096
    device_bytes = 8 << 20


@pytest.mark.parametrize("machine", [Sfs0Small, Sfs2Small, Sfs0Big, Sfs2Big])
def test_random_operations(machine: type[SfsModel]) -> None:
    test_case = machine.TestCase
    test_case.settings = settings(max_examples=20, stateful_step_count=40, deadline=None)
    test_case().runTest()
