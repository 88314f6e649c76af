"""SCSI direct-access disks as :class:`~amigafuse.blockdev.base.BlockDevice` s.

A :class:`ScsiDisk` drives one target/LUN through a
:class:`~amigafuse.driver.scsi.transport.ScsiTransport`.  It never sees virtqueues, PCI
or backends.  :func:`scan` finds the disks on a controller.

Design notes (invariants):

* One path for every command: :meth:`ScsiDisk.execute` sends the CDB, judges the
  completion with the pure :func:`~amigafuse.driver.scsi.sense.classify` and retries
  what is retryable (UNIT ATTENTION on any command — the first command to each LUN gets
  29/00 — BUSY, RESET, NOT READY 04/01) a bounded number of times.  No other code calls
  the transport for this disk.
* The disk holds no lock across an ``await``: its only shared mutable state is counters
  (updated between awaits, so atomic under trio), ``_gone`` (set once, never cleared)
  and the capacity, which :meth:`refresh_capacity` replaces under ``_capacity_lock``.
  Ordering between concurrent requests is the caller's business (BlockDevice contract);
  the transport bounds the number in flight.
* Requests larger than the transport's maximum transfer are split into chunks issued by
  at most ``MAX_IN_FLIGHT`` worker tasks in a nursery owned by the request; the first
  device error cancels the other chunks and is raised as itself (no exception groups).
* Once the transport reported :class:`~amigafuse.errors.DeviceGone`, every later
  request fails at once with the same error: a dead QEMU never costs a timeout twice.
* Cancellation: a cancelled request may or may not have reached the medium; the
  transport keeps its DMA buffers until the device completes (transport contract).
* Zero-copy reads (:meth:`ScsiDisk.read_lease`): a read of at most one transfer on a
  transport that lends buffers (``execute_lent``) hands the transport's DMA buffer to
  the caller as a :class:`~amigafuse.blockdev.base.ReadLease`; between the transport
  returning it and the lease being built there is no checkpoint, so a cancellation
  cannot lose it.  Anything but a GOOD complete read is copied and judged as in
  :meth:`ScsiDisk.read` (retries, sense).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from amigafuse.blockdev.base import BlockDevice, DeviceInfo, ReadLease
from amigafuse.driver.scsi import cdb as C
from amigafuse.driver.scsi.sense import Action, classify
from amigafuse.driver.scsi.transport import (
    VIRTIO_SCSI_S_BAD_TARGET,
    ScsiCommandResult,
    ScsiTransport,
)
from amigafuse.errors import DeviceError, DeviceGone, HardwareError, IllegalRequest

_Runner = Callable[[bytes, int], Awaitable[ScsiCommandResult]]
_ChunkFn = Callable[[int, int], Awaitable[None]]

RETRY_LIMIT = 10
_READ_10 = struct.Struct(">BBIBHB")  # READ(10): opcode, flags, LBA, group, count, control
MAX_IN_FLIGHT = 16
MAX_SCAN_TARGET = 7


@dataclass
class DiskStats:
    """Counters of one disk (monotonic; read them, do not write them)."""

    commands: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    blocks_read: int = 0
    blocks_written: int = 0
    retries: int = 0
    unit_attentions: int = 0
    errors: int = 0
    unit_attention_codes: list[tuple[int, int]] = field(default_factory=list)


async def execute_with_retry(
    transport: ScsiTransport,
    target: int,
    lun: int,
    cdb: bytes,
    *,
    what: str | Callable[[], str],
    data_out: bytes | bytearray | memoryview | None = None,
    data_in_len: int = 0,
    stats: DiskStats | None = None,
    first: ScsiCommandResult | None = None,
) -> ScsiCommandResult:
    """Run one command, retrying what is retryable; return the GOOD result.

    ``what`` names the command in error messages (a callable is only called on failure,
    which keeps string formatting off the fast path).  ``first`` is the result of an
    attempt the caller already made (and counted): it is judged first, as if this
    function had run it.

    Raises the mapped :class:`~amigafuse.errors.DeviceError` (see
    :mod:`amigafuse.driver.scsi.sense`), or whatever the transport raises
    (:class:`~amigafuse.errors.DeviceGone` when the backend died).  Cancellation is
    passed through; see the transport contract for the command itself.
    """
    attempt = 0
    while True:
        if first is not None:
            result, first = first, None
        else:
            if stats is not None:
                stats.commands += 1
            result = await transport.execute(
                target, lun, cdb, data_out=data_out, data_in_len=data_in_len
            )
        if result.response == 0 and result.status == 0:
            return result  # the fast path: GOOD
        verdict = classify(
            result.response,
            result.status,
            result.sense,
            what=what if isinstance(what, str) else what(),
        )
        if verdict.action is Action.OK:
            return result
        if stats is not None and verdict.sense is not None and verdict.unit_attention:
            stats.unit_attentions += 1
            codes = (verdict.sense.asc, verdict.sense.ascq)
            if len(stats.unit_attention_codes) < 64:
                stats.unit_attention_codes.append(codes)
        assert verdict.error is not None
        if verdict.action is Action.FAIL or attempt >= RETRY_LIMIT:
            if stats is not None:
                stats.errors += 1
            raise verdict.error
        attempt += 1
        if stats is not None:
            stats.retries += 1
        if verdict.delay_s:
            await trio.sleep(verdict.delay_s)


def _size_text(size_bytes: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[unit]
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} bytes"


class ScsiDisk(BlockDevice):
    """One SCSI direct-access LUN as a block device.  Create with :meth:`open`."""

    def __init__(
        self,
        transport: ScsiTransport,
        target: int,
        lun: int,
        *,
        inquiry: C.StandardInquiry,
        capacity: C.Capacity,
        write_protected: bool,
        serial: str = "",
        identifiers: tuple[C.Designator, ...] = (),
        stats: DiskStats | None = None,
    ) -> None:
        self._transport = transport
        self.target = target
        self.lun = lun
        self.inquiry = inquiry
        self.identifiers = identifiers
        self._capacity = capacity
        self._write_protected = write_protected
        self._serial = serial
        self.stats = stats if stats is not None else DiskStats()
        self._gone: DeviceError | None = None
        self._capacity_lock = trio.Lock()
        self._capacity_stale = False
        self._seen_ua = len(self.stats.unit_attention_codes)
        self._max_transfer_blocks = max(1, transport.max_transfer_bytes // capacity.block_length)
        #: the transport's lending execute (VirtioScsiController.execute_lent), if any
        self._execute_lent: Callable[..., Awaitable[ScsiCommandResult]] | None = getattr(
            transport, "execute_lent", None
        )

    # ------------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls,
        transport: ScsiTransport,
        target: int,
        lun: int = 0,
        *,
        inquiry: C.StandardInquiry | None = None,
    ) -> ScsiDisk:
        """Bring up target/LUN: TEST UNIT READY (UNIT ATTENTION retried), INQUIRY and VPD
        pages 0x00/0x80/0x83, READ CAPACITY (10, then 16 when needed), MODE SENSE(6) for
        the write-protect bit.

        Raises :class:`~amigafuse.errors.NoMedium` when the unit is not ready,
        :class:`~amigafuse.errors.IllegalRequest` when it is not a direct-access disk,
        other DeviceErrors as the device reports them.
        """
        stats = DiskStats()
        name = f"SCSI target {target} LUN {lun}"

        async def run(cdb: bytes, data_in_len: int) -> ScsiCommandResult:
            return await execute_with_retry(
                transport,
                target,
                lun,
                cdb,
                what=f"{name}: {C.command_name(cdb)}",
                data_in_len=data_in_len,
                stats=stats,
            )

        await run(C.test_unit_ready(), 0)
        if inquiry is None:
            inquiry = C.parse_standard_inquiry((await run(C.inquiry(), 96)).data)
        if not inquiry.is_connected_disk:
            raise IllegalRequest(
                f"{name} is not a direct-access disk (peripheral qualifier "
                f"{inquiry.peripheral_qualifier}, type {inquiry.peripheral_device_type:#04x})"
            )

        serial = ""
        identifiers: tuple[C.Designator, ...] = ()
        try:
            pages = C.parse_vpd_supported_pages(
                (await run(C.inquiry(C.VPD_SUPPORTED_PAGES), 255)).data
            )
        except IllegalRequest:
            pages = ()
        if C.VPD_UNIT_SERIAL in pages:
            serial = C.parse_vpd_unit_serial((await run(C.inquiry(C.VPD_UNIT_SERIAL), 255)).data)
        if C.VPD_DEVICE_IDENTIFICATION in pages:
            identifiers = C.parse_vpd_device_identification(
                (await run(C.inquiry(C.VPD_DEVICE_IDENTIFICATION, 1024), 1024)).data
            )

        capacity = await cls._read_capacity(run)

        try:
            header = C.parse_mode_sense_6((await run(C.mode_sense_6(), 192)).data)
            write_protected = header.write_protect
        except IllegalRequest:
            write_protected = False

        return cls(
            transport,
            target,
            lun,
            inquiry=inquiry,
            capacity=capacity,
            write_protected=write_protected,
            serial=serial,
            identifiers=identifiers,
            stats=stats,
        )

    @staticmethod
    async def _read_capacity(run: _Runner) -> C.Capacity:
        try:
            cap10 = C.parse_read_capacity_10((await run(C.read_capacity_10(), 8)).data)
        except IllegalRequest:
            cap10 = None
        if cap10 is not None and cap10.last_lba != C.MAX_LBA_10:
            return cap10
        # Too big for READ CAPACITY(10) (or it is not supported): ask (16).
        return C.parse_read_capacity_16((await run(C.read_capacity_16(), 32)).data)

    # ------------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        return f"SCSI target {self.target} LUN {self.lun}"

    @property
    def block_size(self) -> int:
        return self._capacity.block_length

    @property
    def block_count(self) -> int:
        return self._capacity.block_count

    @property
    def capacity(self) -> C.Capacity:
        return self._capacity

    @property
    def read_only(self) -> bool:
        return self._write_protected

    @property
    def max_transfer_blocks(self) -> int:
        return self._max_transfer_blocks

    @property
    def info(self) -> DeviceInfo:
        inq = self.inquiry
        return DeviceInfo(
            vendor=inq.vendor,
            product=inq.product,
            revision=inq.revision,
            serial=self._serial,
            description=(
                f"{self.name}: {inq.vendor} {inq.product} {inq.revision}, "
                f"{_size_text(self.size_bytes)} in {self.block_count} blocks of "
                f"{self.block_size} bytes{', write-protected' if self.read_only else ''}"
            ),
        )

    # ------------------------------------------------------------------ commands

    async def execute(
        self,
        cdb: bytes,
        *,
        data_out: bytes | bytearray | memoryview | None = None,
        data_in_len: int = 0,
        what: str | Callable[[], str] | None = None,
        first: ScsiCommandResult | None = None,
    ) -> ScsiCommandResult:
        """Pass-through: run any CDB on this disk with the disk's retry and error mapping.

        ``first``: the result of an attempt already made and counted (see
        :func:`execute_with_retry`).  Raises the mapped DeviceError; DeviceGone for ever
        once the backend died.
        """
        if self._gone is not None:
            raise DeviceGone(self._gone.message, errno=self._gone.errno)
        try:
            result = await execute_with_retry(
                self._transport,
                self.target,
                self.lun,
                cdb,
                what=what or f"{self.name}: {C.command_name(cdb)}",
                data_out=data_out,
                data_in_len=data_in_len,
                stats=self.stats,
                first=first,
            )
        except DeviceGone as exc:
            self._gone = exc
            raise
        finally:
            self._check_unit_attentions()
        return result

    def _check_unit_attentions(self) -> None:
        codes = self.stats.unit_attention_codes
        if len(codes) > self._seen_ua:
            if (0x2A, 0x09) in codes[self._seen_ua :]:
                self._capacity_stale = True
            self._seen_ua = len(codes)

    async def refresh_capacity(self) -> C.Capacity:
        """Re-read the capacity (after UNIT ATTENTION 2A/09 "capacity data has changed").

        A changed block size is refused with HardwareError (nothing above could cope).
        """
        async with self._capacity_lock:

            async def run(cdb: bytes, data_in_len: int) -> ScsiCommandResult:
                return await self.execute(cdb, data_in_len=data_in_len)

            self._capacity_stale = False
            capacity = await self._read_capacity(run)
            if capacity.block_length != self._capacity.block_length:
                raise HardwareError(
                    f"{self.name}: the block size changed from {self._capacity.block_length} "
                    f"to {capacity.block_length} bytes; detach and re-attach the disk"
                )
            self._capacity = capacity
            return capacity

    def _what(self, cdb: bytes, lba: int, count: int) -> str:
        return f"{self.name}: {C.command_name(cdb)} of blocks {lba}..{lba + count - 1}"

    async def _attempt(
        self,
        cdb: bytes,
        data_out: bytes | bytearray | memoryview | None,
        data_in_len: int,
    ) -> ScsiCommandResult:
        """One attempt straight on the transport (the fast path of :meth:`execute`):
        counted in ``stats.commands``; a DeviceGone makes the disk gone for ever."""
        self.stats.commands += 1
        try:
            return await self._transport.execute(
                self.target, self.lun, cdb, data_out=data_out, data_in_len=data_in_len
            )
        except DeviceGone as exc:
            self._gone = exc
            raise

    async def _read_chunk(self, lba: int, count: int) -> bytes:
        nbytes = count * self.block_size
        if count <= C.MAX_COUNT_10 and lba + count - 1 <= C.MAX_LBA_10:
            cdb = _READ_10.pack(C.READ_10, 0, lba, 0, count, 0)  # C.read, without checks
        else:
            cdb = C.read(lba, count)
        # Fast path: one attempt straight on the transport (as _attempt, inlined: one
        # coroutine fewer per request); anything but GOOD goes through execute()
        # (sense, retries, unit attentions) starting from this result.
        self.stats.commands += 1
        try:
            result = await self._transport.execute(
                self.target, self.lun, cdb, data_in_len=nbytes
            )
        except DeviceGone as exc:
            self._gone = exc
            raise
        if result.response or result.status or len(result.data) != nbytes:
            return await self._judge_read(cdb, lba, count, result)
        self.stats.reads += 1
        self.stats.blocks_read += count
        return result.data

    async def _judge_read(
        self, cdb: bytes, lba: int, count: int, result: ScsiCommandResult
    ) -> bytes:
        """The data of a (copied) READ result; anything but GOOD goes through
        execute() (sense, retries, unit attentions) starting from it."""
        nbytes = count * self.block_size
        if result.response or result.status:
            result = await self.execute(
                cdb, data_in_len=nbytes, what=lambda: self._what(cdb, lba, count), first=result
            )
        if len(result.data) != nbytes:
            self.stats.errors += 1
            raise HardwareError(
                f"{self._what(cdb, lba, count)}: the device returned "
                f"{len(result.data)} of {nbytes} bytes (residual {result.residual})"
            )
        self.stats.reads += 1
        self.stats.blocks_read += count
        return result.data

    async def _write_chunk(self, lba: int, data: memoryview) -> None:
        count = len(data) // self.block_size
        cdb = C.write(lba, count)
        result = await self._attempt(cdb, data, 0)
        if result.response or result.status:
            await self.execute(
                cdb, data_out=data, what=lambda: self._what(cdb, lba, count), first=result
            )
        self.stats.writes += 1
        self.stats.blocks_written += count

    async def _prepare(self) -> None:
        if self._gone is not None:
            raise DeviceGone(self._gone.message, errno=self._gone.errno)
        if self._capacity_stale:
            await self.refresh_capacity()

    async def read(self, lba: int, count: int) -> bytes:
        """Read ``count`` blocks at ``lba`` (BlockDevice contract).  Large requests are
        split and issued concurrently.  Raises OutOfRange before any I/O; DeviceErrors."""
        if self._gone is not None or self._capacity_stale:
            await self._prepare()
        self.check_range(lba, count)
        if count == 0:
            return b""
        step = self._max_transfer_blocks
        if count <= step:
            return await self._read_chunk(lba, count)
        # Chunks land in order in a list and are joined once: one copy, not two.
        parts: list[bytes] = [b""] * -(-count // step)

        async def one(start: int, n: int) -> None:
            parts[(start - lba) // step] = await self._read_chunk(start, n)

        await self._split(lba, count, one)
        return b"".join(parts)

    async def read_lease(self, lba: int, count: int) -> ReadLease:
        """:meth:`read` without the copy (BlockDevice.read_lease): a read of at most one
        transfer on a lending transport comes back in the transport's DMA buffer, which
        stays withheld from the device (one slot of its queue) until the lease is
        released.  Larger reads, other transports and reads that needed a retry come
        back copied.  Raises as :meth:`read`."""
        execute_lent = self._execute_lent
        if execute_lent is None or count > self._max_transfer_blocks or count == 0:
            return ReadLease.of(await self.read(lba, count))
        if self._gone is not None or self._capacity_stale:
            await self._prepare()
        self.check_range(lba, count)
        if count <= C.MAX_COUNT_10 and lba + count - 1 <= C.MAX_LBA_10:
            cdb = _READ_10.pack(C.READ_10, 0, lba, 0, count, 0)
        else:
            cdb = C.read(lba, count)
        self.stats.commands += 1
        try:
            result = await execute_lent(
                self.target, self.lun, cdb, data_in_len=count * self.block_size
            )
        except DeviceGone as exc:
            self._gone = exc
            raise
        if result.release is not None and result.lent is not None:
            # no checkpoint between the transport's return and here: the lease owns it
            self.stats.reads += 1
            self.stats.blocks_read += count
            return ReadLease(result.lent, result.release)
        return ReadLease.of(await self._judge_read(cdb, lba, count, result))

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole blocks at ``lba`` (BlockDevice contract).  Raises WriteProtected
        for a write-protected disk and OutOfRange before any I/O; DeviceErrors."""
        if self._gone is not None or self._capacity_stale:
            await self._prepare()
        count = self.check_write(lba, data)
        if count == 0:
            return
        view = memoryview(data).cast("B")
        step = self._max_transfer_blocks
        if count <= step:
            await self._write_chunk(lba, view)
            return
        bs = self.block_size

        async def one(start: int, n: int) -> None:
            offset = (start - lba) * bs
            await self._write_chunk(start, view[offset : offset + n * bs])

        await self._split(lba, count, one)

    async def _split(self, lba: int, count: int, one: _ChunkFn) -> None:
        step = self._max_transfer_blocks
        chunks = [
            (start, min(step, lba + count - start)) for start in range(lba, lba + count, step)
        ]
        pending = iter(chunks)
        failure: list[BaseException] = []

        async def worker(cancel_scope: trio.CancelScope) -> None:
            for start, n in pending:
                try:
                    await one(start, n)
                except DeviceError as exc:
                    failure.append(exc)
                    cancel_scope.cancel()
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(min(MAX_IN_FLIGHT, len(chunks))):
                nursery.start_soon(worker, nursery.cancel_scope)
        if failure:
            raise failure[0]

    async def flush(self) -> None:
        """SYNCHRONIZE CACHE for the whole unit: every write that returned before is on
        stable storage when this returns.  Raises DeviceErrors."""
        if self._gone is not None:
            raise DeviceGone(self._gone.message, errno=self._gone.errno)
        await self.execute(C.synchronize_cache())
        self.stats.flushes += 1

    def mark_removed(self) -> None:
        """The target was hot-unplugged: later requests raise DeviceGone (ENODEV)."""
        if self._gone is None:
            self._gone = DeviceGone(
                f"{self.name} was removed from the controller (hot-unplugged)",
                errno=errno.ENODEV,
            )

    async def aclose(self) -> None:
        """Detach: later requests raise DeviceGone.  Idempotent; the controller owns the
        transport and closes it."""
        if self._gone is None:
            self._gone = DeviceGone(f"{self.name} was closed")

    def __repr__(self) -> str:
        return (
            f"<ScsiDisk {self.target}:{self.lun} {self.inquiry.vendor} {self.inquiry.product} "
            f"{self.block_count}x{self.block_size}>"
        )


