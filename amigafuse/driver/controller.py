"""The driver's public entry points: a virtio-scsi controller with its disks.

:func:`open_qemu` starts QEMU with one ``scsi-hd`` per image on a virtio-scsi controller,
drives that controller (amigafuse.driver.virtio) and yields a :class:`Controller` whose
``disks`` are :class:`~amigafuse.driver.scsi.disk.ScsiDisk` block devices in target order.
:func:`attach_qemu` does the same for a QEMU that is already running.

Ownership: the context manager owns QEMU (when it started it), the backend, the
transport and every background task (they live in nurseries of those context managers);
leaving it closes the disks first, then the transport, then QEMU.
"""

from __future__ import annotations

import importlib
import os
import shutil
import stat
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from amigafuse.driver.scsi.disk import (
    MAX_SCAN_TARGET,
    ScsiDisk,
    TargetFailure,
    bring_up_target,
    scan_targets,
)
from amigafuse.driver.scsi.transport import ScsiTransport
from amigafuse.errors import DeviceError, DeviceGone, NotAvailable, UsageError

TransportName = Literal["auto", "legacy", "modern"]
MAX_IMAGES = 8
BLOCK_SIZES = (512, 4096)
QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True)
class DiskImage:
    """An image file to attach as one SCSI disk (target = its index in the list).

    ``read_only`` attaches it with ``readonly=on`` (the disk reports write protect);
    ``logical_block_size`` is the sector size the disk reports (512 or 4096);
    ``target`` places it at another SCSI target than its index (0..7, each used once).
    """

    path: str | os.PathLike[str]
    read_only: bool = False
    logical_block_size: int = 512
    target: int | None = None


