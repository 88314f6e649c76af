"""``amigafuse mount``: mount the partitions of Amiga disks as one FUSE filesystem.

Wiring (the only place it happens): units (driver disks or image files) -> RDB scan ->
one PartitionDevice per mountable partition -> ``fs.engine_for(dostype).open_volume`` ->
``fuse.ops.AmigaOperations`` -> ``fuse.session.serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import logging.handlers
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from amigafuse.amiga.dostype import common_name, dostype_to_str
from amigafuse.blockdev.base import BlockDevice
from amigafuse.blockdev.file import FileBlockDevice
from amigafuse.blockdev.window import PartitionDevice
from amigafuse.errors import AmigaFuseError, NotAvailable, UsageError
from amigafuse.fs import engine_for
from amigafuse.fuse.options import KNOWN_HELP, MountOptions, parse_options

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
    vfio = [s for s in sources if s.startswith("vfio:")]
    if vfio:
        if len(sources) != 1:
            raise UsageError("a vfio:BDF source is a whole controller: give it alone")
        if options.backend == "file":
            raise UsageError("backend=file reads image files; a vfio:BDF source needs the driver")
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
            _setup_logging(plan.debug, daemon=True)

        return _child(plan, live, fail)

    return daemonize(child)


def _setup_logging(debug: bool, *, daemon: bool) -> None:
    root = logging.getLogger("amigafuse")
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if daemon and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("amigafuse[%(process)d]: %(message)s"))
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


# --------------------------------------------------------------------------- units


@asynccontextmanager
async def open_units(
    sources: list[str], options: MountOptions
) -> AsyncIterator[list[tuple[str, BlockDevice]]]:
    """(name, BlockDevice) per disk: one per image SOURCE, or every disk of a ``vfio:BDF``
    controller (named ``vfio:BDF#target``)."""
    transport: Any = options.transport or "auto"  # validated by parse_options
    if sources and sources[0].startswith("vfio:"):
        try:  # imported by name: the driver may be absent from a build
            open_vfio = importlib.import_module("amigafuse.driver.backends.vfio").open_vfio
        except (ImportError, AttributeError):
            raise NotAvailable("the VFIO backend is not available in this build") from None
        bdf = sources[0].removeprefix("vfio:")
        async with open_vfio(bdf, transport=transport) as controller:
            yield [(f"vfio:{bdf}#{getattr(d, 'target', i)}", d) for i, d in enumerate(controller.disks)]
        return
    if options.backend == "file":
        devices: list[BlockDevice] = []
        try:
            for src in sources:
                devices.append(FileBlockDevice(src, read_only=options.read_only))
            yield list(zip(sources, devices, strict=True))
        finally:
            for dev in devices:
                with contextlib.suppress(Exception):
                    close = getattr(dev, "close", None)
                    if close is not None:
                        result = close()
                        if hasattr(result, "__await__"):
                            await result
        return
    try:
        controller_module = importlib.import_module("amigafuse.driver.controller")
        DiskImage, open_qemu = controller_module.DiskImage, controller_module.open_qemu
    except (ImportError, AttributeError):
        raise NotAvailable(
            "the QEMU driver backend is not available in this build; "
            "mount with -o backend=file to read the image file directly"
        ) from None
    images = [DiskImage(path=src, read_only=options.read_only) for src in sources]
    async with open_qemu(images, transport=transport) as controller:
        disks: list[BlockDevice] = list(controller.disks)
        if len(disks) != len(sources):
            raise NotAvailable(
                f"the controller shows {len(disks)} disks for {len(sources)} images; "
                "try -o backend=file"
            )
        yield list(zip(sources, disks, strict=True))


# --------------------------------------------------------------------------- mounting


async def _mount_and_serve(plan: Plan, ready: Callable[[], None] | None) -> list[str]:
    from amigafuse.fuse.ops import AmigaOperations, MountedVolume
    from amigafuse.fuse.session import PartitionLocks, serve
    from amigafuse.rdb.scan import scan_device

    opts = plan.options
    locks = PartitionLocks()
    volumes: list[MountedVolume] = []
    try:
        async with open_units(plan.sources, opts) as devices:
            available: list[str] = []
            bare = False
            for src, device in devices:
                layout = await scan_device(device)
                if layout.kind == "none":
                    _say(f"{src}: no RDB and no Amiga volume found; nothing to mount from it")
                    continue
                bare = bare or layout.kind == "bare"
                for problem in layout.problems:
                    if problem.severity == "error":
                        _say(f"{src}: {problem.message}")
                for part in layout.partitions:
                    # A hostile RDB may name a device "/", "..", or with NULs: keep it showable.
                    name = part.drive_name.replace("/", "_").replace("\0", "")
                    if name in ("", ".", ".."):
                        name = f"P{part.index}"
                    available.append(name)
                    if opts.partition is not None and name.upper() != opts.partition.upper():
                        continue
                    what = f"{src} {name} ({dostype_to_str(part.dostype)}, {common_name(part.dostype)})"
                    if part.issues:
                        _say(f"{what}: not mounted: {'; '.join(part.issues)}")
                        continue
                    if part.no_automount and opts.partition is None:
                        _say(f"{what}: marked not to be mounted automatically; use -o partition={name}")
                        continue
                    engine = engine_for(part.dostype)
                    if engine is None:
                        _say(f"{what}: no filesystem engine for this DosType; not shown")
                        continue
                    read_only = opts.read_only or device.read_only
                    locks.acquire(src, name, exclusive=not read_only, mountpoint=plan.mountpoint)
                    window = PartitionDevice(device, part.first_lba, part.block_count, read_only=read_only)
                    try:
                        volume = await engine.open_volume(window, part.geometry, read_only)
                    except AmigaFuseError as exc:
                        if opts.partition is not None:
                            raise
                        _say(f"{what}: cannot be mounted: {exc.message}")
                        continue
                    notes = list(volume.info.notes)
                    effective_ro = read_only or volume.info.read_only
                    if effective_ro and not opts.read_only:
                        why = "; ".join(notes) or (
                            "the image is read-only" if device.read_only else "the engine cannot write it"
                        )
                        _say(f"{what}: mounted read-only: {why}")
                    unique = name
                    taken = {v.name.upper() for v in volumes}
                    n = 1
                    while unique.upper() in taken:
                        unique = f"{name}.{n}"
                        n += 1
                    volumes.append(MountedVolume(unique, volume, effective_ro, notes))
            if opts.partition is not None and not volumes:
                raise UsageError(
                    f"no mountable partition {opts.partition!r}; the disks have: "
                    f"{', '.join(available) or 'none'}"
                )
            if not volumes:
                raise UsageError("nothing to mount: no partition with a supported filesystem was found")
            single = opts.partition is not None or (bare and len(volumes) == 1 and len(devices) == 1)
            ops = AmigaOperations(volumes, opts, single=single, mountpoint=plan.mountpoint)
            source_name = plan.sources[0] if len(plan.sources) == 1 else ",".join(plan.sources)
            fuse_options = opts.fuse_options(source_name)
            if all(v.read_only for v in volumes):
                fuse_options.add("ro")
            volumes_to_close = volumes
            volumes = []  # serve() closes them from here on
            del volumes_to_close
            return await serve(ops, plan.mountpoint, fuse_options,
                               read_ahead_kb=opts.read_ahead_kb, on_ready=ready)
    finally:
        with trio.CancelScope(shield=True):
            for mv in volumes:  # opened, but never served: close them here
                with contextlib.suppress(Exception):
                    await mv.volume.close()
        locks.release()


def _say(message: str) -> None:
    print(f"amigafuse mount: {message}", file=sys.stderr, flush=True)