@dataclass(frozen=True)
class TargetFailure:
    """A target that answered INQUIRY but did not come up as a disk (see
    :func:`scan_targets`): its address and the error that stopped it."""

    target: int
    lun: int
    error: DeviceError

    @property
    def message(self) -> str:
        return self.error.message


@dataclass
class ScanResult:
    """What :func:`scan_targets` found: the disks, in target order, and the targets that
    failed to come up, in target order."""

    disks: list[ScsiDisk]
    failed: list[TargetFailure]


async def scan_targets(
    transport: ScsiTransport, *, max_target: int = MAX_SCAN_TARGET
) -> ScanResult:
    """Find the direct-access disks: INQUIRY on LUN 0 of targets ``0..max_target``
    (bounded by the controller's max_target), then :meth:`ScsiDisk.open` of each disk.

    Targets that answer BAD_TARGET (nothing there) or are not direct-access (qualifier 0,
    type 0) are skipped.  A target whose INQUIRY, TEST UNIT READY, READ CAPACITY or
    another command of the bring-up fails (a CHECK CONDITION that does not go away
    within the retry budget, garbage in a reply) is recorded in ``failed`` with its
    error, and the scan goes on with the next target.  Raises DeviceGone when the
    backend died (then no target can answer), HardwareError when the controller itself
    broke the virtqueue protocol.
    """
    disks: list[ScsiDisk] = []
    failed: list[TargetFailure] = []
    last = min(max_target, transport.max_target)
    for target in range(last + 1):
        try:
            disk = await bring_up_target(transport, target)
        except DeviceGone:
            raise
        except HardwareError as exc:
            if getattr(transport, "failure", None) is not None:
                raise  # the controller is broken, not this target
            failed.append(TargetFailure(target, 0, exc))
            continue
        except DeviceError as exc:
            failed.append(TargetFailure(target, 0, exc))
            continue
        if disk is not None:
            disks.append(disk)
    return ScanResult(disks, failed)


