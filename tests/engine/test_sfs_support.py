"""Helpers for the SFS engine tests: a minimal PART reader and manifest walking."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev import FileBlockDevice, PartitionDevice
from amigafuse.fs.api import Kind, Volume
from tests.conftest import content  # noqa: F401  (re-exported for the tests of this tier)


def first_partition(path: Path, *, read_only: bool = True) -> tuple[PartitionDevice, VolumeGeometry]:
    """The first RDB partition of an image, read minimally (RDSK -> first PART)."""
    raw = path.read_bytes()[: 64 * 512]
    for lba in range(16):
        blk = raw[lba * 512 : lba * 512 + 512]
        if blk[:4] == b"RDSK":
            break
    else:
        raise AssertionError("no RDSK")
    part_lba = struct.unpack_from(">I", blk, 28)[0]
    part = raw[part_lba * 512 : part_lba * 512 + 512]
    assert part[:4] == b"PART"
    env = struct.unpack_from(">17I", part, 128)
    size_block, surfaces, spb, bpt = env[1], env[3], env[4], env[5]
    low, high, dostype = env[9], env[10], env[16]
    sector = size_block * 4
    per_cyl = surfaces * bpt * sector // 512
    first = low * per_cyl
    count = (high - low + 1) * per_cyl
    dev = FileBlockDevice(str(path), read_only=read_only)
    geo = VolumeGeometry(
        dostype=dostype,
        fs_block_size=sector * spb,
        fs_block_count=count * 512 // (sector * spb),
        reserved=env[6],
        size_block_bytes=sector,
        surfaces=surfaces,
        blocks_per_track=bpt,
        low_cyl=low,
        high_cyl=high,
    )
    return PartitionDevice(dev, first, count, read_only=read_only), geo


def load_manifest(name: str) -> dict[str, Any]:
    from tests.conftest import HANDLER

    return json.loads((HANDLER / f"{name}.manifest.json").read_text())  # type: ignore[no-any-return]


async def walk(vol: Volume, dir_id: int, prefix: str, out: dict[str, Any]) -> None:
    for st in await vol.readdir(dir_id):
        path = f"{prefix}/{st.name}"
        out[path] = st
        if st.kind is Kind.DIR:
            await walk(vol, st.object_id, path, out)
