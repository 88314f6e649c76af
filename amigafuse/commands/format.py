"""``amigafuse format``: write an empty filesystem into one partition."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import trio

from amigafuse.amiga.dostype import common_name, dostype_to_str, parse_type
from amigafuse.commands.list import add_source_options
from amigafuse.errors import UsageError
from amigafuse.rdb.blocks import PartitionBlock, checksum_ok
from amigafuse.rdb.mounter import Announcement, Mounter, announce_unit, select_partition
from amigafuse.sources import Unit, format_size, open_units


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "format",
        help="format one partition (erases it)",
        description=(
            "Write an empty filesystem of --type into a partition of SOURCE, erasing what it "
            "held. On an RDB disk the partition's DosType in its PART block is set to --type "
            "too. --partition may be left out when SOURCE has exactly one partition."
        ),
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--partition", metavar="NAME", help="DOS name of the partition (see 'amigafuse list')")
    p.add_argument("--type", required=True, metavar="TYPE",
                   help="filesystem: OFS, FFS, FFS+INTL, FFS+DC, FFS+LNFS, SFS, SFS2, DOS3...")
    p.add_argument("--label", required=True, metavar="LABEL", help="volume name")
    add_source_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        dostype = parse_type(args.type)
    except ValueError:
        raise UsageError(f"--type {args.type!r} is not a filesystem type (e.g. FFS+INTL, SFS)") from None
    from amigafuse.fs import engine_for

    engine = engine_for(dostype)
    if engine is None:
        raise UsageError(f"amigafuse has no filesystem engine for {dostype_to_str(dostype)} ({common_name(dostype)})")
    if not args.label or len(args.label) > 30 or any(c in args.label for c in ":/"):
        raise UsageError(f"--label {args.label!r}: 1..30 characters, no ':' or '/'")
    trio.run(do_format, args, dostype)
    return 0


async def set_part_dostype(unit: Unit, ann: Announcement, dostype: int) -> bool:
    """Rewrite the PART block's de_DosType (re-checksummed).  False for a bare volume or
    when the PART already says ``dostype``."""
    p = ann.partition
    if p.part is None or p.part_block is None or p.part.pb_Environment.de_DosType == dostype:
        return False
    if p.part.pb_Environment.de_TableSize < 16:
        return False  # no de_DosType in this DosEnvec; the volume's block 0 says it
    dev = unit.device
    raw = await dev.read(p.part_block, 1)
    if raw[:4] != b"PART" or not checksum_ok(raw):
        raise UsageError(f"the PART block of {ann.dos_name} changed on disk; run 'amigafuse list' again")
    part = PartitionBlock.unpack(raw)
    part = replace(part, pb_Environment=replace(part.pb_Environment, de_DosType=dostype)).seal()
    await dev.write(p.part_block, part.pack())
    return True


async def do_format(args: argparse.Namespace, dostype: int) -> None:
    from amigafuse.fs import engine_for

    engine = engine_for(dostype)
    assert engine is not None
    mounter = Mounter(lambda d: None)
    async with open_units([args.source], backend=args.backend, transport=args.transport) as units:
        anns: list[tuple[Unit, Announcement]] = []
        for unit in units:
            _, found = await announce_unit(mounter, unit.name, unit.device)
            anns.extend((unit, a) for a in found)
        ann = select_partition([a for _, a in anns], args.partition, args.source)
        unit = next(u for u, a in anns if a is ann)
        if ann.partition.issues:
            raise UsageError(f"{ann.dos_name} must not be written: {'; '.join(ann.partition.issues)}")
        if unit.device.read_only:
            raise UsageError(f"{unit.name} is read-only")
        print(
            f"formatting {ann.dos_name} ({format_size(ann.size_bytes)}) as {dostype_to_str(dostype)} "
            f"({common_name(dostype)}), label {args.label!r}, with the {engine.name} engine...",
            flush=True,
        )
        geometry = replace(ann.partition.geometry, dostype=dostype)
        await engine.format_volume(ann.open_device(), geometry, args.label)
        if await set_part_dostype(unit, ann, dostype):
            print(f"PART block of {ann.dos_name} now says {dostype_to_str(dostype)}")
        await unit.device.flush()
    print("done")
