"""``amigafuse list``: the units of the SOURCEs and the partitions the mounter announces."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from amigafuse.amiga.dostype import common_name, dostype_to_str
from amigafuse.errors import (
    AmigaFuseError,
    CorruptError,
    DeviceError,
    DeviceGone,
    NotAvailable,
    UsageError,
)
from amigafuse.rdb.blocks import cstr_decode
from amigafuse.rdb.mounter import Announcement, Mounter, announce_unit
from amigafuse.rdb.scan import DiskLayout, FileSystemHandler
from amigafuse.sources import (
    BACKENDS,
    TRANSPORTS,
    Unit,
    _driver,
    _scsi_unit,
    check_arguments,
    format_size,
    open_units,
)


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
            "SOURCE is an image file (.hdf, .adf, raw dump), qemu:SOCKET,SHM or vfio:BDF. "
            "A disk that does not come up (through QEMU: an image it cannot take such as an "
            "empty one, a target whose INQUIRY, TEST UNIT READY or READ CAPACITY fails; any "
            "backend: unreadable first blocks) is shown as FAILED with the reason, the "
            "others are listed all the same, and the exit status is 1."
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


@dataclass(frozen=True)
class FailedUnit:
    """A disk that did not come up (its image refused, its target failing INQUIRY, TEST
    UNIT READY or READ CAPACITY, or its first blocks unreadable): what to call it and
    why."""

    name: str
    source: str
    backend: str
    target: int | None
    error: AmigaFuseError

    @property
    def reason(self) -> str:
        """The error's message, without the unit's name when it already starts so."""
        message = self.error.message
        return message.removeprefix(f"{self.name}: ")


Listed = tuple[Unit, DiskLayout, list[Announcement]]


@dataclass
class Listing:
    """What ``list`` shows: the disks that came up and the ones that did not, each in
    the order of the SOURCEs (or of the targets of a ``qemu:``/``vfio:`` controller)."""

    units: list[Listed] = field(default_factory=list)
    failed: list[FailedUnit] = field(default_factory=list)
    order: list[Listed | FailedUnit] = field(default_factory=list)

    def add(self, entry: Listed | FailedUnit) -> None:
        if isinstance(entry, FailedUnit):
            self.failed.append(entry)
        else:
            self.units.append(entry)
        self.order.append(entry)


async def announce(mounter: Mounter, unit: Unit, target: int | None) -> Listed | FailedUnit:
    """The unit's layout and partitions, or a FailedUnit when its first blocks cannot be
    read (the other units are listed all the same).  DeviceGone (QEMU died) is raised."""
    try:
        layout, anns = await announce_unit(mounter, unit.name, unit.device)
    except DeviceGone:
        raise
    except (DeviceError, CorruptError) as exc:
        return FailedUnit(unit.name, unit.source, unit.backend, target, exc)
    return unit, layout, anns


async def list_controller(
    listing: Listing, mounter: Mounter, controller: Any, prefix: str, backend: str
) -> None:
    """Add the disks of a driver Controller (and its failed targets), in target order."""
    entries: list[tuple[int, Unit | FailedUnit]] = []
    for i, disk in enumerate(controller.disks):
        unit = _scsi_unit(prefix, disk, i, backend)
        entries.append((getattr(disk, "target", i), unit))
    for failure in getattr(controller, "failed", ()):
        name = f"{prefix}#{failure.target}"
        entries.append((failure.target, FailedUnit(name, prefix, backend, failure.target, failure.error)))
    for target, entry in sorted(entries, key=lambda e: e[0]):
        listing.add(entry if isinstance(entry, FailedUnit) else await announce(mounter, entry, target))


async def gather(sources: list[str], backend: str, transport: str) -> Listing:
    """Open ``sources`` read-only and list them; a disk that does not come up is
    recorded in ``failed`` and the others are listed.  Raises UsageError for bad
    arguments, NotAvailable/DeviceError when the controller itself does not come up,
    DeviceGone when QEMU dies."""
    mounter = Mounter(engine_name)
    listing = Listing()
    check_arguments(sources, backend, transport)
    first = sources[0]
    if backend == "file" and not first.startswith(("qemu:", "vfio:")):
        async with open_units(sources, backend=backend, transport=transport, read_only=True) as units:
            for unit in units:
                listing.add(await announce(mounter, unit, None))
        return listing
    if first.startswith("vfio:"):
        bdf = first.removeprefix("vfio:")
        open_vfio = _driver("backends.vfio", "the VFIO backend").open_vfio
        async with open_vfio(bdf, transport=transport) as controller:
            await list_controller(listing, mounter, controller, f"vfio:{bdf}", "vfio")
        return listing
    if first.startswith("qemu:"):
        socket_path, sep, shm_path = first.removeprefix("qemu:").partition(",")
        if not sep or not socket_path or not shm_path:
            raise UsageError(f"{first}: write qemu:SOCKET,SHM (the qtest socket and the RAM file)")
        attach_qemu = _driver("controller", "the QEMU backend").attach_qemu
        async with attach_qemu(socket_path, shm_path, transport=transport) as controller:
            await list_controller(listing, mounter, controller, first, "qemu")
        return listing
    await list_images(listing, mounter, sources, transport)
    return listing


async def list_images(listing: Listing, mounter: Mounter, sources: list[str], transport: str) -> None:
    """Image files on a QEMU we start: SOURCE i is SCSI target i.  An image QEMU cannot
    take (empty, unreadable...) is reported and left out; the others are attached."""
    driver = _driver("controller", "the QEMU backend")
    if len(sources) > driver.MAX_IMAGES:
        driver.check_images([driver.DiskImage(path=src) for src in sources])  # raises
    refused: dict[int, FailedUnit] = {}
    images = []
    for target, src in enumerate(sources):
        image = driver.DiskImage(path=src, read_only=True, target=target)
        try:
            driver.check_images([image])
        except UsageError as exc:
            refused[target] = FailedUnit(src, src, "qemu", target, exc)
            continue
        images.append(image)
    if not images:
        for target in sorted(refused):
            listing.add(refused[target])
        return
    async with driver.open_qemu(images, transport=transport) as controller:
        disks = {d.target: d for d in controller.disks}
        failures = {f.target: f for f in controller.failed}
        for target, src in enumerate(sources):
            if target in refused:
                listing.add(refused[target])
            elif target in disks:
                disk = disks[target]
                listing.add(await announce(mounter, Unit(src, src, disk, disk.info, "qemu"), target))
            elif target in failures:
                listing.add(FailedUnit(src, src, "qemu", target, failures[target].error))
            else:
                listing.add(
                    FailedUnit(
                        src, src, "qemu", target,
                        NotAvailable(f"QEMU's controller shows no disk at target {target}; try --backend file"),
                    )
                )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    found = trio.run(gather, list(args.sources), args.backend, args.transport)
    if args.json:
        out = [
            failed_json(e) if isinstance(e, FailedUnit) else unit_json(*e) for e in found.order
        ]
        print(json.dumps(out, indent=2))
    else:
        for i, entry in enumerate(found.order):
            if i:
                print()
            if isinstance(entry, FailedUnit):
                print_failed(entry)
            else:
                print_unit(*entry)
    for failed in found.failed:
        print(f"amigafuse list: {failed.name}: {failed.reason}", file=sys.stderr)
    return 1 if found.failed else 0


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


def failed_json(f: FailedUnit) -> dict[str, Any]:
    """A disk that did not come up: ``failed`` true, the error and its errno."""
    return {
        "name": f.name,
        "source": f.source,
        "backend": f.backend,
        "target": f.target,
        "failed": True,
        "error": f.error.message,
        "errno": f.error.errno,
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


def print_failed(f: FailedUnit) -> None:
    where = f" (SCSI target {f.target})" if f.target is not None else ""
    print(f"{f.name}: FAILED [{f.backend}]{where}: {f.reason}")


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
