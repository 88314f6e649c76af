"""``amigafuse mount``: mount the partitions of Amiga disks as one FUSE filesystem.

Wiring (the only place it happens): units (driver disks or image files) -> RDB scan ->
one PartitionDevice per mountable partition -> ``fs.engine_for(dostype).open_volume`` ->
``fuse.ops.AmigaOperations`` -> ``fuse.session.serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from amigafuse.amiga.dostype import common_name, dostype_to_str
from amigafuse.errors import AmigaFuseError, UsageError
from amigafuse.fs import Engine, engine_for
from amigafuse.fuse.options import KNOWN_HELP, MountOptions, parse_options

if TYPE_CHECKING:
    from amigafuse.rdb.mounter import Announcement

MAX_UNITS = 8

log = logging.getLogger("amigafuse.mount")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "mount",
        usage="amigafuse mount [-h] [-o OPTIONS] [-f] [-d] SOURCE... MOUNTPOINT",
        help="mount the partitions of Amiga disk images (or one partition) with FUSE",
        description=(
            "Mount every mountable partition of the SOURCE disks under MOUNTPOINT, one "
            "directory per partition named by its DOS device name (DH0, DH1, ...), or with "
            "-o partition=NAME one partition at MOUNTPOINT itself. A bare volume (ADF floppy, "
            "hardfile without RDB) is mounted at MOUNTPOINT itself. Each SOURCE is an image "
            f"file, attached as one SCSI target (up to {MAX_UNITS}) of a virtio-scsi "
            "controller in a QEMU that amigafuse drives, or read directly with -o backend=file; "
            "or vfio:BDF alone, a PCI virtio-scsi controller bound with bind-vfio. "
            "The command returns once the mount is live and keeps serving it in the "
            "background; 'amigafuse umount MOUNTPOINT' flushes, marks volumes clean and "
            "unmounts."
        ),
        epilog=f"Options for -o: {KNOWN_HELP}; ignored: defaults, auto, noauto, nofail, user, "
        "users, _netdev, x-*, comment=. See amigafuse(1) and mount.amigafuse(8).",
    )
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated mount options (may be repeated)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (do not daemonize); Ctrl-C unmounts")
    p.add_argument("-d", "--debug-fuse", action="store_true",
                   help="log every filesystem operation to stderr (implies -f)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="disk images, then the directory to mount on")
    p.set_defaults(handler=run)


@dataclass
class Plan:
    sources: list[str]
    mountpoint: str
    options: MountOptions
    foreground: bool
    debug: bool


def make_plan(args: argparse.Namespace) -> Plan:
    if len(args.paths) < 2:
        raise UsageError("give at least one SOURCE and the MOUNTPOINT")
    sources, mountpoint = list(args.paths[:-1]), args.paths[-1]
    if len(sources) > MAX_UNITS:
        raise UsageError(f"at most {MAX_UNITS} disks per controller; got {len(sources)}")
    options = parse_options(args.options)
    special = [s for s in sources if s.startswith(("vfio:", "qemu:"))]
    if special:
        if len(sources) != 1:
            raise UsageError(f"{special[0]} is a whole controller: give it alone")
        if options.backend == "file":
            raise UsageError(f"backend=file reads image files; {special[0]} needs the driver")
        if not os.path.isdir(mountpoint):
            raise UsageError(f"{mountpoint}: the mount point must be an existing directory")
        return Plan(sources, os.path.abspath(mountpoint), options,
                    args.foreground or args.debug_fuse, args.debug_fuse)
    for src in sources:
        if not os.path.exists(src):
            raise UsageError(f"{src}: no such image file")
        if os.path.isdir(src):
            raise UsageError(f"{src}: is a directory, not a disk image")
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: the mount point must be an existing directory")
    return Plan([os.path.abspath(s) for s in sources], os.path.abspath(mountpoint), options,
                args.foreground or args.debug_fuse, args.debug_fuse)


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    from amigafuse.fuse.session import check_fuse_available, daemonize

    check_fuse_available()
    if plan.foreground:
        _setup_logging(plan.debug, daemon=False)
        return _child(plan, None, lambda message: print(message, file=sys.stderr))

    def child(ready: Callable[[], None], fail: Callable[[str], None]) -> int:
        def live() -> None:
            ready()  # the parent exits 0 now; stdio goes to /dev/null
            _setup_logging(plan.debug, daemon=True, mountpoint=plan.mountpoint)

        return _child(plan, live, fail)

    return daemonize(child)


def _setup_logging(debug: bool, *, daemon: bool, mountpoint: str = "") -> None:
    """stderr in the foreground; a daemon logs to syslog, or without one to
    RUN_DIR/mount-<hash>.log (the pid file's name with .log)."""
    root = logging.getLogger("amigafuse")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if daemon and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("amigafuse[%(process)d]: %(message)s"))
    elif daemon:
        from amigafuse.fuse.session import pid_file

        try:
            handler = logging.FileHandler(pid_file(mountpoint).with_suffix(".log"))
        except OSError:
            handler = logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s amigafuse[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("amigafuse: %(message)s"))
    root.handlers[:] = [handler]


def _child(plan: Plan, ready: Callable[[], None] | None, fail: Callable[[str], None]) -> int:
    """The serving process.  Returns the exit status."""
    if ready is not None:
        _setup_logging(plan.debug, daemon=False)
    try:
        problems = trio.run(_mount_and_serve, plan, ready)
    except AmigaFuseError as exc:
        fail(f"amigafuse mount: {exc.message}")
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        return 130
    for problem in problems:
        log.error("closing %s", problem)
    return 1 if problems else 0


