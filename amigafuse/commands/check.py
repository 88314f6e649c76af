"""``amigafuse check``: check (and with --repair, repair) the filesystem of one partition."""

from __future__ import annotations

import argparse
from typing import Any

import trio

from amigafuse.amiga.dostype import common_name, dostype_to_str
from amigafuse.commands.list import add_source_options, engine_name
from amigafuse.errors import UsageError
from amigafuse.fs import CheckReport
from amigafuse.rdb.mounter import Mounter, announce_unit, select_partition
from amigafuse.sources import open_units


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "check",
        help="check a partition's filesystem (exit 0 only when clean)",
        description=(
            "Check the filesystem in a partition of SOURCE and print what was found. "
            "Exit status 0 when it is clean, 1 when errors remain. --repair fixes what the "
            "engine can fix (the disk is written). --partition may be left out when SOURCE "
            "has exactly one partition."
        ),
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--partition", metavar="NAME", help="DOS name of the partition (see 'amigafuse list')")
    p.add_argument("--repair", action="store_true", help="repair what can be repaired")
    add_source_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    report: CheckReport = trio.run(do_check, args)
    for e in report.errors:
        print(f"error: {e}")
    for w in report.warnings:
        print(f"warning: {w}")
    for r in report.repaired:
        print(f"repaired: {r}")
    if report.stats:
        print("stats: " + ", ".join(f"{k}={v}" for k, v in sorted(report.stats.items())))
    print("clean" if report.clean else f"NOT clean: {len(report.errors)} error(s)")
    return 0 if report.clean else 1


async def do_check(args: argparse.Namespace) -> CheckReport:
    from amigafuse.fs import engine_for

    mounter = Mounter(engine_name)
    async with open_units(
        [args.source], backend=args.backend, transport=args.transport, read_only=not args.repair
    ) as units:
        anns = []
        for unit in units:
            _, found = await announce_unit(mounter, unit.name, unit.device)
            anns.extend(found)
        ann = select_partition(anns, args.partition, args.source)
        if ann.partition.issues:
            raise UsageError(f"{ann.dos_name} cannot be checked: {'; '.join(ann.partition.issues)}")
        vol = ann.volume_dostype
        engine = engine_for(vol) if vol is not None else None
        if engine is None:
            raise UsageError(f"{ann.dos_name}: {ann.reason or 'no engine'}")
        print(
            f"checking {ann.dos_name}: {dostype_to_str(vol or 0)} ({common_name(vol or 0)}) with the "
            f"{engine.name} engine{' (repairing)' if args.repair else ''}",
            flush=True,
        )
        report = await engine.check_volume(ann.open_device(read_only=not args.repair), ann.geometry, args.repair)
        if args.repair:
            await ann.open_device().flush()
        return report
