"""Coverage-guided fuzzing of the FFS engine (DOS\\0-\\7) with hostile images.

    nice -n 19 .venv/bin/python fuzz/ffs_read.py -max_total_time=600 fuzz/corpus/ffs
    .venv/bin/python fuzz/ffs_read.py crash-<sha>          # replay one finding
    .venv/bin/python fuzz/ffs_read.py --random 200         # without atheris

See fuzz/README.md.  The first byte of each input picks the base image (DosType and
block size); the rest decides the mutations (fuzz/_common.py).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz import _driver

with _driver.instrumented():
    import trio

    from amigafuse.amiga.geometry import VolumeGeometry
    from amigafuse.blockdev.memory import MemoryBlockDevice
    from amigafuse.fs.api import SetAttrs
    from amigafuse.fs.ffs import ENGINE, open_volume
    from amigafuse.fs.ffs.layout import (
        ST_FILE,
        ST_LINKDIR,
        ST_LINKFILE,
        ST_ROOT,
        ST_SOFTLINK,
        ST_USERDIR,
        T_DATA,
        T_DIRCACHE,
        T_HEADER,
        T_LIST,
        RootBlock,
        verify_checksum,
        with_checksum,
    )
    from fuzz._common import BaseImage, DataProvider, fixed_clock, run_one

BLOCKS = 700  # filesystem blocks per volume: a few hundred metadata blocks at most

VARIANTS: tuple[tuple[int, int], ...] = (
    (0x444F5300, 512),  # OFS
    (0x444F5301, 512),  # FFS
    (0x444F5303, 512),  # FFS INTL
    (0x444F5305, 512),  # FFS INTL dircache
    (0x444F5307, 512),  # FFS INTL long names
    (0x444F5303, 1024),
)


def _pattern(seed: int, size: int) -> bytes:
    return bytes((seed * 7 + i * 13) & 0xFF for i in range(size))


async def _build(dostype: int, bs: int) -> bytes:
    dev = MemoryBlockDevice(BLOCKS * bs // 512)
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs, fs_block_count=BLOCKS, reserved=2)
    await ENGINE.format_volume(dev, geo, "Fuzz")
    vol = await open_volume(dev, geo, False)
    root = vol.root_id
    d = await vol.mkdir(root, "dir")
    sub = await vol.mkdir(d.object_id, "sub")
    sizes = (0, 100, 1500, 9000, 45000)  # 45000: more blocks than one header's table
    for i, size in enumerate(sizes):
        parent = (root, d.object_id, sub.object_id)[i % 3]
        st = await vol.create(parent, f"file{i}")
        if size:
            await vol.write(st.object_id, 0, _pattern(i, size))
    f = await vol.create(root, "top.txt")
    await vol.write(f.object_id, 0, b"top level text\n" * 40)
    await vol.link(f.object_id, d.object_id, "hard")
    await vol.link(sub.object_id, root, "dirlink")
    await vol.symlink(root, "soft", "dir/file1")
    await vol.setattr(f.object_id, SetAttrs(comment="a comment on a file"))
    await vol.close()
    return bytes(dev.data)


def _geometry(dostype: int, bs: int) -> VolumeGeometry:
    return VolumeGeometry(dostype=dostype, fs_block_size=bs, fs_block_count=BLOCKS, reserved=2)


def make_base(dostype: int, bs: int) -> BaseImage:
    with fixed_clock():
        data = trio.run(_build, dostype, bs)
    root_key = (2 + BLOCKS - 1) // 2
    root = RootBlock.unpack(data[root_key * bs : root_key * bs + bs])
    bitmap_blocks = {b for b in root.bm_pages if 0 < b < BLOCKS}
    ext = root.bm_ext
    ext_blocks: set[int] = set()
    while 0 < ext < BLOCKS and ext not in ext_blocks:
        ext_blocks.add(ext)
        raw = data[ext * bs : ext * bs + bs]
        longs = struct.unpack(f">{bs // 4}L", raw)
        bitmap_blocks.update(b for b in longs[:-1] if 0 < b < BLOCKS)
        ext = longs[-1]
    meta: list[int] = [0, 1]  # boot blocks: DosType and flags
    for block in range(2, BLOCKS):
        raw = data[block * bs : block * bs + bs]
        typ = struct.unpack_from(">L", raw, 0)[0]
        if (
            block in bitmap_blocks
            or block in ext_blocks
            or (typ in (T_HEADER, T_LIST, T_DIRCACHE, T_DATA) and verify_checksum(raw))
        ):
            meta.append(block)

    def fix(blk: bytearray, block: int) -> None:
        if block in bitmap_blocks:
            blk[:] = with_checksum(blk, 0)
        elif block in ext_blocks or block < 2:
            return  # no checksum (the boot block's covers code we do not care about)
        else:
            blk[:] = with_checksum(blk, 20)

    interesting = (
        0, 1, 2, 3, 4, 5, 0x48, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
        BLOCKS - 1, BLOCKS, BLOCKS + 1, root_key, 1 << 16,
        T_HEADER, T_LIST, T_DIRCACHE, T_DATA,
        ST_ROOT, ST_USERDIR, ST_SOFTLINK, ST_LINKDIR, ST_FILE & 0xFFFFFFFF, ST_LINKFILE & 0xFFFFFFFF,
        *meta[2:40],
    )  # fmt: skip
    return BaseImage(
        name=f"ffs-{dostype & 0xFF}-{bs}",
        engine=ENGINE,
        geometry=_geometry(dostype, bs),
        data=data,
        block_size=bs,
        meta_blocks=tuple(meta),
        fix_checksum=fix,
        interesting=interesting,
    )


BASES = [make_base(dostype, bs) for dostype, bs in VARIANTS]


def one_input(fdp: DataProvider) -> None:
    base = BASES[fdp.ConsumeIntInRange(0, len(BASES) - 1)]
    run_one(base, fdp)


if __name__ == "__main__":
    _driver.main(one_input)