# --------------------------------------------------------------------------- mounting


def _lock_key(unit: Any, first_lba: int) -> tuple[str, str]:
    """(file, partition) for the lock: the image itself (so another path to the same file
    still collides) and where the partition starts."""
    return (unit.source if unit.backend in ("file", "qemu") and not unit.source.startswith("qemu:")
            else unit.name, f"lba{first_lba}")


async def _mount_and_serve(plan: Plan, ready: Callable[[], None] | None) -> list[str]:
    from amigafuse.fuse.ops import AmigaOperations, MountedVolume
    from amigafuse.fuse.session import PartitionLocks, serve
    from amigafuse.rdb.mounter import Mounter, announce_unit
    from amigafuse.sources import open_units

    def engine_name(dostype: int) -> str | None:
        engine = engine_for(dostype)
        return engine.name if engine is not None else None

    opts = plan.options
    locks = PartitionLocks()
    volumes: list[MountedVolume] = []
    mounter = Mounter(engine_name)
    try:
        async with open_units(plan.sources, backend=opts.backend, transport=opts.transport or "auto",
                              read_only=opts.read_only) as units:
            available: list[str] = []
            bare = False
            for unit in units:
                layout, announcements = await announce_unit(mounter, unit.name, unit.device)
                if layout.kind == "none":
                    _say(f"{unit.name}: no RDB and no Amiga volume found; nothing to mount from it")
                    continue
                bare = bare or layout.kind == "bare"
                for problem in layout.problems:
                    if problem.severity == "error":
                        _say(f"{unit.name}: {problem.message}")
                for ann in announcements:
                    name = ann.dos_name
                    available.append(name)
                    if opts.partition is not None and name.upper() != opts.partition.upper():
                        continue
                    dostype = ann.volume_dostype if ann.volume_dostype is not None else ann.part_dostype
                    what = f"{unit.name} {name} ({dostype_to_str(dostype)}, {common_name(dostype)})"
                    if not ann.mountable:
                        _say(f"{what}: not mounted: {ann.reason}")
                        continue
                    if not ann.automount and opts.partition is None:
                        _say(f"{what}: not mounted: {ann.reason}; use -o partition={name}")
                        continue
                    engine = engine_for(ann.geometry.dostype)
                    assert engine is not None  # the mounter only calls it mountable with one
                    read_only = opts.read_only or unit.device.read_only
                    image, key = _lock_key(unit, ann.partition.first_lba)
                    locks.acquire(image, key, exclusive=not read_only, mountpoint=plan.mountpoint,
                                  shown=name)
                    check_notes: list[str] = []
                    if opts.check and not read_only:
                        check_notes = await _check_before_rw(engine, ann, what)
                        read_only = bool(check_notes)
                    window = ann.open_device(read_only=read_only)
                    try:
                        volume = await engine.open_volume(window, ann.geometry, read_only)
                    except AmigaFuseError as exc:
                        if opts.partition is not None:
                            raise
                        _say(f"{what}: cannot be mounted: {exc.message}")
                        continue
                    notes = check_notes + list(volume.info.notes)
                    effective_ro = read_only or volume.info.read_only
                    if effective_ro and not opts.read_only:
                        why = "; ".join(notes) or (
                            "the image is read-only" if unit.device.read_only else "the engine cannot write it"
                        )
                        _say(f"{what}: mounted read-only: {why}")
                    volumes.append(MountedVolume(name, volume, effective_ro, notes))
            if opts.partition is not None and not volumes:
                raise UsageError(
                    f"no mountable partition {opts.partition!r}; the disks have: "
                    f"{', '.join(available) or 'none'}"
                )
            if not volumes:
                raise UsageError("nothing to mount: no partition with a supported filesystem was found")
            single = opts.partition is not None or (bare and len(volumes) == 1 and len(units) == 1)
            ops = AmigaOperations(volumes, opts, single=single, mountpoint=plan.mountpoint)
            source_name = plan.sources[0] if len(plan.sources) == 1 else ",".join(plan.sources)
            fuse_options = opts.fuse_options(source_name)
            if all(v.read_only for v in volumes):
                fuse_options.add("ro")
            volumes = []  # serve() closes them from here on
            return await serve(ops, plan.mountpoint, fuse_options,
                               read_ahead_kb=opts.read_ahead_kb, max_background=opts.max_background,
                               commit_s=opts.commit_s,
                               on_ready=ready)
    finally:
        with trio.CancelScope(shield=True):
            for mv in volumes:  # opened, but never served: close them here
                with contextlib.suppress(Exception):
                    await mv.volume.close()
        locks.release()


async def _check_before_rw(engine: Engine, ann: Announcement, what: str) -> list[str]:
    """``-o check``: the engine's whole-filesystem check, read-only, before a read-write
    mount.  Returns the notes that make the partition mount read-only (empty when the
    check found no errors; warnings alone do not)."""
    _say(f"{what}: checking the whole filesystem before mounting it read-write (-o check)")
    try:
        report = await engine.check_volume(ann.open_device(read_only=True), ann.geometry, False)
    except AmigaFuseError as exc:
        return [f"-o check could not walk the filesystem ({exc.message}); "
                f"run 'amigafuse check --partition {ann.dos_name}' for details"]
    if not report.errors:
        return []
    more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
    return [f"-o check found {len(report.errors)} error(s): {report.errors[0]}{more}; "
            f"see 'amigafuse check --partition {ann.dos_name}', which can --repair what is safe"]


def _say(message: str) -> None:
    print(f"amigafuse mount: {message}", file=sys.stderr, flush=True)
