"""What the handler tier writes with amigafuse, and the model it is judged against.

``Model`` records what we wrote (bytes per file, directories, soft links) independently of
our reader; ``build_tree`` writes a varied tree through the ``Volume`` interface and keeps
the model in step; ``expected_listing`` turns the model into what a handler's walk must show.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amigafuse.amiga.dates import DateStamp
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import PartitionDevice
from amigafuse.fs import engine_for
from amigafuse.fs.api import Kind, SetAttrs, Stat, Volume
from tests.conftest import content
from tests.engine.test_sfs_support import first_partition

REPO = Path(__file__).resolve().parents[2]


def make_disk(path: Path, dostype_name: str, *, size: str = "24M", block_size: int = 512,
              handler: Path | None = None, formatted: bool = True) -> None:  # fmt: skip
    """A new disk image: RDB and filesystem both written by amigafuse (mkdisk, file backend);
    ``formatted=False`` leaves the partition for the caller to format."""
    opts = f":bs={block_size}" if block_size != 512 else ""
    cmd = [sys.executable, "-m", "amigafuse", "mkdisk", str(path), "--size", size, "--backend", "file",
           "--partition", f"DH0:{dostype_name}:rest{opts}"]  # fmt: skip
    if handler is not None:
        cmd += ["--handler", str(handler)]
    if not formatted:
        cmd.append("--no-format")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, f"mkdisk failed: {done.stdout}{done.stderr}"


async def open_rw(
    path: Path, *, read_only: bool = False
) -> tuple[Volume, PartitionDevice, VolumeGeometry]:
    dev, geo = first_partition(path, read_only=read_only)
    engine = engine_for(geo.dostype)
    assert engine is not None, hex(geo.dostype)
    return await engine.open_volume(dev, geo, read_only), dev, geo


async def check_clean(path: Path) -> None:
    dev, geo = first_partition(path)
    engine = engine_for(geo.dostype)
    assert engine is not None
    report = await engine.check_volume(dev, geo, False)
    assert report.clean, (
        f"amigafuse check of {path}: errors {report.errors[:10]} warnings {report.warnings[:5]}"
    )


@dataclass
class Model:
    """Path (case as written, '/'-rooted) -> bytes (file), 'DIR', or ('SOFTLINK', target)."""

    objects: dict[str, Any] = field(default_factory=dict)
    # Attributes we set explicitly: "protection" (int), "comment" (str), "date" ([d, m, t]).
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Hard links: path -> every path naming the same file (one shared set per file).
    same_file: dict[str, set[str]] = field(default_factory=dict)

    def link(self, target: str, path: str) -> None:
        group = self.same_file.get(target, {target})
        group.add(path)
        for p in group:
            self.same_file[p] = group
        self.objects[path] = self.objects[target]

    def set_file(self, path: str, data: bytes) -> None:
        """New contents for ``path`` and every hard link to the same file."""
        for p in self.same_file.get(path, {path}):
            self.objects[p] = data

    def rename(self, src: str, dst: str) -> None:
        moved = {p: v for p, v in self.objects.items() if p == src or p.startswith(src + "/")}
        for p, v in moved.items():
            del self.objects[p]
            new = dst + p[len(src) :]
            self.objects[new] = v
            if p in self.attrs:
                self.attrs[new] = self.attrs.pop(p)
            group = self.same_file.pop(p, None)
            if group is not None:
                group.discard(p)
                group.add(new)
                self.same_file[new] = group

    def delete(self, path: str) -> None:
        del self.objects[path]
        self.attrs.pop(path, None)
        group = self.same_file.pop(path, None)
        if group is not None:
            group.discard(path)


class Writer:
    """Applies operations to a Volume and to the Model together (paths are '/'-rooted)."""

    def __init__(self, vol: Volume, model: Model) -> None:
        self.vol, self.model = vol, model

    async def resolve(self, path: str) -> Stat:
        st = await self.vol.getattr(self.vol.root_id)
        for part in [p for p in path.split("/") if p]:
            st = await self.vol.lookup(st.object_id, part)
        return st

    async def parent(self, path: str) -> tuple[int, str]:
        head, _, name = path.rpartition("/")
        return (await self.resolve(head)).object_id, name

    async def mkdir(self, path: str) -> None:
        d, n = await self.parent(path)
        await self.vol.mkdir(d, n)
        self.model.objects[path] = "DIR"

    async def write_file(self, path: str, data: bytes, *, pieces: int = 1) -> None:
        d, n = await self.parent(path)
        st = await self.vol.create(d, n)
        step = max(1, -(-len(data) // pieces))
        for off in range(0, len(data), step):
            await self.vol.write(st.object_id, off, data[off : off + step])
        self.model.objects[path] = data

    async def overwrite(self, path: str, offset: int, data: bytes) -> None:
        st = await self.resolve(path)
        await self.vol.write(st.object_id, offset, data)
        old = bytearray(self.model.objects[path])
        if len(old) < offset:
            old += bytes(offset - len(old))
        old[offset : offset + len(data)] = data
        self.model.set_file(path, bytes(old))

    async def truncate(self, path: str, size: int) -> None:
        st = await self.resolve(path)
        await self.vol.truncate(st.object_id, size)
        old = self.model.objects[path]
        self.model.set_file(path, old[:size] + bytes(max(0, size - len(old))))

    async def unlink(self, path: str) -> None:
        d, n = await self.parent(path)
        await self.vol.unlink(d, n)
        self.model.delete(path)

    async def rmdir(self, path: str) -> None:
        d, n = await self.parent(path)
        await self.vol.rmdir(d, n)
        self.model.delete(path)

    async def rename(self, src: str, dst: str) -> None:
        sd, sn = await self.parent(src)
        dd, dn = await self.parent(dst)
        await self.vol.rename(sd, sn, dd, dn)
        self.model.rename(src, dst)

    async def hardlink(self, target: str, path: str) -> None:
        st = await self.resolve(target)
        d, n = await self.parent(path)
        await self.vol.link(st.object_id, d, n)
        self.model.link(target, path)

    async def symlink(self, path: str, target: str) -> None:
        d, n = await self.parent(path)
        await self.vol.symlink(d, n, target)
        self.model.objects[path] = ("SOFTLINK", target)

    async def setattr(self, path: str, *, protection: int | None = None, comment: str | None = None,
                      date: DateStamp | None = None) -> None:  # fmt: skip
        st = await self.resolve(path)
        await self.vol.setattr(
            st.object_id, SetAttrs(protection=protection, comment=comment, date=date)
        )
        rec = self.model.attrs.setdefault(path, {})
        if protection is not None:
            rec["protection"] = protection
        if comment is not None:
            rec["comment"] = comment
        if date is not None:
            rec["date"] = [date.days, date.minutes, date.ticks]


async def build_tree(w: Writer, *, name_limit: int, hard_links: bool, many: int = 150) -> None:
    """A varied tree: sizes around block edges and past 72 blocks, nested directories,
    Latin-1 and long names, a directory with many entries (hash chains), links, comments,
    protection bits, dates, then deletes, renames, truncates and overwrites done by us."""
    await w.write_file("/README.txt", b"written by amigafuse for the real-handler tier\n")
    await w.mkdir("/sizes")
    for size in (0, 1, 487, 488, 511, 512, 513, 4095, 4096, 65537, 100_000, 300_001):
        await w.write_file(
            f"/sizes/size_{size:07d}.bin",
            content(f"sizes/{size}", size),
            pieces=3 if size > 4096 else 1,
        )
    path = ""
    for level in "abcdef":
        path += f"/{level}" if path else f"/nested/{level}"
        if level == "a":
            await w.mkdir("/nested")
        await w.mkdir(path)
        await w.write_file(f"{path}/file_{level}.txt", content(path, 100 + 37 * ord(level)))
    await w.mkdir("/nested/empty_dir")
    await w.mkdir("/names")
    for name in ("Äpfel und Öl.txt", "ÆØÅ æøå ß ÿ", "café crème", ".leading_dot", "trailing_dot.",
                 "x" * 30, "y" * min(name_limit, 100), "z" * (name_limit - 1)):  # fmt: skip
        await w.write_file(f"/names/{name}", content(name, len(name) * 11))
    await w.mkdir("/names/dir_" + "d" * (name_limit - 4))
    await w.mkdir("/many")
    for i in range(many):
        name = f"F_{i:04d}.Dat" if i % 10 == 0 else f"f_{i:04d}.dat"
        await w.write_file(f"/many/{name}", content(f"many/{i}", i * 3))
    await w.mkdir("/meta")
    await w.write_file("/meta/commented", b"has a comment")
    await w.setattr("/meta/commented", comment="a comment with Latin-1: \xe9\xe8\xe0 \xbd")
    for prot, name in ((0x07, "no_wed"), (0x05, "ro_nodelete"), (0x60, "script_pure"), (0x10, "archived"),
                       (0xAA00, "group_other"), (0xF0, "hspa")):  # fmt: skip
        await w.write_file(f"/meta/{name}", name.encode())
        await w.setattr(f"/meta/{name}", protection=prot)
    await w.write_file("/meta/dated", b"old")
    await w.write_file("/meta/late", b"late")
    await w.setattr(
        "/meta/dated", date=DateStamp(days=1, minutes=2, ticks=150)
    )  # whole seconds (SFS)
    await w.setattr("/meta/late", date=DateStamp(days=21_935, minutes=194, ticks=350))  # 2038-01-19
    await w.mkdir("/meta/commented_dir")
    await w.setattr(
        "/meta/commented_dir",
        comment="directory comment",
        date=DateStamp(days=7000, minutes=600, ticks=0),
    )
    await w.mkdir("/links")
    await w.symlink("/links/to_size_512", "sizes/size_0000512.bin")
    await w.symlink("/links/to_nested", "/nested/a")
    if hard_links:
        await w.hardlink("/sizes/size_0100000.bin", "/links/hard_to_100000")
    # Changes after the fact.
    await w.overwrite("/sizes/size_0300001.bin", 5000, b"OVERWRITTEN" * 400)
    await w.overwrite("/sizes/size_0004096.bin", 4096, b"appended past the end")
    await w.write_file("/special_truncate_down", content("td", 50_000))
    await w.truncate("/special_truncate_down", 12_345)
    await w.write_file("/special_truncate_up", content("tu", 1000))
    await w.truncate("/special_truncate_up", 70_000)
    for i in range(1, many, 7):
        name = f"F_{i:04d}.Dat" if i % 10 == 0 else f"f_{i:04d}.dat"
        await w.unlink(f"/many/{name}")
    await w.rename("/README.txt", "/nested/a/readme_moved.txt")
    await w.rename("/nested/a/b/c", "/moved_c")
    await w.rename("/many/f_0003.dat", "/many/f_0003_renamed.dat")
    await w.rmdir("/nested/empty_dir")
    await w.mkdir("/nested/empty_dir2")


def expected_listing(model: Model) -> dict[str, Any]:
    """What a handler's walk must report for the model (see handler_driver.walk)."""
    out: dict[str, Any] = {}
    for path, value in model.objects.items():
        if value == "DIR":
            out[path] = {"type": "DIR"}
        elif isinstance(value, tuple):
            out[path] = {"type": "SOFTLINK"}
        else:
            out[path] = {"type": "FILE", "size": len(value), "md5": hashlib.md5(value).hexdigest()}
        out[path].update(model.attrs.get(path, {}))
    return out


