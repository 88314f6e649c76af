"""``amigafuse mkdisk``: create an RDB disk image with partitions, and format them."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Any

import trio

from amigafuse.amiga.dostype import common_name, dostype_to_str, parse_type
from amigafuse.blockdev.file import FileBlockDevice
from amigafuse.errors import UsageError
from amigafuse.rdb.mounter import Mounter, announce_unit
from amigafuse.rdb.writer import (
    DiskPlan,
    HandlerSpec,
    PartitionSpec,
    plan_disk,
    version_from_code,
    write_rdb,
)
from amigafuse.sources import BACKENDS, TRANSPORTS, format_size, open_units, parse_size

MAX_IMAGE_BYTES = 1 << 41  # 2 TiB: RDB LONG block numbers of 512 bytes


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "mkdisk",
        help="create an RDB disk image with partitions (and format them)",
        description=(
            "Create IMAGE (a raw hard disk image) of --size bytes with a Rigid Disk Block "
            "laid out as HDToolBox does (whole cylinders; the RDB in cylinders 0-1) and one "
            "partition per --partition, then format each with amigafuse's filesystem "
            "engines (through the QEMU driver by default). Sizes take K, M, G, T (binary)."
        ),
        epilog=(
            "TYPE: OFS, FFS, OFS+INTL, FFS+INTL, OFS+DC, FFS+DC, OFS+LNFS, FFS+LNFS, SFS, SFS2, "
            "DOS0..DOS7, DOS\\3 or hex. OPTIONS (comma-separated, optional 4th field): "
            "bootable, noboot, pri=N, noautomount, bs=BYTES (filesystem block size). "
            "Example: --partition DH0:FFS+INTL:100M:bootable,pri=1 --partition DH1:SFS:rest"
        ),
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--size", required=True, help="disk size, e.g. 256M or 2G")
    p.add_argument(
        "--partition", action="append", required=True, metavar="NAME:TYPE:SIZE[:OPTIONS]",
        help="a partition; SIZE may be 'rest' for the last one (repeat for more)",
    )  # fmt: skip
    p.add_argument("--handler", dest="handler_file", metavar="FILE", help="store this filesystem handler binary in the RDB")
    p.add_argument(
        "--handler-dostype", metavar="TYPE",
        help="the DosType the stored handler serves (default: the first partition's)",
    )  # fmt: skip
    p.add_argument("--no-format", action="store_true", help="leave the partitions unformatted")
    p.add_argument("--force", action="store_true", help="overwrite IMAGE if it exists")
    p.add_argument("--backend", choices=BACKENDS, default="qemu",
                   help="how to reach the new disk to format it: qemu (default) or file")
    p.add_argument("--transport", choices=TRANSPORTS, default="auto",
                   help="VirtIO transport for --backend qemu")
    p.set_defaults(handler=run)


def parse_partition(text: str) -> PartitionSpec:
    """``NAME:TYPE:SIZE[:OPTIONS]`` -> PartitionSpec.  Raises UsageError."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise UsageError(f"--partition {text!r}: write NAME:TYPE:SIZE[:OPTIONS], e.g. DH0:FFS:64M")
    name, type_text, size_text = parts[:3]
    try:
        dostype = parse_type(type_text)
    except ValueError:
        raise UsageError(f"--partition {text!r}: unknown filesystem type {type_text!r} (e.g. FFS, FFS+INTL, SFS)") from None
    spec = PartitionSpec(name=name, dostype=dostype, size_bytes=parse_size(size_text, allow_rest=True))
    if len(parts) == 4:
        for opt in filter(None, parts[3].split(",")):
            key, _, value = opt.partition("=")
            try:
                if key == "bootable":
                    spec = replace(spec, bootable=True)
                elif key == "noboot":
                    spec = replace(spec, bootable=False)
                elif key == "noautomount":
                    spec = replace(spec, no_automount=True)
                elif key == "pri":
                    spec = replace(spec, boot_pri=int(value))
                elif key == "bs":
                    bs = int(value)
                    if bs % 512 or bs < 512:
                        raise ValueError
                    spec = replace(spec, sectors_per_block=bs // 512)
                else:
                    raise UsageError(f"--partition {text!r}: unknown option {key!r}")
            except ValueError:
                raise UsageError(f"--partition {text!r}: bad value in {opt!r}") from None
    return spec


def build_plan(args: argparse.Namespace) -> tuple[int, DiskPlan]:
    size = parse_size(args.size)
    assert size is not None
    size -= size % 512
    if size > MAX_IMAGE_BYTES:
        raise UsageError(f"--size {args.size} is larger than the 2 TiB an RDB can address")
    specs = [parse_partition(t) for t in args.partition]
    handler = None
    if args.handler_file:
        try:
            with open(args.handler_file, "rb") as f:
                code = f.read(64 << 20)
        except OSError as exc:
            raise UsageError(f"--handler {args.handler_file}: {exc.strerror}") from None
        try:
            dostype = parse_type(args.handler_dostype) if args.handler_dostype else specs[0].dostype
        except ValueError:
            raise UsageError(f"--handler-dostype {args.handler_dostype!r} is not a DosType") from None
        handler = HandlerSpec(dostype=dostype, code=code, version=version_from_code(code))
    return size, plan_disk(size, specs, handler)


def say(message: str) -> None:
    print(message, flush=True)


def run(args: argparse.Namespace) -> int:
    size, plan = build_plan(args)
    from amigafuse.fs import engine_for

    if not args.no_format:
        missing = [pp.spec for pp in plan.partitions if engine_for(pp.spec.dostype) is None]
        if missing:
            kinds = ", ".join(f"{s.name} ({dostype_to_str(s.dostype)}, {common_name(s.dostype)})" for s in missing)
            raise UsageError(
                f"amigafuse has no filesystem engine to format {kinds}; "
                "use --no-format to create the disk with unformatted partitions"
            )
    if os.path.exists(args.image) and not args.force:
        raise UsageError(f"{args.image} exists; use --force to overwrite it")
    trio.run(create, args.image, size, plan)
    geo = plan.geometry
    say(
        f"created {args.image}: {format_size(size)}, {geo.cylinders} cylinders x {geo.heads} heads x "
        f"{geo.sectors} sectors, RDB in cylinders 0..{plan.rdb_cylinders - 1}"
    )
    for pp in plan.partitions:
        s = pp.spec
        say(
            f"  {s.name}: {dostype_to_str(s.dostype)} ({common_name(s.dostype)}), "
            f"cylinders {pp.low_cyl}..{pp.high_cyl}, {format_size(pp.block_count * geo.block_size)}"
        )
    if not args.no_format:
        trio.run(format_all, args.image, plan, args.backend, args.transport)
    return 0


async def create(path: str, size: int, plan: DiskPlan) -> None:
    try:
        with open(path, "wb") as f:
            f.truncate(size)
    except OSError as exc:
        raise UsageError(f"{path}: cannot create: {exc.strerror}") from None
    dev = FileBlockDevice(path)
    try:
        await write_rdb(dev, plan)
    finally:
        await dev.aclose()


async def format_all(path: str, plan: DiskPlan, backend: str, transport: str) -> None:
    from amigafuse.fs import engine_for

    mounter = Mounter(lambda d: None)
    async with open_units([path], backend=backend, transport=transport) as units:
        (unit,) = units
        layout, anns = await announce_unit(mounter, unit.name, unit.device)
        if layout.errors or len(anns) != len(plan.partitions):
            raise AssertionError(f"the RDB just written does not read back: {[str(e) for e in layout.errors]}")
        for pp, ann in zip(plan.partitions, anns, strict=True):
            s = pp.spec
            engine = engine_for(s.dostype)
            assert engine is not None  # checked before creating the image
            say(f"formatting {s.name} as {dostype_to_str(s.dostype)} ({common_name(s.dostype)}) with the {engine.name} engine...")
            geometry = replace(ann.partition.geometry, dostype=s.dostype)
            await engine.format_volume(ann.open_device(), geometry, s.name)
        await unit.device.flush()
    say("done")
    sys.stdout.flush()
