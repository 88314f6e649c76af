"""Helpers shared by the FFS engine tests (no tests here): a minimal RDB reader (so the
tests do not depend on the RDB layer), manifest comparison, content generation."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.blockdev.file import FileBlockDevice
from amigafuse.blockdev.window import PartitionDevice
from amigafuse.fs.api import Kind, Stat, Volume
from tests.conftest import content  # noqa: F401  (re-exported for the tests of this tier)


@dataclass
class Part:
    name: str
    first_sector: int
    sectors: int
    geometry: VolumeGeometry


def rdb_partitions(path: Path) -> list[Part]:
    """The PART list of an RDB disk image (512-byte sectors), parsed minimally."""
    data = path.read_bytes()
    for lba in range(16):
        if data[lba * 512 : lba * 512 + 4] == b"RDSK":
            rdsk = lba
            break
    else:
        raise AssertionError("no RDSK in blocks 0-15")
    (part,) = struct.unpack_from(">L", data, rdsk * 512 + 28)
    out = []
    seen = set()
    while part != 0xFFFFFFFF and part not in seen:
        seen.add(part)
        off = part * 512
        assert data[off : off + 4] == b"PART"
        (nxt,) = struct.unpack_from(">L", data, off + 16)
        name = data[off + 0x25 : off + 0x25 + data[off + 0x24]].decode("latin-1")
        env = struct.unpack_from(">17L", data, off + 0x80)
        size_block, surfaces, spb, bpt, reserved = env[1], env[3], env[4], env[5], env[6]
        low, high, dostype = env[9], env[10], env[16]
        sector = size_block * 4
        cyl_sectors = surfaces * bpt * sector // 512
        first = low * cyl_sectors
        sectors = (high - low + 1) * cyl_sectors
        fsbs = sector * spb
        geo = VolumeGeometry(
            dostype=dostype, fs_block_size=fsbs, fs_block_count=sectors * 512 // fsbs,
            reserved=reserved, surfaces=surfaces, blocks_per_track=bpt, low_cyl=low, high_cyl=high,
        )  # fmt: skip
        out.append(Part(name, first, sectors, geo))
        part = nxt
    return out


def partition_device(path: Path, part: Part, read_only: bool = False) -> BlockDevice:
    dev = FileBlockDevice(str(path), read_only=read_only)
    return PartitionDevice(dev, part.first_sector, part.sectors)


async def walk(vol: Volume) -> dict[str, Stat]:
    """Every object by path ("/a/b"), depth first; hard-linked directories not entered."""
    found: dict[str, Stat] = {}
    seen: set[int] = {vol.root_id}

    async def rec(did: int, path: str) -> None:
        for st in await vol.readdir(did):
            p = f"{path}/{st.name}"
            found[p] = st
            if st.kind == Kind.DIR and st.object_id not in seen:
                seen.add(st.object_id)
                await rec(st.object_id, p)

    await rec(vol.root_id, "")
    return found


KINDS = {"file": Kind.FILE, "dir": Kind.DIR, "softlink": Kind.SOFTLINK,
         "hardlink-file": Kind.FILE, "hardlink-dir": Kind.DIR}  # fmt: skip


async def compare_manifest(vol: Volume, manifest: dict[str, Any]) -> list[str]:
    """Differences between the volume and a handler manifest (empty when exact).
    Sizes: the header's size (Examine), see docs/ffs.md on the dircache quirk."""
    found = await walk(vol)
    problems = []
    for e in manifest["entries"]:
        path = e["path"]
        st = found.get(path)
        if st is None:
            problems.append(f"{path}: missing")
            continue
        if st.kind != KINDS[e["type"]]:
            problems.append(f"{path}: kind {st.kind}")
        size = e.get("examine_mismatch", {}).get("size", e["size"])
        if st.kind == Kind.FILE and st.size != size:
            problems.append(f"{path}: size {st.size} != {size}")
        if st.protection != e["protection"]:
            problems.append(f"{path}: protection {st.protection:#x} != {e['protection']:#x}")
        if [st.date.days, st.date.minutes, st.date.ticks] != e["date"]:
            problems.append(f"{path}: date {st.date} != {e['date']}")
        if st.comment != e["comment"]:
            problems.append(f"{path}: comment {st.comment!r}")
        if "link_target" in e and st.link_target != e["link_target"]:
            problems.append(f"{path}: link target {st.link_target!r}")
        if e["type"].startswith("hardlink"):
            target = path.rsplit("/", 1)[0]
            # link_resolves_to names the target: same object id as the linked object
            cands = [s for p, s in found.items() if p.endswith("/" + e["link_resolves_to"])]
            if not any(s.object_id == st.object_id for s in cands):
                problems.append(f"{path}: not the same object as {e['link_resolves_to']} ({target})")
        if "md5" in e:
            data = await vol.read(st.object_id, 0, 1 << 30)
            if hashlib.md5(data).hexdigest() != e["md5"]:
                problems.append(f"{path}: content differs ({len(data)} bytes)")
    extra = set(found) - {e["path"] for e in manifest["entries"]}
    problems.extend(f"{p}: not in the manifest" for p in sorted(extra))
    return problems