def comparable(listing: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """The handler's walk reduced to the fields ``expected`` states (hard links count as files)."""
    out: dict[str, Any] = {}
    for path, rec in listing.items():
        want = expected.get(path, {})
        kind = (
            "FILE"
            if rec["type"] == "LINKFILE"
            else "DIR"
            if rec["type"] == "LINKDIR"
            else rec["type"]
        )
        got = {"type": kind}
        if kind == "FILE":
            got["size"] = rec["size"]
            got["md5"] = rec["md5"]
        for key in ("protection", "comment", "date"):
            if key in want:
                got[key] = rec[key]
        out[path] = got
    return out


def diff(got: dict[str, Any], want: dict[str, Any]) -> str:
    lines = []
    for path in sorted(set(got) | set(want)):
        if got.get(path) != want.get(path):
            lines.append(f"{path}: handler {got.get(path)} / we wrote {want.get(path)}")
    return "\n".join(lines[:40]) + (f"\n... {len(lines) - 40} more" if len(lines) > 40 else "")


async def our_listing(vol: Volume) -> dict[str, Any]:
    """Our reader's view in the same shape as expected_listing (no protection)."""
    out: dict[str, Any] = {}

    async def walk(dir_id: int, prefix: str) -> None:
        for st in await vol.readdir(dir_id):
            path = f"{prefix}/{st.name}"
            if st.kind is Kind.DIR:
                out[path] = {"type": "DIR"}
                await walk(st.object_id, path)
            elif st.kind is Kind.SOFTLINK:
                out[path] = {"type": "SOFTLINK"}
            else:
                data = await vol.read(st.object_id, 0, st.size)
                out[path] = {"type": "FILE", "size": st.size, "md5": hashlib.md5(data).hexdigest()}

    await walk(vol.root_id, "")
    return out


def strip_protection(listing: dict[str, Any]) -> dict[str, Any]:
    """Only type, size and md5 (what our_listing reports)."""
    keep = ("type", "size", "md5")
    return {p: {k: v for k, v in r.items() if k in keep} for p, r in listing.items()}
