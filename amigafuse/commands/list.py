"""``amigafuse list``: the units of the SOURCEs and the partitions the mounter announces."""

from __future__ import annotations

import argparse
import json
from typing import Any

import trio

from amigafuse.amiga.dostype import common_name, dostype_to_str
from amigafuse.rdb.blocks import cstr_decode
from amigafuse.rdb.mounter import Announcement, Mounter, announce_unit
from amigafuse.rdb.scan import DiskLayout, FileSystemHandler
from amigafuse.sources import BACKENDS, TRANSPORTS, Unit, format_size, open_units


def add_source_options(p: argparse.ArgumentParser) -> None:
    """--backend/--transport, shared by list, format and check."""
    p.add_argument(
        "--backend", choices=BACKENDS, default="qemu",
        help="qemu (default): attach the images to a QEMU virtio-scsi controller driven by "
        "amigafuse's own driver; file: read and write the image files directly",
    )  # fmt: skip
    p.add_argument(
        "--transport", choices=TRANSPORTS, default="auto",
        help="VirtIO transport of the controller (qemu/vfio backends): auto, legacy or modern",
    )  # fmt: skip


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "list",
        help="list the disks and the partitions on them",
        description=(
            "Show each disk (vendor, product, capacity, block size, RDB geometry) and each "
            "partition (DOS name, DosType, size, byte range, boot priority, flags, "
            "filesystem handlers stored in the RDB, and whether amigafuse can mount it). "
            "SOURCE is an image file (.hdf, .adf, raw dump), qemu:SOCKET,SHM or vfio:BDF."
        ),
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_source_options(p)
    p.set_defaults(handler=run)


def engine_name(dostype: int) -> str | None:
    """The name of the engine amigafuse has for ``dostype``, or None."""
    from amigafuse.fs import engine_for

    engine = engine_for(dostype)
    return engine.name if engine is not None else None


async def gather(
    sources: list[str], backend: str, transport: str
) -> list[tuple[Unit, DiskLayout, list[Announcement]]]:
    mounter = Mounter(engine_name)
    out = []
    async with open_units(sources, backend=backend, transport=transport, read_only=True) as units:
        for unit in units:
            layout, anns = await announce_unit(mounter, unit.name, unit.device)
            out.append((unit, layout, anns))
    return out


def run(args: argparse.Namespace) -> int:
    found = trio.run(gather, list(args.sources), args.backend, args.transport)
    if args.json:
        print(json.dumps([unit_json(u, lay, anns) for u, lay, anns in found], indent=2))
    else:
        for i, (u, lay, anns) in enumerate(found):
            if i:
                print()
            print_unit(u, lay, anns)
    return 0


# --------------------------------------------------------------------------- JSON


def fs_json(fs: FileSystemHandler) -> dict[str, Any]:
    return {
        "block": fs.block,
        "dostype": dostype_to_str(fs.dostype),
        "dostype_hex": f"{fs.dostype:#010x}",
        "version": fs.version,
        "code_bytes": fs.code_bytes,
        "ver_string": fs.ver_string,
        "complete": fs.complete,
    }


def rdb_handler_for(a: Announcement, lay: DiskLayout) -> FileSystemHandler | None:
    """The handler stored in the RDB for the partition's DosType (PART's or volume's)."""
    for fs in lay.filesystems:
        if fs.dostype in (a.part_dostype, a.volume_dostype):
            return fs
    return None


def ann_json(a: Announcement, lay: DiskLayout) -> dict[str, Any]:
    p = a.partition
    handler = rdb_handler_for(a, lay)
    return {
        "dos_name": a.dos_name,
        "drive_name": p.drive_name,
        "index": p.index,
        "part_block": p.part_block,
        "dostype": dostype_to_str(a.part_dostype),
        "dostype_hex": f"{a.part_dostype:#010x}",
        "dostype_name": common_name(a.part_dostype),
        "volume_dostype": None if a.volume_dostype is None else dostype_to_str(a.volume_dostype),
        "first_byte": p.first_byte,
        "last_byte": p.last_byte,
        "size_bytes": p.size_bytes,
        "first_lba": p.first_lba,
        "block_count": p.block_count,
        "boot_pri": p.boot_pri,
        "bootable": p.bootable,
        "no_automount": p.no_automount,
        "low_cyl": p.geometry.low_cyl,
        "high_cyl": p.geometry.high_cyl,
        "surfaces": p.geometry.surfaces,
        "blocks_per_track": p.geometry.blocks_per_track,
        "fs_block_size": p.geometry.fs_block_size,
        "reserved": p.geometry.reserved,
        "prealloc": p.geometry.prealloc,
        "max_transfer": p.geometry.max_transfer,
        "mask": p.geometry.mask,
        "rdb_handler": None if handler is None else fs_json(handler),
        "engine": a.engine,
        "mountable": a.mountable,
        "automount": a.automount,
        "reason": a.reason,
    }