async def bring_up_target(transport: ScsiTransport, target: int) -> ScsiDisk | None:
    """The disk at ``target`` LUN 0, or None when there is none (or it is no disk).
    Raises the DeviceError of a target that answers but does not come up."""
    what = f"SCSI target {target}: INQUIRY"
    result = await transport.execute(target, 0, C.inquiry(allocation_length=96), data_in_len=96)
    if result.response == VIRTIO_SCSI_S_BAD_TARGET:
        return None
    verdict = classify(result.response, result.status, result.sense, what=what)
    if verdict.action is not Action.OK:
        # Retry through the full path (UNIT ATTENTION etc.).
        result = await execute_with_retry(
            transport, target, 0, C.inquiry(allocation_length=96), what=what, data_in_len=96
        )
    inquiry = C.parse_standard_inquiry(result.data)
    if not inquiry.is_connected_disk:
        return None
    return await ScsiDisk.open(transport, target, 0, inquiry=inquiry)


async def scan(transport: ScsiTransport, *, max_target: int = MAX_SCAN_TARGET) -> list[ScsiDisk]:
    """The disks :func:`scan_targets` finds; raises the error of the first target that
    failed to come up (use :func:`scan_targets` to go on past failed targets)."""
    found = await scan_targets(transport, max_target=max_target)
    if found.failed:
        raise found.failed[0].error
    return found.disks
