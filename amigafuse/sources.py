"""Open the SOURCE arguments of the commands as units (one BlockDevice per disk).

A SOURCE is one of:

* an image file (``disk.hdf``, ``floppy.adf``): by default attached to a QEMU virtio-scsi
  controller that amigafuse drives itself (``--backend qemu``, one SCSI target per image,
  in the order given); with ``--backend file`` read and written directly, without QEMU;
* ``qemu:SOCKET,SHM``: every disk of a QEMU that is already running with
  ``-qtest unix:SOCKET`` and its RAM in the file SHM (docs/driver.md);
* ``vfio:BDF``: every disk of a virtio-scsi PCI controller bound to vfio-pci.

An image file whose mode has no write bit (0444) is opened read-only even for root.
Image files may be combined; ``qemu:`` and ``vfio:`` stand alone.  Also the size helpers
the commands share (``64M``, ``1G``, ``rest``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from amigafuse.blockdev.base import BlockDevice, DeviceInfo
from amigafuse.blockdev.file import FileBlockDevice
from amigafuse.errors import DeviceError, NotAvailable, UsageError

Backend = Literal["qemu", "file"]
BACKENDS: tuple[str, ...] = ("qemu", "file")
TRANSPORTS: tuple[str, ...] = ("auto", "legacy", "modern")


@dataclass(frozen=True)
class Unit:
    """One disk: ``name`` to show (the image path, or ``qemu:...#T`` / ``vfio:BDF#T``),
    the SOURCE it came from, its BlockDevice and what it says about itself."""

    name: str
    source: str
    device: BlockDevice = field(repr=False)
    info: DeviceInfo
    backend: str


def _driver(name: str, what: str) -> Any:
    try:
        return importlib.import_module(f"amigafuse.driver.{name}")
    except ImportError:
        raise NotAvailable(f"{what} is not available in this build; use --backend file") from None


def write_protected(path: str) -> bool:
    """True when no one may write the image file (mode without any w bit).

    Root's open(O_RDWR) ignores mode bits; a 0444 image is treated as a write-protected
    disk all the same, so root cannot damage it by accident."""
    try:
        return os.stat(path).st_mode & 0o222 == 0
    except OSError:
        return False


def _check_sources(sources: Sequence[str]) -> None:
    if not sources:
        raise UsageError("no SOURCE given: name an image file (or qemu:SOCKET,SHM / vfio:BDF)")
    special = [s for s in sources if s.startswith(("qemu:", "vfio:"))]
    if special and len(sources) > 1:
        raise UsageError(f"{special[0]} stands alone: it brings all of its controller's disks")


def check_arguments(sources: Sequence[str], backend: str, transport: str) -> None:
    """Raise UsageError for SOURCE lists, backends or transports ``open_units`` refuses."""
    _check_sources(sources)
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: use qemu or file")
    if transport not in TRANSPORTS:
        raise UsageError(f"unknown transport {transport!r}: use auto, legacy or modern")


@asynccontextmanager
async def open_units(
    sources: Sequence[str],
    *,
    backend: str = "qemu",
    transport: str = "auto",
    read_only: bool = False,
) -> AsyncIterator[list[Unit]]:
    """Yield the units of ``sources`` (see the module docstring); close them on exit.

    Raises UsageError (bad SOURCE, backend or transport; missing image), NotAvailable
    (QEMU/VFIO missing), DeviceError subclasses when a disk does not come up.
    Cancellation: the driver's context managers own QEMU and their tasks and stop them
    on any exit."""
    check_arguments(sources, backend, transport)
    first = sources[0]
    if first.startswith("vfio:"):
        bdf = first.removeprefix("vfio:")
        open_vfio = _driver("backends.vfio", "the VFIO backend").open_vfio
        async with open_vfio(bdf, transport=transport) as controller:
            yield [_scsi_unit(f"vfio:{bdf}", d, i, "vfio") for i, d in enumerate(controller.disks)]
        return
    if first.startswith("qemu:"):
        socket_path, sep, shm_path = first.removeprefix("qemu:").partition(",")
        if not sep or not socket_path or not shm_path:
            raise UsageError(f"{first}: write qemu:SOCKET,SHM (the qtest socket and the RAM file)")
        attach_qemu = _driver("controller", "the QEMU backend").attach_qemu
        async with attach_qemu(socket_path, shm_path, transport=transport) as controller:
            yield [_scsi_unit(first, d, i, "qemu") for i, d in enumerate(controller.disks)]
        return
    if backend == "file":
        devices: list[FileBlockDevice] = []
        try:
            for src in sources:
                devices.append(FileBlockDevice(src, read_only=read_only or write_protected(src)))
            yield [Unit(src, src, d, d.info, "file") for src, d in zip(sources, devices, strict=True)]
        finally:
            for d in devices:
                with contextlib.suppress(Exception):
                    await d.aclose()
        return
    controller_mod = _driver("controller", "the QEMU backend")
    images = [
        controller_mod.DiskImage(path=src, read_only=read_only or write_protected(src))
        for src in sources
    ]
    async with controller_mod.open_qemu(images, transport=transport) as controller:
        by_target = {getattr(d, "target", i): d for i, d in enumerate(controller.disks)}
        units = []
        for target, src in enumerate(sources):
            disk = by_target.get(target)
            if disk is None:
                failure = next((f for f in controller.failed if f.target == target), None)
                if failure is not None:
                    raise DeviceError(
                        f"{src}: the disk at SCSI target {target} did not come up: "
                        f"{failure.message} (is the image readable and not empty? "
                        "`amigafuse list` shows every target)",
                        errno=failure.error.errno,
                    ) from failure.error
                raise NotAvailable(
                    f"{src}: QEMU's controller shows no disk at target {target}; "
                    "try --backend file"
                )
            units.append(Unit(src, src, disk, disk.info, "qemu"))
        yield units


def _scsi_unit(prefix: str, disk: Any, index: int, backend: str) -> Unit:
    target = getattr(disk, "target", index)
    name = f"{prefix}#{target}"
    return Unit(name, prefix, disk, disk.info, backend)


# --------------------------------------------------------------------------- sizes


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, *, allow_rest: bool = False) -> int | None:
    """``"64M"``/``"64MiB"`` -> 67108864 (binary units, as HDToolBox); a bare number is
    bytes; ``"rest"`` -> None when ``allow_rest``.  Raises UsageError otherwise."""
    t = text.strip()
    if t.lower() == "rest":
        if allow_rest:
            return None
        raise UsageError("'rest' is only allowed as the size of the last partition")
    m = _SIZE_RE.match(t)
    if not m:
        raise UsageError(f"not a size: {text!r} (write e.g. 512K, 64M, 1G or a number of bytes)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return int(value)


def format_size(size_bytes: int) -> str:
    """Human size with binary units: ``3.0 MiB``."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size_bytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
