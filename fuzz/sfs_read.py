"""Coverage-guided fuzzing of the SFS engine (SFS\\0, SFS\\2) with hostile images.

    nice -n 19 .venv/bin/python fuzz/sfs_read.py -max_total_time=600 fuzz/corpus/sfs
    .venv/bin/python fuzz/sfs_read.py crash-<sha>          # replay one finding
    .venv/bin/python fuzz/sfs_read.py --random 200         # without atheris

See fuzz/README.md.  The first byte of each input picks the base image; the rest
decides the mutations (fuzz/_common.py).
"""

from __future__ import annotations

import contextlib
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz import _driver

with _driver.instrumented():
    import trio

    from amigafuse.amiga.dostype import SFS0, SFS2
    from amigafuse.amiga.geometry import VolumeGeometry
    from amigafuse.blockdev.memory import MemoryBlockDevice
    from amigafuse.errors import AmigaFuseError, DeviceGone
    from amigafuse.fs.sfs import ENGINE, check_volume, codec, format_volume, open_volume
    from fuzz._common import BaseImage, DataProvider, fixed_clock, run_one

VOLUME_BYTES = 1 << 20
VARIANTS: tuple[tuple[int, int], ...] = ((SFS0, 512), (SFS2, 1024), (SFS0, 1024))
KNOWN_IDS = (
    codec.ROOT_ID_SFS0, codec.ROOT_ID_SFS2, codec.OBJECTCONTAINER_ID, codec.HASHTABLE_ID,
    codec.SOFTLINK_ID, codec.NODECONTAINER_ID, codec.BNODECONTAINER_ID, codec.BITMAP_ID,
    codec.ADMINSPACECONTAINER_ID, codec.TRANSACTIONSTORAGE_ID, codec.TRANSACTIONFAILURE_ID,
    codec.TRANSACTIONOK_ID, codec.JOURNAL_HEADER_ID, codec.JOURNAL_DATA_ID,
)  # fmt: skip


def _pattern(seed: int, size: int) -> bytes:
    return bytes((seed * 5 + i * 11) & 0xFF for i in range(size))


async def _build(dostype: int, bs: int) -> bytes:
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs)
    dev = MemoryBlockDevice(VOLUME_BYTES // 512, 512)
    await format_volume(dev, geo, "Fuzz")
    vol = await open_volume(dev, geo, False)
    root = vol.root_id
    d = await vol.mkdir(root, "dir")
    sub = await vol.mkdir(d.object_id, "sub")
    for i in range(24):  # enough objects for several object containers
        parent = (root, d.object_id, sub.object_id)[i % 3]
        st = await vol.create(parent, f"file_{i:02d}_with_a_longer_name")
        await vol.write(st.object_id, 0, _pattern(i, (0, 90, 700, 3000)[i % 4]))
    big = await vol.create(root, "big.bin")
    for i in range(40):  # fragmented: many extents (B-tree nodes)
        await vol.write(big.object_id, i * 4096, _pattern(i, 1000))
        filler = await vol.create(sub.object_id, f"fill{i}")
        await vol.write(filler.object_id, 0, b"x" * 600)
    for i in range(0, 40, 3):
        await vol.unlink(sub.object_id, f"fill{i}")  # frees space, .recycled entries
    await vol.symlink(root, "soft", "dir/file_01_with_a_longer_name")
    with contextlib.suppress(AmigaFuseError):
        await vol.link(big.object_id, d.object_id, "hard")
    await vol.close()
    return bytes(dev.data)


class _StopAfter(MemoryBlockDevice):
    """A memory device that stops taking writes after ``limit`` of them (a crash)."""

    def __init__(self, data: bytes, limit: int) -> None:
        super().__init__(data=data)
        self.limit = limit
        self.done = 0

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        if self.done >= self.limit:
            raise DeviceGone("simulated crash")
        self.done += 1
        await super().write(lba, data)


async def _crash(clean: bytes, dostype: int, bs: int) -> bytes:
    """``clean`` after a crash in the middle of a commit: a transaction is pending."""
    geo = VolumeGeometry(dostype=dostype, fs_block_size=bs)
    for limit in range(1, 200):
        dev = _StopAfter(clean, limit)
        try:
            vol = await open_volume(dev, geo, False)
            d = await vol.lookup(vol.root_id, "dir")
            for i in range(6):
                st = await vol.create(d.object_id, f"crash_{i}")
                await vol.write(st.object_id, 0, _pattern(i, 900 * i + 1))
            await vol.unlink(vol.root_id, "file_00_with_a_longer_name")
            await vol.rename(vol.root_id, "big.bin", d.object_id, "moved.bin")
            await vol.sync()
        except DeviceGone:
            pass
        crashed = bytes(dev.data)
        report = await check_volume(MemoryBlockDevice(data=crashed), geo, False)
        if any("is pending" in e for e in report.errors):
            return crashed
    raise AssertionError("no crash point left a pending journal")


def make_base(dostype: int, bs: int, *, journal: bool = False) -> BaseImage:
    with fixed_clock():
        data = trio.run(_build, dostype, bs)
    if journal:
        with fixed_clock():
            data = trio.run(_crash, data, dostype, bs)
    sfs2 = dostype == SFS2
    meta: list[int] = []
    for block in range(len(data) // bs):
        raw = data[block * bs : block * bs + bs]
        if struct.unpack_from(">L", raw, 0)[0] in KNOWN_IDS and codec.checksum_ok(raw, sfs2):
            meta.append(block)

    def fix(blk: bytearray, block: int) -> None:
        codec.set_checksum(blk, sfs2)

    count = len(data) // bs
    interesting = (
        0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, count - 1, count, count + 1,
        1 << 16, bs, *KNOWN_IDS, *meta[:40],
    )  # fmt: skip
    return BaseImage(
        name=f"sfs-{dostype & 0xFF}-{bs}" + ("-journal" if journal else ""),
        engine=ENGINE,
        geometry=VolumeGeometry(dostype=dostype, fs_block_size=bs),
        data=data,
        block_size=bs,
        meta_blocks=tuple(meta),
        fix_checksum=fix,
        interesting=interesting,
    )


BASES = [make_base(dostype, bs) for dostype, bs in VARIANTS] + [make_base(SFS0, 512, journal=True)]


def one_input(fdp: DataProvider) -> None:
    base = BASES[fdp.ConsumeIntInRange(0, len(BASES) - 1)]
    run_one(base, fdp)


if __name__ == "__main__":
    _driver.main(one_input)
