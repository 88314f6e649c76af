"""Coverage-guided fuzzing of the RDB scanner and the mounter rules with hostile disks.

    nice -n 19 .venv/bin/python fuzz/rdb_scan.py -max_total_time=600 fuzz/corpus/rdb
    .venv/bin/python fuzz/rdb_scan.py crash-<sha>          # replay one finding
    .venv/bin/python fuzz/rdb_scan.py --random 200         # without atheris

The base disk (made by our own ``plan_disk``) holds an RDB with a handler (FSHD + LSEG
chain) and three partitions, formatted FFS (DOS\\3), SFS\\0 and OFS, each with a few
files.  Mutations hit the RDB blocks (and each partition's first block); the checksum
is fixed afterwards when the fuzzer says so.  Then: the scan (pure generator: every
read inside the disk, the number of reads bounded), the mounter's announcements, and
for each mountable partition a read-only mount and walk, then a read-write mount with
a few writes; nothing outside that partition's byte range may change.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz import _driver

with _driver.instrumented():
    import trio

    from amigafuse.amiga.dostype import SFS0
    from amigafuse.blockdev.memory import MemoryBlockDevice
    from amigafuse.blockdev.window import PartitionDevice
    from amigafuse.errors import AmigaFuseError
    from amigafuse.fs import engine_for
    from amigafuse.rdb.blocks import compute_checksum
    from amigafuse.rdb.mounter import Mounter
    from amigafuse.rdb.scan import (
        MAX_FILESYSTEMS,
        MAX_LSEG_BLOCKS,
        MAX_PARTITIONS,
        DiskLayout,
        scan_disk,
    )
    from amigafuse.rdb.writer import HandlerSpec, PartitionSpec, plan_disk
    from fuzz._common import (
        TIME_BOUND_S,
        WALL_BOUND_S,
        BaseImage,
        Damage,
        DataProvider,
        Mutation,
        _writes,
        fixed_clock,
        mutate,
        walk,
        wall_clock,
    )

MiB = 1 << 20
DISK_BYTES = 4 * MiB
READ_BOUND = 1 + MAX_PARTITIONS + MAX_FILESYSTEMS * (1 + MAX_LSEG_BLOCKS) + 1024 + 1
RDB_IDS = (b"RDSK", b"PART", b"FSHD", b"LSEG", b"BADB")


def engine_name(dostype: int) -> str | None:
    engine = engine_for(dostype)
    return engine.name if engine is not None else None


async def _build() -> bytes:
    specs = [
        PartitionSpec("DH0", 0x444F5303, MiB),
        PartitionSpec("DH1", SFS0, MiB),
        PartitionSpec("DH2", 0x444F5300, None),
    ]
    code = b"\x00\x00\x03\xf3" + bytes(1200) + b"$VER: fuzzfs 1.0\0"
    plan = plan_disk(DISK_BYTES, specs, HandlerSpec(0x50465303, code))
    disk = MemoryBlockDevice(DISK_BYTES // 512)
    for lba, data in plan.blocks:
        await disk.write(lba, data)
    layout = scan_image(bytes(disk.data))[0]
    for p in layout.partitions:
        engine = engine_for(p.dostype)
        assert engine is not None
        dev = PartitionDevice(disk, p.first_lba, p.block_count)
        await engine.format_volume(dev, p.geometry, p.drive_name)
        vol = await engine.open_volume(dev, p.geometry, False)
        d = await vol.mkdir(vol.root_id, "dir")
        for i in range(4):
            st = await vol.create(d.object_id if i % 2 else vol.root_id, f"f{i}")
            await vol.write(st.object_id, 0, bytes([65 + i]) * (1000 * i + 10))
        await vol.close()
    return bytes(disk.data)


def scan_image(image: bytes | bytearray) -> tuple[DiskLayout, int]:
    """The scan over ``image``: every read must lie inside it, their number bounded."""
    count = len(image) // 512
    gen = scan_disk(512, count)
    reads = 0
    try:
        req = next(gen)
        while True:
            reads += 1
            if req.lba < 0 or req.count < 1 or req.lba + req.count > count:
                raise Damage(f"the scanner asked for blocks outside the disk: {req}")
            if reads > READ_BOUND:
                raise Damage(f"the scanner read more than {READ_BOUND} times")
            req = gen.send(bytes(image[req.lba * 512 : (req.lba + req.count) * 512]))
    except StopIteration as stop:
        return stop.value, reads


def make_base() -> tuple[BaseImage, tuple[int, ...]]:
    with fixed_clock():
        data = trio.run(_build)
    layout = scan_image(data)[0]
    meta = [b for b in range(64) if data[b * 512 : b * 512 + 4] in RDB_IDS]
    firsts = tuple(p.first_lba for p in layout.partitions)

    def fix(blk: bytearray, block: int) -> None:
        if bytes(blk[:4]) in RDB_IDS:
            summed = struct.unpack_from(">L", blk, 4)[0]
            if 2 < summed <= 128:
                struct.pack_into(">L", blk, 8, compute_checksum(blk, summed))

    geo = layout.partitions[0].geometry
    cyl_blocks = geo.surfaces * geo.blocks_per_track
    interesting = (
        0, 1, 2, 3, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE, 16, 64, 128, 512, 256,
        1024, cyl_blocks, DISK_BYTES // 512, DISK_BYTES // 512 // cyl_blocks,
        0x444F5303, 0x444F5300, SFS0, 0x50465303, 0x52444B53, 0x50415254, 0x46534844,
        0x4C534547, *meta, *firsts,
    )  # fmt: skip
    base = BaseImage(
        name="rdb",
        engine=engine_for(0x444F5303),  # type: ignore[arg-type]  # unused: per partition
        geometry=geo,
        data=data,
        block_size=512,
        meta_blocks=tuple(meta) + firsts,
        fix_checksum=fix,
        interesting=interesting,
    )
    return base, firsts


BASE, FIRSTS = make_base()


async def exercise(raw: bytes, write: bool) -> dict[str, Any]:
    layout, reads = scan_image(raw)
    outcome: dict[str, Any] = {"reads": reads, "kind": layout.kind, "mounted": 0}
    disk = MemoryBlockDevice(data=raw)
    volume_types: dict[int, int | None] = {}
    for p in layout.partitions:
        if 0 <= p.first_lba < disk.block_count:
            volume_types[p.index] = struct.unpack_from(">L", raw, p.first_lba * 512)[0]
    mounter = Mounter(engine_name)
    for ann in mounter.add_unit("fuzz", layout, volume_types, disk):
        if not ann.mountable:
            continue
        engine = engine_for(ann.geometry.dostype)
        if engine is None:
            raise Damage(f"announced mountable without an engine: {ann}")
        p = ann.partition
        try:
            part = ann.open_device(read_only=True)
        except AmigaFuseError:
            continue  # OutOfRange: refused, as it should be
        with trio.fail_after(TIME_BOUND_S):
            try:
                vol = await engine.open_volume(part, ann.geometry, True)
            except AmigaFuseError:
                continue
            outcome["mounted"] += 1
            await walk(vol)
            with contextlib.suppress(AmigaFuseError):
                await vol.close()
        if not write:
            continue
        before = bytes(disk.data)
        with trio.fail_after(TIME_BOUND_S):
            try:
                rw = await engine.open_volume(ann.open_device(), ann.geometry, False)
            except AmigaFuseError:
                continue
            await _writes(rw)
            with contextlib.suppress(AmigaFuseError):
                await rw.close()
        after = bytes(disk.data)
        lo, hi = p.first_lba * 512, (p.first_lba + p.block_count) * 512
        if after[:lo] != before[:lo] or after[hi:] != before[hi:]:
            raise Damage(f"writes to partition {p.drive_name!r} changed bytes outside it")
    return outcome


def one_input(fdp: DataProvider) -> None:
    raw, mutations = mutate(fdp, BASE)
    write = fdp.ConsumeBool()
    try:
        with wall_clock(WALL_BOUND_S), fixed_clock():
            trio.run(exercise, bytes(raw), write)
    except BaseException:
        print(f"[rdb] finding with mutations: {[str(m) for m in mutations]}", file=sys.stderr)
        raise


__all__ = ["Mutation", "one_input"]

if __name__ == "__main__":
    _driver.main(one_input)