@dataclass
class Controller:
    """A running virtio-scsi controller and the disks found on it.

    ``failed`` lists the targets that answered but did not come up as disks (their
    INQUIRY, TEST UNIT READY or READ CAPACITY failed), each with its error; the other
    disks are in ``disks`` all the same.

    Hot-plug (when the controller reports events, VIRTIO_SCSI_F_HOTPLUG): a target that
    appears is brought up and added to ``disks`` (or to ``failed``); one that goes away
    is removed from ``disks`` and its ScsiDisk fails every later request with
    DeviceGone (ENODEV).  Each change is described in ``changes`` (oldest first) and
    wakes :meth:`wait_changed`."""

    disks: list[ScsiDisk]
    transport_name: str
    transport: ScsiTransport
    failed: list[TargetFailure] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event, repr=False)

    async def wait_changed(self) -> None:
        """Wait until the next hot-plug change (cancellable)."""
        await self._changed.wait()

    def _record(self, text: str) -> None:
        if len(self.changes) >= 256:
            del self.changes[:128]
        self.changes.append(text)
        self._changed.set()
        self._changed = trio.Event()

    async def _follow_events(self) -> None:
        """Apply the controller's hot-plug events to ``disks``/``failed`` until the
        transport fails or the context ends (runs in the nursery of the context)."""
        next_event = getattr(self.transport, "next_event", None)
        if next_event is None:
            return
        last = min(MAX_SCAN_TARGET, self.transport.max_target)
        while True:
            try:
                event = await next_event()
            except (DeviceError, NotAvailable):
                return  # the controller failed (its callers hear it) or has no events
            if event.missed:
                targets = list(range(last + 1))
            elif (event.plugged or event.unplugged) and event.target <= last:
                targets = [event.target]
            else:
                continue
            for target in targets:
                try:
                    await self._reconcile(target, gone=event.unplugged)
                except DeviceGone:
                    return

    async def _reconcile(self, target: int, *, gone: bool) -> None:
        """Make ``disks``/``failed`` say what is at ``target`` now.

        After the scan only this task (one event at a time) changes ``disks`` and
        ``failed``, so ``present`` is still right after the bring-up's awaits."""
        present = next((d for d in self.disks if d.target == target), None)
        disk: ScsiDisk | None = None
        failure: TargetFailure | None = None
        if not gone:
            try:
                disk = await bring_up_target(self.transport, target)
            except DeviceGone:
                raise
            except DeviceError as exc:
                failure = TargetFailure(target, 0, exc)
        was_failed = any(f.target == target for f in self.failed)
        self.failed = [f for f in self.failed if f.target != target]
        if present is not None and (disk is None or failure is not None):
            present.mark_removed()
            self.disks.remove(present)
            self._record(f"SCSI target {target} LUN 0 was removed")
        elif was_failed and failure is None and disk is None:
            self._record(f"SCSI target {target} LUN 0 (which had failed) was removed")
        if failure is not None:
            self.failed.append(failure)
            self._record(f"SCSI target {target} LUN 0 appeared but failed: {failure.message}")
        elif disk is not None and present is None:
            self.disks.append(disk)
            self.disks.sort(key=lambda d: (d.target, d.lun))
            self._record(f"SCSI target {target} LUN 0 appeared: {disk.info.description}")

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: the transport's (requests, kicks, interrupts... as the VirtIO layer
        names them) and each disk's, keyed ``"target:lun"``."""
        out: dict[str, Any] = {"transport": self.transport_name}
        tstats = getattr(self.transport, "stats", None)
        if tstats is not None:
            out.update(_as_dict(tstats))
        out["disks"] = {
            f"{d.target}:{d.lun}": {
                k: v for k, v in vars(d.stats).items() if k != "unit_attention_codes"
            }
            for d in self.disks
        }
        return out


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return {name: getattr(obj, name) for name in obj.__dataclass_fields__}
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def check_images(images: Sequence[DiskImage]) -> list[DiskImage]:
    """Validate what the user asked to attach; raise UsageError saying what is wrong.

    Pure apart from ``stat``/``access`` on the paths.
    """
    images = list(images)
    if not images:
        raise UsageError("no disk images given: name at least one image file to attach")
    if len(images) > MAX_IMAGES:
        raise UsageError(
            f"{len(images)} disk images given; a virtio-scsi controller here takes at most "
            f"{MAX_IMAGES} (targets 0..7): attach fewer"
        )
    for image in images:
        path = Path(image.path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise UsageError(f"{path}: no such image file") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot use it as a disk image ({exc.strerror})") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UsageError(f"{path}: not a regular file or block device")
        if image.logical_block_size not in BLOCK_SIZES:
            raise UsageError(
                f"{path}: logical block size {image.logical_block_size} is not 512 or 4096"
            )
        if stat.S_ISREG(st.st_mode) and st.st_size < image.logical_block_size:
            raise UsageError(f"{path}: the image is smaller than one block ({st.st_size} bytes)")
        if stat.S_ISREG(st.st_mode) and st.st_size % 512:
            # QEMU would round the disk up and show the tail padded with zeros (and a
            # write there would grow the file).  A partial 4 KiB block of whole 512-byte
            # sectors is fine: a 4K-sector disk leaves it out, as the file backend does.
            raise UsageError(
                f"{path}: size {st.st_size} is not a multiple of 512 bytes; truncate it "
                "(truncate -s -N) or read it with -o backend=file"
            )
        mode = os.R_OK if image.read_only else os.R_OK | os.W_OK
        if not os.access(path, mode):
            need = "read" if image.read_only else "read and write (or attach it read-only)"
            raise UsageError(f"{path}: permission denied: need to {need}")
    return images


def _device_for(transport: TransportName) -> str:
    # A transitional virtio-scsi-pci offers both interfaces; "modern" asks for the
    # non-transitional device (the Pegasos2 case) so nothing legacy is there to find.
    if transport == "modern":
        return "modern"
    return "transitional"


@asynccontextmanager
async def open_qemu(
    images: Sequence[DiskImage],
    *,
    transport: TransportName = "auto",
    queue_depth: int = 16,
) -> AsyncIterator[Controller]:
    """Start QEMU with ``images`` as SCSI targets 0..n-1 and yield the :class:`Controller`.

    Raises UsageError (bad image list: more than 8, missing, wrong size or permissions),
    NotAvailable (QEMU not installed), DeviceError subclasses when the controller does
    not come up, DeviceGone when QEMU dies.  A disk that does not come up is left out of
    ``disks`` and named in ``failed``.  Leaving the context stops QEMU.
    """
    checked = check_images(images)
    if transport not in ("auto", "legacy", "modern"):
        raise UsageError(f"unknown transport {transport!r}: use auto, legacy or modern")
    if shutil.which(QEMU_BINARY) is None:
        raise NotAvailable(
            f"{QEMU_BINARY} not found: install QEMU (Debian: apt-get install qemu-system-x86)"
        )
    qtest = _driver_module("backends.qtest", "the QEMU (qtest) backend")
    QemuDisk, launch_qemu = qtest.QemuDisk, qtest.launch_qemu

    disks = [
        QemuDisk(
            path=str(image.path),
            read_only=image.read_only,
            logical_block_size=image.logical_block_size,
            target=image.target,
        )
        for image in checked
    ]
    async with (
        launch_qemu(disks, device=_device_for(transport)) as backend,
        open_controller(backend, transport=transport, queue_depth=queue_depth) as controller,
    ):
        yield controller


@asynccontextmanager
async def attach_qemu(
    socket_path: str | os.PathLike[str],
    shm_path: str | os.PathLike[str],
    *,
    transport: TransportName = "auto",
    queue_depth: int = 16,
) -> AsyncIterator[Controller]:
    """Drive the virtio-scsi controller of a QEMU that is already running with
    ``-qtest unix:SOCKET`` and its RAM in ``SHM`` (see docs/driver.md for the command
    line).  Leaving the context detaches; QEMU keeps running.

    Raises UsageError for a bad transport name, NotAvailable/DeviceGone when the socket
    or memory file cannot be used, DeviceErrors when the controller does not come up
    (a disk that does not is named in ``failed``).
    """
    if transport not in ("auto", "legacy", "modern"):
        raise UsageError(f"unknown transport {transport!r}: use auto, legacy or modern")
    attach = _driver_module("backends.qtest", "the QEMU (qtest) backend").attach_qtest

    async with (
        attach(str(socket_path), str(shm_path)) as backend,
        open_controller(backend, transport=transport, queue_depth=queue_depth) as controller,
    ):
        yield controller


@asynccontextmanager
async def open_controller(
    backend: Any, *, transport: TransportName = "auto", queue_depth: int = 16
) -> AsyncIterator[Controller]:
    """The virtio-scsi controller on ``backend`` (any backend: qtest, VFIO), scanned.

    Owns the transport (and its background tasks) for the duration of the context;
    the caller owns the backend.
    """
    open_virtio_scsi = _driver_module("virtio.scsi", "the VirtIO layer").open_virtio_scsi

    async with (
        open_virtio_scsi(backend, transport=transport, queue_depth=queue_depth) as scsi,
        _controller(scsi, _transport_name(scsi, transport)) as controller,
    ):
        yield controller


def _driver_module(name: str, what: str) -> Any:
    """Import ``amigafuse.driver.<name>``; NotAvailable (with the reason) if this build
    lacks it."""
    try:
        return importlib.import_module(f"amigafuse.driver.{name}")
    except ImportError as exc:
        raise NotAvailable(f"{what} is not available in this build ({exc})") from None


def _transport_name(scsi: Any, requested: str) -> str:
    for attr in ("transport_kind", "transport_name", "name", "kind"):
        value = getattr(scsi, attr, None)
        if isinstance(value, str):
            return value
    return requested


@asynccontextmanager
async def _controller(scsi: ScsiTransport, name: str) -> AsyncIterator[Controller]:
    found = await scan_targets(scsi)
    controller = Controller(
        disks=found.disks, transport_name=name, transport=scsi, failed=found.failed
    )
    # The hot-plug follower lives in this nursery; the body's exception is re-raised
    # outside it (not in an ExceptionGroup).
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(controller._follow_events)
            try:
                yield controller
            except BaseException as exc:
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        for disk in controller.disks:
            await disk.aclose()
    if body_error is not None:
        raise body_error


@asynccontextmanager
async def open_transport(scsi: ScsiTransport, *, name: str = "custom") -> AsyncIterator[Controller]:
    """A :class:`Controller` over an already open transport (scan included)."""
    async with _controller(scsi, name) as controller:
        yield controller