def unit_json(u: Unit, lay: DiskLayout, anns: list[Announcement]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": u.name,
        "source": u.source,
        "backend": u.backend,
        "vendor": u.info.vendor,
        "product": u.info.product,
        "revision": u.info.revision,
        "block_size": lay.block_size,
        "block_count": lay.block_count,
        "size_bytes": lay.size_bytes,
        "read_only": u.device.read_only,
        "layout": lay.kind,
        "partitions": [ann_json(a, lay) for a in anns],
        "filesystems": [fs_json(f) for f in lay.filesystems],
        "problems": [
            {"severity": p.severity, "message": p.message, "block": p.block, "field": p.field}
            for p in lay.problems
        ],
    }
    if lay.rdsk is not None:
        r = lay.rdsk
        out["rdb"] = {
            "block": lay.rdsk_block,
            "block_bytes": r.rdb_BlockBytes,
            "cylinders": r.rdb_Cylinders,
            "heads": r.rdb_Heads,
            "sectors": r.rdb_Sectors,
            "cyl_blocks": r.rdb_CylBlocks,
            "rdb_blocks": [r.rdb_RDBBlocksLo, r.rdb_RDBBlocksHi],
            "lo_cylinder": r.rdb_LoCylinder,
            "hi_cylinder": r.rdb_HiCylinder,
            "disk_vendor": cstr_decode(r.rdb_DiskVendor),
            "disk_product": cstr_decode(r.rdb_DiskProduct),
            "disk_revision": cstr_decode(r.rdb_DiskRevision),
        }
    return out


# --------------------------------------------------------------------------- text


def print_unit(u: Unit, lay: DiskLayout, anns: list[Announcement]) -> None:
    ident = " ".join(x for x in (u.info.vendor, u.info.product, u.info.revision) if x)
    ro = ", read-only" if u.device.read_only else ""
    print(
        f"{u.name}: {ident} [{u.backend}{ro}], {format_size(lay.size_bytes)} "
        f"({lay.block_count} blocks of {lay.block_size} bytes)"
    )
    if lay.rdsk is not None:
        r = lay.rdsk
        disk = " ".join(x for x in (cstr_decode(r.rdb_DiskVendor), cstr_decode(r.rdb_DiskProduct)) if x)
        print(
            f"  RDB at block {lay.rdsk_block}: {r.rdb_Cylinders} cylinders x {r.rdb_Heads} heads x "
            f"{r.rdb_Sectors} sectors, RDB blocks {r.rdb_RDBBlocksLo}..{r.rdb_RDBBlocksHi}"
            + (f", drive {disk!r}" if disk else "")
        )
    elif lay.kind == "bare":
        print("  no RDB: one volume from block 0")
    else:
        print("  no RDB and no Amiga volume")
    if anns:
        print(
            f"  {'DOS name':<14} {'DosType':<8} {'filesystem':<14} {'size':>10}  "
            f"{'bytes':<25} {'pri':>4}  {'flags':<18} mount"
        )
    for a in anns:
        p = a.partition
        flags = ",".join(f for f, on in (("bootable", p.bootable), ("noautomount", p.no_automount)) if on) or "-"
        vol = a.volume_dostype
        fsname = common_name(a.part_dostype)
        if vol is not None and vol != a.part_dostype:
            fsname += f" (volume {dostype_to_str(vol)})"
        if a.automount:
            mount = f"yes ({a.engine})"
        elif a.mountable:
            mount = f"by name only ({a.engine}): {a.reason}"
        else:
            mount = f"no: {a.reason}"
        print(
            f"  {a.dos_name:<14} {dostype_to_str(a.part_dostype):<8} {fsname:<14} "
            f"{format_size(p.size_bytes):>10}  {f'{p.first_byte}..{p.last_byte}':<25} "
            f"{p.boot_pri:>4}  {flags:<18} {mount}"
        )
        handler = rdb_handler_for(a, lay)
        if handler is not None:
            print(
                f"  {'':<14} handler in the RDB for it: {dostype_to_str(handler.dostype)} "
                f"version {handler.version}" + (f" ({handler.ver_string})" if handler.ver_string else "")
            )
    for fs in lay.filesystems:
        ver = f", $VER: {fs.ver_string}" if fs.ver_string else ""
        state = "" if fs.complete else " (INCOMPLETE)"
        print(
            f"  filesystem handler in the RDB: {dostype_to_str(fs.dostype)} "
            f"({common_name(fs.dostype)}) version {fs.version}, {fs.code_bytes} bytes{ver}{state}"
        )
    for pr in lay.problems:
        print(f"  {pr.severity}: {pr}")
