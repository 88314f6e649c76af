"""The virtio-scsi controller: a :class:`~amigafuse.driver.scsi.transport.ScsiTransport`
over one request virtqueue (queue 2), with the control queue (0, task management for
the watchdog) and the event queue (1, hot-plug events), on any backend.

Design (invariants in docs/driver.md):

* DMA memory: the backend's arena holds the ring, then ``queue_depth`` pre-allocated
  slots, each with an indirect descriptor table, the request header + CDB, the response
  + sense, and a data bounce buffer of ``max_transfer_bytes``.  A slot belongs either to
  the free list, or to exactly one request from submission until its used entry was
  harvested *and* its caller copied the results out (or abandoned it).  A caller
  cancelled while its command is in flight abandons the slot; the completion path
  returns it to the free list when the device is done with it.
* Lending (zero-copy reads, :meth:`VirtioScsiController.execute_lent`): a read that
  completed GOOD with all its bytes leaves its slot *lent* instead of free: the caller
  gets a view of the slot's data buffer and a release function, and the slot returns to
  the free list only when that is called (once; a stale release naming an older tag is
  ignored).  A lent slot is never in the ring, so the watchdog, failure and recovery
  paths leave it alone.
* Exactly one completion path: the task started by :func:`open_virtio_scsi` waits for
  the interrupt, reads the ISR (deasserting INTx; not with MSI-X, where the request
  queue signals on vector 0 when the backend offers it), harvests the used ring and
  wakes the waiters; it harvests the control and event queues' used rings in the same
  pass.  No other code reads a used ring, so completions cannot be taken by the wrong
  waiter or read twice.
* Kick suppression: a request is published at once when others are in flight (the
  device works on it while we prepare the next), after one scheduling batch when it is
  alone (its kick then shares a send with the ISR read); the device is notified only
  when ``vring_need_event`` over its ``avail_event`` says so (EVENT_IDX), or when it did
  not set NO_NOTIFY.
* Interrupt suppression: after harvesting, ``used_event`` asks for an interrupt at the
  next completion; completions that arrive while we are not yet re-armed raise no
  interrupt and are picked up by the re-check loop.
* Trio: everything runs in one thread; the only awaits inside the bookkeeping are the
  burst yield (after the slot's chain is added, so nothing is lost if the task is
  cancelled there: the yield is shielded) and the ISR read in the completion task
  (harvesting happens after it).  Ring state is only touched between awaits, so no lock
  is needed.  The watchdog's recovery awaits task-management completions; it names the
  requests it waits for by (slot, tag) and re-checks them after every await, since a
  completed slot may already carry another request.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import trio

from amigafuse.driver.backends.base import Backend, DmaArena
from amigafuse.driver.pci import PciFunction, configure_function, enumerate_bus
from amigafuse.driver.scsi.transport import VIRTIO_SCSI_S_FAILURE, ScsiCommandResult
from amigafuse.driver.virtio.device import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    bit,
    driver_ok,
    negotiate,
)
from amigafuse.driver.virtio.ring import DESC_SIZE, RingLayout, Segment, SplitRing
from amigafuse.driver.virtio.transport import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_VENDOR,
    VirtioTransport,
    open_transport,
)
from amigafuse.errors import DeviceGone, HardwareError, NotAvailable, UsageError

VIRTIO_SCSI_LEGACY_ID = 0x1004
VIRTIO_SCSI_MODERN_ID = 0x1048
REQUEST_QUEUE = 2  # 0 control, 1 event, 2.. requests

# virtio-scsi config (virtio 1.x §5.6.4), offsets and sizes
CONFIG_FIELDS = {
    "num_queues": (0, 4),
    "seg_max": (4, 4),
    "max_sectors": (8, 4),
    "cmd_per_lun": (12, 4),
    "event_info_size": (16, 4),
    "sense_size": (20, 4),
    "cdb_size": (24, 4),
    "max_channel": (28, 2),
    "max_target": (30, 2),
    "max_lun": (32, 4),
}

_RESP_HEAD = struct.Struct("<IIHBB")  # sense_len, residual, status_qualifier, status, response

CONTROL_QUEUE = 0
# virtio-scsi task management (virtio 1.x §5.6.6.2): struct virtio_scsi_ctrl_tmf_req
VIRTIO_SCSI_T_TMF = 0
VIRTIO_SCSI_T_TMF_ABORT_TASK = 0
VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET = 5
VIRTIO_SCSI_S_FUNCTION_COMPLETE = 0
VIRTIO_SCSI_S_FUNCTION_SUCCEEDED = 10
VIRTIO_SCSI_S_FUNCTION_REJECTED = 11
_TMF_REQ = struct.Struct("<II8sQ")  # type, subtype, lun[8], id (the command's tag)
TMF_SLOTS = 4
TMF_NAMES = {
    VIRTIO_SCSI_T_TMF_ABORT_TASK: "ABORT TASK",
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET: "LOGICAL UNIT RESET",
}


EVENT_QUEUE = 1
VIRTIO_SCSI_F_HOTPLUG = 1  # feature bit: hot-plug events on the event queue
# struct virtio_scsi_event (virtio 1.x §5.6.6.3)
VIRTIO_SCSI_T_NO_EVENT = 0
VIRTIO_SCSI_T_TRANSPORT_RESET = 1
VIRTIO_SCSI_T_ASYNC_NOTIFY = 2
VIRTIO_SCSI_T_PARAM_CHANGE = 3
VIRTIO_SCSI_T_EVENTS_MISSED = 0x80000000
VIRTIO_SCSI_EVT_RESET_HARD = 0
VIRTIO_SCSI_EVT_RESET_RESCAN = 1
VIRTIO_SCSI_EVT_RESET_REMOVED = 2
_EVENT = struct.Struct("<I8sI")  # event, lun[8], reason
EVENT_BUFFERS = 8
MAX_KEPT_EVENTS = 64


@dataclass(frozen=True)
class ScsiEvent:
    """One struct virtio_scsi_event, as the device wrote it (``pack(unpack(b)) == b``)."""

    event: int
    lun: bytes
    reason: int

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> ScsiEvent:
        event, lun, reason = _EVENT.unpack_from(buf, 0)
        return cls(event, bytes(lun), reason)

    def pack(self) -> bytes:
        return _EVENT.pack(self.event, self.lun, self.reason)

    @property
    def missed(self) -> bool:
        """The device dropped events (no buffer was free): rescan everything."""
        return bool(self.event & VIRTIO_SCSI_T_EVENTS_MISSED)

    @property
    def kind(self) -> int:
        return self.event & ~VIRTIO_SCSI_T_EVENTS_MISSED

    @property
    def target(self) -> int:
        return self.lun[1]

    @property
    def lun_number(self) -> int:
        return ((self.lun[2] & 0x3F) << 8) | self.lun[3]

    @property
    def plugged(self) -> bool:
        """A target appeared (TRANSPORT_RESET, reason RESCAN)."""
        return (
            self.kind == VIRTIO_SCSI_T_TRANSPORT_RESET
            and self.reason == VIRTIO_SCSI_EVT_RESET_RESCAN
        )

    @property
    def unplugged(self) -> bool:
        """A target went away (TRANSPORT_RESET, reason REMOVED)."""
        return (
            self.kind == VIRTIO_SCSI_T_TRANSPORT_RESET
            and self.reason == VIRTIO_SCSI_EVT_RESET_REMOVED
        )


def pack_tmf_req(subtype: int, target: int, lun: int, tag: int) -> bytes:
    """struct virtio_scsi_ctrl_tmf_req: type TMF, ``subtype``, the LUN, the tag of the
    command it concerns (ABORT TASK; 0 for a LOGICAL UNIT RESET)."""
    return _TMF_REQ.pack(VIRTIO_SCSI_T_TMF, subtype, encode_lun(target, lun), tag)


def tmf_succeeded(response: int) -> bool:
    """Whether a TMF response says the function was carried out."""
    return response in (VIRTIO_SCSI_S_FUNCTION_COMPLETE, VIRTIO_SCSI_S_FUNCTION_SUCCEEDED)


DEFAULT_MAX_TRANSFER = 1 << 20
MAX_INDIRECT = 4


@dataclass(frozen=True)
class VirtioScsiConfig:
    num_queues: int
    seg_max: int
    max_sectors: int
    cmd_per_lun: int
    event_info_size: int
    sense_size: int
    cdb_size: int
    max_channel: int
    max_target: int
    max_lun: int


def encode_lun(target: int, lun: int) -> bytes:
    """virtio-scsi's 8-byte LUN field: 1, target, flat-space LUN (0x4000 | lun), zeros."""
    if not 0 <= target <= 255:
        raise UsageError(f"SCSI target {target} outside 0..255")
    if not 0 <= lun < 16384:
        raise UsageError(f"SCSI LUN {lun} outside 0..16383")
    return bytes((1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0))


def pack_cmd_req(target: int, lun: int, tag: int, cdb: bytes, cdb_size: int) -> bytes:
    """struct virtio_scsi_cmd_req: lun[8], tag le64, task_attr, prio, crn, cdb[cdb_size]."""
    if len(cdb) > cdb_size:
        raise UsageError(f"CDB of {len(cdb)} bytes exceeds the device's cdb_size {cdb_size}")
    return encode_lun(target, lun) + struct.pack("<QBBB", tag, 0, 0, 0) + cdb.ljust(cdb_size, b"\0")


def cmd_req_size(cdb_size: int) -> int:
    return 19 + cdb_size


def resp_size(sense_size: int) -> int:
    return _RESP_HEAD.size + sense_size


def unpack_cmd_resp(
    buf: bytes | memoryview, sense_size: int, data_len: int
) -> tuple[int, int, bytes, int]:
    """(response, status, sense, residual) from a virtio_scsi_cmd_resp, distrusting it:
    sense_len is clamped to ``sense_size`` and residual to ``data_len``."""
    sense_len, residual, _qualifier, status, response = _RESP_HEAD.unpack_from(buf, 0)
    sense_len = min(sense_len, sense_size)
    sense = bytes(buf[_RESP_HEAD.size : _RESP_HEAD.size + sense_len])
    return response, status, sense, min(residual, data_len)


@dataclass(frozen=True)
class SlotLayout:
    """Offsets inside the arena of one request slot (pure)."""

    table: int
    request: int
    response: int
    data: int


def plan_arena(
    arena_bytes: int,
    ring: RingLayout,
    queue_depth: int,
    cdb_size: int,
    sense_size: int,
    data_bytes: int,
) -> list[SlotLayout]:
    """Place the ring at offset 0 and ``queue_depth`` slots after it (pure).  Data
    buffers are 4096-aligned.  Raises UsageError when the arena is too small."""
    small = _align(MAX_INDIRECT * DESC_SIZE, 64) + _align(cmd_req_size(cdb_size), 64)
    small += _align(resp_size(sense_size), 64)
    offset = _align(ring.total_bytes, 4096)
    smalls_start = offset
    offset = _align(offset + small * queue_depth, 4096)
    slots = []
    for index in range(queue_depth):
        base = smalls_start + small * index
        table = base
        request = table + _align(MAX_INDIRECT * DESC_SIZE, 64)
        response = request + _align(cmd_req_size(cdb_size), 64)
        slots.append(SlotLayout(table, request, response, offset + data_bytes * index))
    need = offset + data_bytes * queue_depth
    if need > arena_bytes:
        raise UsageError(
            f"DMA arena of {arena_bytes >> 20} MiB is too small for {queue_depth} requests of "
            f"{data_bytes >> 10} KiB (needs {(need + (1 << 20) - 1) >> 20} MiB): give QEMU more RAM"
        )
    return slots


@dataclass(frozen=True)
class ControlLayout:
    """Offsets inside the arena of the control queue's ring and its TMF buffers (pure)."""

    ring: int
    requests: tuple[int, ...]
    responses: tuple[int, ...]
    end: int


def plan_control(start: int, ring: RingLayout, slots: int = TMF_SLOTS) -> ControlLayout:
    """Place the control ring (4096-aligned) at or after ``start``, then ``slots``
    request/response pairs, 64-byte aligned each."""
    ring_offset = _align(start, 4096)
    offset = ring_offset + _align(ring.total_bytes, 64)
    requests, responses = [], []
    for _ in range(slots):
        requests.append(offset)
        responses.append(offset + 64)
        offset += 128
    return ControlLayout(ring_offset, tuple(requests), tuple(responses), offset)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


_FREE, _IN_FLIGHT, _COMPLETED, _ABANDONED, _LENT = range(5)


def _fresh(exc: BaseException) -> BaseException:
    """A new exception like ``exc`` (chained to it) for one more waiter: raising one
    shared instance in many tasks would pile all their tracebacks onto it."""
    clone = copy.copy(exc)
    clone.__traceback__ = None
    clone.__cause__ = exc
    return clone


class _Slot:
    __slots__ = (
        "aborted", "error", "index", "layout", "lun_bytes", "state", "tag", "task", "written",
    )  # fmt: skip

    def __init__(self, index: int, layout: SlotLayout) -> None:
        self.index = index
        self.layout = layout
        self.state = _FREE
        self.task: trio.lowlevel.Task | None = None  # the caller sleeping on completion
        self.written = 0
        self.error: BaseException | None = None
        self.tag = 0  # the command's tag (what ABORT TASK names)
        self.lun_bytes = b""  # the command's 8-byte virtio-scsi LUN
        self.aborted: str | None = None  # why the watchdog aborted it, if it did

    def abort(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        """Its caller was cancelled before completion: the completion path frees it."""
        self.task = None
        self.state = _ABANDONED
        return trio.lowlevel.Abort.SUCCEEDED


# Indirect tables written in one pack: (address, length, flags, next) per descriptor.
_F_NEXT, _F_WRITE = 1, 2
_TABLE2 = struct.Struct("<QIHH QIHH")
_TABLE3 = struct.Struct("<QIHH QIHH QIHH")
_RESP_CLEAR = bytes(_RESP_HEAD.size)


class _TmfSlot:
    """One task-management request buffer pair on the control queue."""

    __slots__ = ("done", "index", "request", "response", "state", "value")

    def __init__(self, index: int, request: int, response: int) -> None:
        self.index = index
        self.request = request
        self.response = response
        self.state = _FREE
        self.done = trio.Event()
        self.value = 0  # the device's response code


class _EventBuffer:
    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset = offset


class _EventQueue:
    """The event queue: its ring and the buffers the device writes events into (all of
    them always posted, re-posted as soon as an event was copied out)."""

    def __init__(self, ring: SplitRing[_EventBuffer], buffers: list[int]) -> None:
        self.ring = ring
        self.buffers = [_EventBuffer(offset) for offset in buffers]


class _ControlQueue:
    """The control queue: its ring and TMF slots (None when the arena had no room)."""

    def __init__(self, ring: SplitRing[_TmfSlot], layout: ControlLayout) -> None:
        self.ring = ring
        self.end = layout.end
        self.slots = [
            _TmfSlot(i, req, resp)
            for i, (req, resp) in enumerate(zip(layout.requests, layout.responses, strict=True))
        ]


@dataclass
class ControllerStats:
    requests: int = 0
    kicks: int = 0
    interrupts: int = 0
    completions: int = 0
    #: completions whose caller had been cancelled while the device held the buffer
    abandoned: int = 0
    #: task management sent by the watchdog for requests that took too long
    aborts: int = 0
    lun_resets: int = 0
    #: events reported on the event queue (hot-plug)
    events: int = 0
    #: reads whose data buffer was lent to the caller (execute_lent) and given back
    lent: int = 0


class VirtioScsiController:
    """A virtio-scsi request queue (implements ScsiTransport).  Made by
    :func:`open_virtio_scsi`; see the module docstring for the design."""

    def __init__(
        self,
        backend: Backend,
        transport: VirtioTransport,
        config: VirtioScsiConfig,
        features: int,
        ring: SplitRing[_Slot],
        slots: list[_Slot],
        max_transfer_bytes: int,
        control: _ControlQueue | None = None,
        events: _EventQueue | None = None,
    ) -> None:
        self.backend = backend
        self._control = control
        self._events = events
        #: events the device reported (newest last, at most MAX_KEPT_EVENTS)
        self.events: collections.deque[ScsiEvent] = collections.deque(maxlen=MAX_KEPT_EVENTS)
        self._event_arrived = trio.Event()
        self._events_read = 0  # events handed out by next_event
        self.transport = transport
        self.config = config
        self.features = features
        self._ring = ring
        self._arena: DmaArena = backend.arena
        self._mem = backend.arena.view
        self._bus = backend.arena.bus_address
        self._slots = slots
        self._free = list(reversed(slots))
        self._slot_lot = trio.lowlevel.ParkingLot()
        self._max_transfer = max_transfer_bytes
        self._indirect = bool(features & bit(VIRTIO_RING_F_INDIRECT_DESC))
        self._burst_open = False
        self._tag = 0
        self._failure: BaseException | None = None
        self.stats = ControllerStats()
        self._cdb_size = config.cdb_size
        self._sense_size = config.sense_size
        self._req_len = cmd_req_size(config.cdb_size)
        self._resp_len = resp_size(config.sense_size)
        self._header = struct.Struct(f"<8sQBBB{config.cdb_size}s")
        self._luns: dict[tuple[int, int], bytes] = {}
        self._merge_kick_with_isr = True
        self._msix = backend.interrupt_mode == "msix"
        self._cycle_publish_pending = False
        self._busy = trio.Event()  # set while requests may be in flight (watchdog)
        self._progress: trio.Event | None = None  # set at harvests while recovery waits
        self._tmf_free = trio.Event()  # set when a TMF slot was freed
        #: see _harvest; tunable for benchmarks
        self.coalesce_divisor = 0
        #: a request alone in flight that moves at least this many bytes is published and
        #: kicked at once (others are too whenever more are in flight)
        self.immediate_kick_bytes = 128 << 10
        #: with others in flight, publish once this many requests wait unpublished (1:
        #: each at once; more: fewer kicks, later start); the rest at the batch's end
        self.publish_batch = 1

    # ------------------------------------------------------------- ScsiTransport

    @property
    def max_target(self) -> int:
        return self.config.max_target

    @property
    def max_lun(self) -> int:
        return self.config.max_lun

    @property
    def max_transfer_bytes(self) -> int:
        return self._max_transfer

    @property
    def queue_depth(self) -> int:
        return len(self._slots)

    @property
    def transport_kind(self) -> str:
        return self.transport.kind

    @property
    def failure(self) -> BaseException | None:
        """The error that put the whole controller out of service (every request fails
        with it from then on), or None while it works."""
        return self._failure

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise _fresh(self._failure)
        if self.backend.dead:
            raise self.backend.gone_error()

    async def execute(
        self,
        target: int,
        lun: int,
        cdb: bytes,
        *,
        data_out: bytes | bytearray | memoryview | None = None,
        data_in_len: int = 0,
        lend: bool = False,
    ) -> ScsiCommandResult:
        """Run one SCSI command (see ScsiTransport).  Raises DeviceGone when the backend
        died, HardwareError when the device broke the virtqueue protocol, UsageError on
        a request this controller cannot carry.  ``lend``: see :meth:`execute_lent`."""
        out_len = 0 if data_out is None else len(data_out)
        if out_len and data_in_len:
            raise UsageError("bidirectional SCSI commands are not supported")
        if data_in_len < 0 or max(out_len, data_in_len) > self._max_transfer:
            raise UsageError(
                f"transfer of {max(out_len, data_in_len)} bytes exceeds the controller's "
                f"maximum of {self._max_transfer}"
            )
        if target > self.config.max_target or lun > self.config.max_lun:
            raise UsageError(
                f"SCSI address {target}:{lun} beyond max {self.config.max_target}:{self.config.max_lun}"
            )
        self._tag = (self._tag + 1) & 0xFFFFFFFFFFFFFFFF
        if len(cdb) > self._cdb_size:
            raise UsageError(
                f"CDB of {len(cdb)} bytes exceeds the device's cdb_size {self._cdb_size}"
            )
        lun_bytes = self._luns.get((target, lun))
        if lun_bytes is None:
            lun_bytes = self._luns[(target, lun)] = encode_lun(target, lun)
        self._raise_if_failed()
        while not self._free:
            await self._slot_lot.park()
            self._raise_if_failed()
        slot = self._free.pop()
        try:
            self._submit(slot, lun_bytes, cdb, data_out, out_len, data_in_len)
        except BaseException:
            slot.state = _FREE
            self._free.append(slot)
            self._slot_lot.unpark()
            raise
        ring = self._ring
        if (
            ring.in_flight > 1
            and (ring.avail_idx - ring.published_idx) & 0xFFFF >= self.publish_batch
        ) or max(out_len, data_in_len) >= self.immediate_kick_bytes:
            # Others are in flight (or this is a big transfer): publish now, and kick
            # if the device drained the ring and waits (EVENT_IDX).  The device then
            # works on this request while we prepare the next: with QEMU on the other
            # CPU the two overlap instead of taking turns (4 KiB QD16: ~38k -> ~60k
            # IOPS; kicks go from 1/16 to ~1/3 per request, interrupts to ~1/25).
            self._publish()
            self.backend.flush_posted()
        elif not self._burst_open:
            # Alone in flight: wait one scheduling batch before publishing, so that
            # the kick shares its send with the completion cycle's ISR read (QD1: one
            # send per request, not two).  A request arriving in that batch finds this
            # one in flight and publishes both at once (above).
            self._burst_open = True
            try:
                await trio.lowlevel.cancel_shielded_checkpoint()
            finally:
                self._burst_open = False
                self._publish()
                if not self._cycle_publish_pending:
                    # Nobody is about to send an ISR read that would carry the kick.
                    self.backend.flush_posted()
        # Wait for the completion (inlined: one coroutine fewer per request).
        if slot.state == _IN_FLIGHT:
            slot.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(slot.abort)
        else:
            try:
                await trio.lowlevel.checkpoint()
            except BaseException:
                self._release(slot)
                raise
        return self._result(slot, data_in_len, lend)

    async def execute_lent(
        self, target: int, lun: int, cdb: bytes, *, data_in_len: int
    ) -> ScsiCommandResult:
        """A data-in command whose data is lent, not copied: when it completes GOOD with
        all ``data_in_len`` bytes, the result's ``lent`` is a view of the slot's DMA
        buffer and ``release`` gives the slot back (the caller must call it, once, and
        drop the view then); any other outcome comes back as from :meth:`execute`
        (copied, ``release`` None).  Raises as :meth:`execute`.  Cancellation: as
        :meth:`execute`; once this returned, no checkpoint stands between the caller
        and the release it owns."""
        return await self.execute(target, lun, cdb, data_in_len=data_in_len, lend=True)

    def _submit(
        self,
        slot: _Slot,
        lun_bytes: bytes,
        cdb: bytes,
        data_out: bytes | bytearray | memoryview | None,
        out_len: int,
        data_in_len: int,
    ) -> None:
        mem, bus, lay = self._mem, self._bus, slot.layout
        self._header.pack_into(mem, lay.request, lun_bytes, self._tag, 0, 0, 0, cdb)
        mem[lay.response : lay.response + _RESP_HEAD.size] = _RESP_CLEAR
        req_addr = bus + lay.request
        resp_addr = bus + lay.response
        data_addr = bus + lay.data
        req_len, resp_len = self._req_len, self._resp_len
        if self._indirect:
            table = lay.table
            if data_in_len:
                _TABLE3.pack_into(
                    mem, table,
                    req_addr, req_len, _F_NEXT, 1,
                    resp_addr, resp_len, _F_WRITE | _F_NEXT, 2,
                    data_addr, data_in_len, _F_WRITE, 0,
                )  # fmt: skip
                count = 3
            elif out_len:
                assert data_out is not None
                mem[lay.data : lay.data + out_len] = data_out
                _TABLE3.pack_into(
                    mem, table,
                    req_addr, req_len, _F_NEXT, 1,
                    data_addr, out_len, _F_NEXT, 2,
                    resp_addr, resp_len, _F_WRITE, 0,
                )  # fmt: skip
                count = 3
            else:
                _TABLE2.pack_into(
                    mem, table, req_addr, req_len, _F_NEXT, 1, resp_addr, resp_len, _F_WRITE, 0
                )
                count = 2
            self._ring.add_indirect_table(bus + table, count, slot)
        else:
            segments = [Segment(req_addr, req_len)]
            if data_out is not None and out_len:
                mem[lay.data : lay.data + out_len] = data_out
                segments.append(Segment(data_addr, out_len))
            segments.append(Segment(resp_addr, resp_len, True))
            if data_in_len:
                segments.append(Segment(data_addr, data_in_len, True))
            self._ring.add(segments, slot)
        slot.state = _IN_FLIGHT
        slot.task = None
        slot.error = None
        slot.tag = self._tag
        slot.lun_bytes = lun_bytes
        slot.aborted = None
        self.stats.requests += 1
        if not self._busy.is_set():
            self._busy.set()

    def _publish(self) -> None:
        if self._failure is not None or self.backend.dead:
            return  # waiters are (or will be) failed by _fail_all
        old, new = self._ring.publish()
        if self._ring.kick_needed(old, new):
            self.stats.kicks += 1
            try:
                self.transport.notify(REQUEST_QUEUE)
            except DeviceGone as exc:
                self._fail_all(exc)

    def _result(self, slot: _Slot, data_in_len: int, lend: bool = False) -> ScsiCommandResult:
        """Copy the results out of a _COMPLETED slot (ours) and free it; with ``lend``,
        a GOOD and complete read leaves the slot _LENT to the caller instead."""
        if lend and slot.error is None and slot.aborted is None:
            lay = slot.layout
            mem = self._mem
            sense_len, residual, _qualifier, status, response = _RESP_HEAD.unpack_from(
                mem, lay.response
            )
            if not (response or status or residual or sense_len):
                slot.state = _LENT
                tag = slot.tag
                return ScsiCommandResult(
                    0, 0, b"", b"", 0,
                    lent=mem[lay.data : lay.data + data_in_len],
                    release=lambda: self._give_back(slot, tag),
                )  # fmt: skip
        try:
            if slot.error is not None:
                raise _fresh(slot.error)
            lay = slot.layout
            mem = self._mem
            sense_len, residual, _qualifier, status, response = _RESP_HEAD.unpack_from(
                mem, lay.response
            )
            # distrust the device: clamp what it claims (as unpack_cmd_resp does)
            if sense_len:
                sense_start = lay.response + _RESP_HEAD.size
                sense = bytes(mem[sense_start : sense_start + min(sense_len, self._sense_size)])
            else:
                sense = b""
            if residual > data_in_len:
                residual = data_in_len
            got = data_in_len - residual
            data = bytes(mem[lay.data : lay.data + got]) if got else b""
            if slot.aborted is not None and (response or status):
                # The watchdog aborted it: say so, rather than let the disk retry it.
                raise HardwareError(slot.aborted)
        finally:
            self._release(slot)
        return ScsiCommandResult(response, status, sense, data, residual)

    def _give_back(self, slot: _Slot, tag: int) -> None:
        """The end of a lend (see :meth:`execute_lent`); a stale call is ignored."""
        if slot.state == _LENT and slot.tag == tag:
            self.stats.lent += 1
            self._release(slot)

    def _release(self, slot: _Slot) -> None:
        slot.state = _FREE
        slot.task = None
        self._free.append(slot)
        if self._slot_lot:
            self._slot_lot.unpark()

    # ------------------------------------------------------------- completion path

    def _complete(self, slot: _Slot, written: int) -> None:
        self.stats.completions += 1
        slot.written = written
        if slot.state == _ABANDONED:
            self.stats.abandoned += 1
            self._release(slot)
            return
        slot.state = _COMPLETED
        task = slot.task
        if task is not None:
            slot.task = None
            trio.lowlevel.reschedule(task)

    def _harvest(self) -> None:
        ring = self._ring
        control = self._control
        events = self._events
        while self._failure is None:
            if control is not None and control.ring.in_flight:
                self._harvest_control(control)
            if events is not None and events.ring.has_used():
                self._harvest_events(events)
            for slot, written in ring.harvest():
                self._complete(slot, written)
            if self._progress is not None:
                self._progress.set()
            # Interrupt coalescing: with n > 0 requests in flight, ask for the interrupt
            # after (n - 1) // coalesce_divisor + 1 more completions, never more than n
            # (or it would never come); divisor 0 (the default): at the next completion.
            in_flight = ring.in_flight
            divisor = self.coalesce_divisor
            after = (in_flight - 1) // divisor if divisor and in_flight else 0
            more = ring.enable_interrupts(after)
            if control is not None and control.ring.in_flight and control.ring.enable_interrupts():
                more = True
            if events is not None and events.ring.enable_interrupts():
                more = True
            if not more:
                return

    def _harvest_events(self, events: _EventQueue) -> None:
        mem, bus = self._mem, self._bus
        for buffer, _written in events.ring.harvest():
            event = ScsiEvent.unpack(mem[buffer.offset : buffer.offset + _EVENT.size])
            if event.event != VIRTIO_SCSI_T_NO_EVENT:
                self.events.append(event)
                self.stats.events += 1
            events.ring.add([Segment(bus + buffer.offset, _EVENT.size, True)], buffer)
        self._event_arrived.set()
        old, new = events.ring.publish()
        if events.ring.kick_needed(old, new):
            self.transport.notify(EVENT_QUEUE)

    async def next_event(self) -> ScsiEvent:
        """The next event the device reports (hot-plug: :attr:`ScsiEvent.plugged` /
        :attr:`ScsiEvent.unplugged`; :attr:`ScsiEvent.missed` when it dropped some),
        in order, each once.  Raises NotAvailable when the event queue is not set up
        (no VIRTIO_SCSI_F_HOTPLUG), DeviceGone/HardwareError when the controller failed.
        Cancellable; one consumer at a time."""
        if self._events is None:
            raise NotAvailable("this virtio-scsi controller reports no events")
        while True:
            self._raise_if_failed()
            unread = self.stats.events - self._events_read
            if unread > len(self.events):
                # More arrived than the deque keeps: one missed event (rescan) stands
                # for those that fell out, then the kept ones follow.
                self._events_read = self.stats.events - len(self.events)
                return ScsiEvent(VIRTIO_SCSI_T_EVENTS_MISSED, bytes(8), 0)
            if unread > 0:
                self._events_read += 1
                return self.events[len(self.events) - unread]
            self._event_arrived = trio.Event()
            await self._event_arrived.wait()

    def _harvest_control(self, control: _ControlQueue) -> None:
        mem = self._mem
        for slot, _written in control.ring.harvest():
            if slot.state == _ABANDONED:
                slot.state = _FREE
                self._tmf_free.set()
                continue
            slot.value = mem[slot.response]
            slot.state = _COMPLETED
            slot.done.set()

    async def _completion_loop(self) -> None:
        try:
            while True:
                await self.backend.wait_interrupt()
                self.stats.interrupts += 1
                # Harvest before the ISR round trip, so that woken callers resubmit
                # while it is under way; harvest again after it, for completions
                # that came while the line was still high (they raise no new edge).
                self._harvest()
                if self._merge_kick_with_isr:
                    # Let the callers just woken resubmit (they run in the next batch),
                    # publish what they queued: the kick, a posted write, then leaves in
                    # the same send as the ISR read.
                    self._cycle_publish_pending = True
                    try:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    finally:
                        self._cycle_publish_pending = False
                    self._publish()
                if self._msix:
                    continue  # a message per event: no ISR to read, nothing to re-arm
                await self.transport.read_isr()
                self.backend.ack_interrupt()
                self._harvest()
        except (DeviceGone, HardwareError) as exc:
            self._fail_all(exc)

    async def _watchdog(self, timeout: float) -> None:
        """Recover from requests that stop completing: when requests are in flight and
        none completes for ``timeout`` seconds (a hung QEMU or image), abort them (TMF
        ABORT TASK on the control queue), then reset their LUNs (LOGICAL UNIT RESET),
        each bounded by ``timeout``; if they still do not complete (or there is no
        control queue), fail everything with DeviceGone: better EIO than a hang.  An
        aborted request fails with HardwareError saying so; the others go on.  Sleeps
        on an event while nothing is in flight."""
        last = self.stats.completions
        since = trio.current_time()
        while self._failure is None:
            if self._ring.in_flight == 0:
                self._busy = trio.Event()
                await self._busy.wait()
                last, since = self.stats.completions, trio.current_time()
                continue
            await trio.sleep(min(1.0, timeout / 4))
            now = trio.current_time()
            if self.stats.completions != last or self._ring.in_flight == 0:
                last, since = self.stats.completions, now
            elif now - since >= timeout:
                await self._recover(timeout)
                last, since = self.stats.completions, trio.current_time()

    async def _recover(self, timeout: float) -> None:
        """Abort, then reset, the requests in flight (see :meth:`_watchdog`)."""
        # Abandoned requests (their callers were cancelled) are stuck in the device too.
        stuck = [
            (slot, slot.tag) for slot in self._slots if slot.state in (_IN_FLIGHT, _ABANDONED)
        ]
        gone = DeviceGone(
            f"the virtio-scsi device completed none of {len(stuck)} requests in "
            f"{timeout:g} s; giving up on it (is QEMU stopped, or its disk image on a "
            "hung filesystem?)"
        )
        if self._control is None:
            self._fail_all(gone)
            return
        for slot, _tag in stuck:
            target, lun = _lun_address(slot.lun_bytes)
            slot.aborted = (
                f"SCSI target {target} LUN {lun}: the command did not complete within "
                f"{timeout:g} s and was aborted (is the disk image on a hung filesystem?)"
            )
        self.stats.aborts += len(stuck)
        await self._tmf_round(
            [(VIRTIO_SCSI_T_TMF_ABORT_TASK, slot.lun_bytes, tag) for slot, tag in stuck],
            stuck,
            timeout,
        )
        left = [(slot, tag) for slot, tag in stuck if _still_in_flight(slot, tag)]
        if not left or self._failure is not None:
            return
        luns = sorted({slot.lun_bytes for slot, _ in left})
        self.stats.lun_resets += len(luns)
        await self._tmf_round(
            [(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, lun_bytes, 0) for lun_bytes in luns],
            left,
            timeout,
        )
        left = [(slot, tag) for slot, tag in left if _still_in_flight(slot, tag)]
        if left and self._failure is None:
            self._fail_all(
                DeviceGone(
                    f"{gone.message}; ABORT TASK and LOGICAL UNIT RESET did not bring "
                    f"{len(left)} of them back"
                )
            )

    async def _tmf_round(
        self,
        functions: list[tuple[int, bytes, int]],
        stuck: list[tuple[_Slot, int]],
        timeout: float,
    ) -> None:
        """Send the task-management ``functions`` (subtype, LUN, tag) and wait, at most
        ``timeout`` seconds, until they are done and ``stuck`` requests completed."""
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for subtype, lun_bytes, tag in functions:
                    nursery.start_soon(self.task_management, subtype, lun_bytes, tag)
            while self._failure is None and any(_still_in_flight(s, t) for s, t in stuck):
                self._progress = trio.Event()
                await self._progress.wait()
        self._progress = None

    async def task_management(self, subtype: int, lun_bytes: bytes, tag: int = 0) -> int:
        """Send one TMF (``subtype``: ABORT TASK naming the command ``tag``, LOGICAL UNIT
        RESET...) for the LUN ``lun_bytes`` on the control queue; the device's response
        code (:func:`tmf_succeeded` judges it).  Raises NotAvailable without a control
        queue, DeviceGone/HardwareError when the controller failed.  Cancellation: the
        request stays owned by the device until it completes (its slot is freed then)."""
        control = self._control
        if control is None:
            raise NotAvailable("this virtio-scsi controller has no control queue")
        self._raise_if_failed()
        while True:
            slot = next((t for t in control.slots if t.state == _FREE), None)
            if slot is not None:
                break
            if self._tmf_free.is_set():
                self._tmf_free = trio.Event()  # every waiter waits on the same event
            await self._tmf_free.wait()
            self._raise_if_failed()
        mem, bus = self._mem, self._bus
        _TMF_REQ.pack_into(mem, slot.request, VIRTIO_SCSI_T_TMF, subtype, lun_bytes, tag)
        mem[slot.response] = 0xFF
        slot.state = _IN_FLIGHT
        slot.done = trio.Event()
        control.ring.add(
            [Segment(bus + slot.request, _TMF_REQ.size), Segment(bus + slot.response, 16, True)],
            slot,
        )
        control.ring.enable_interrupts()
        old, new = control.ring.publish()
        if control.ring.kick_needed(old, new):
            self.transport.notify(CONTROL_QUEUE)
        self.backend.flush_posted()
        try:
            await slot.done.wait()
        except BaseException:
            if slot.state == _IN_FLIGHT:
                slot.state = _ABANDONED  # the completion path frees it
            raise
        value = slot.value
        slot.state = _FREE
        self._tmf_free.set()
        self._raise_if_failed()
        return value

    def _fail_all(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        for slot in self._slots:
            if slot.state == _IN_FLIGHT:
                slot.error = exc
                slot.state = _COMPLETED
                task = slot.task
                if task is not None:
                    slot.task = None
                    trio.lowlevel.reschedule(task)
        self._slot_lot.unpark_all()
        if self._control is not None:
            for tmf in self._control.slots:
                if tmf.state == _IN_FLIGHT:
                    tmf.value = VIRTIO_SCSI_S_FAILURE
                    tmf.done.set()
        self._tmf_free.set()
        self._event_arrived.set()
        if self._progress is not None:
            self._progress.set()


def _still_in_flight(slot: _Slot, tag: int) -> bool:
    """Whether the command ``tag`` still owns ``slot`` (a slot is reused after it)."""
    return slot.state in (_IN_FLIGHT, _ABANDONED) and slot.tag == tag


def _lun_address(lun_bytes: bytes) -> tuple[int, int]:
    """(target, lun) of an 8-byte virtio-scsi LUN (inverse of :func:`encode_lun`)."""
    return lun_bytes[1], ((lun_bytes[2] & 0x3F) << 8) | lun_bytes[3]


async def read_scsi_config(transport: VirtioTransport) -> VirtioScsiConfig:
    values = {}
    for name, (offset, size) in CONFIG_FIELDS.items():
        values[name] = await transport.config_read(offset, size)
    return VirtioScsiConfig(**values)


async def find_virtio_scsi(backend: Backend) -> PciFunction:
    """The first virtio-scsi function on bus 0; HardwareError when there is none."""
    for function in await enumerate_bus(backend):
        header = function.header
        if header.vendor_id == VIRTIO_PCI_VENDOR and header.device_id in (
            VIRTIO_SCSI_LEGACY_ID,
            VIRTIO_SCSI_MODERN_ID,
        ):
            return function
    raise HardwareError("no virtio-scsi controller (1af4:1004 or 1af4:1048) found on PCI bus 0")


async def _setup_control(
    vt: VirtioTransport, arena: DmaArena, start: int, msix: bool, event_idx: bool
) -> _ControlQueue | None:
    """Set up the control queue (task management) after ``start`` in the arena; None
    when the device has none, the arena has no room, or its MSI-X vector is refused
    (the watchdog then fails a hung controller as a whole)."""
    queue_max = await vt.queue_max_size(CONTROL_QUEUE)
    if queue_max == 0:
        return None
    size = queue_max if vt.queue_size_fixed else min(queue_max, 16)
    layout = RingLayout.contiguous(size, 4096)
    plan = plan_control(start, layout)
    if plan.end > arena.size_bytes:
        return None
    ring: SplitRing[_TmfSlot] = SplitRing(
        arena.view[plan.ring : plan.ring + layout.total_bytes], layout, event_idx=event_idx
    )
    if not await _enable_queue(vt, CONTROL_QUEUE, size, layout, arena.bus_address + plan.ring, msix):
        return None
    return _ControlQueue(ring, plan)


async def _enable_queue(
    vt: VirtioTransport, queue: int, size: int, layout: RingLayout, bus_base: int, msix: bool
) -> bool:
    """Give the device ``queue``'s ring at ``bus_base`` (MSI-X vector 0 when ``msix``);
    False when the device refuses that vector."""
    vector = await vt.setup_queue(
        queue,
        size,
        bus_base + layout.desc_offset,
        bus_base + layout.avail_offset,
        bus_base + layout.used_offset,
        msix_vector=0 if msix else VIRTIO_MSI_NO_VECTOR,
    )
    return not msix or vector == 0


async def _setup_events(
    vt: VirtioTransport, arena: DmaArena, start: int, msix: bool, event_idx: bool
) -> _EventQueue | None:
    """Set up the event queue (hot-plug events) after ``start`` in the arena; None when
    the device has none, the arena has no room or its MSI-X vector is refused."""
    queue_max = await vt.queue_max_size(EVENT_QUEUE)
    if queue_max == 0:
        return None
    size = queue_max if vt.queue_size_fixed else min(queue_max, 16)
    layout = RingLayout.contiguous(size, 4096)
    ring_offset = _align(start, 4096)
    buffers = [ring_offset + _align(layout.total_bytes, 64) + 64 * i for i in range(EVENT_BUFFERS)]
    if buffers[-1] + 64 > arena.size_bytes or size < EVENT_BUFFERS:
        return None
    ring: SplitRing[_EventBuffer] = SplitRing(
        arena.view[ring_offset : ring_offset + layout.total_bytes], layout, event_idx=event_idx
    )
    if not await _enable_queue(vt, EVENT_QUEUE, size, layout, arena.bus_address + ring_offset, msix):
        return None
    return _EventQueue(ring, buffers)


@contextlib.asynccontextmanager
async def open_virtio_scsi(
    backend: Backend,
    *,
    transport: Literal["auto", "legacy", "modern"] = "auto",
    queue_depth: int = 16,
    max_transfer_bytes: int = DEFAULT_MAX_TRANSFER,
    features: int | None = None,
    request_timeout: float | None = 120.0,
) -> AsyncIterator[VirtioScsiController]:
    """Bring up the virtio-scsi controller on ``backend`` and yield it.

    Finds and configures the PCI function, picks the transport ("auto": legacy for the
    transitional 0x1004, modern for 0x1048), negotiates INDIRECT_DESC and EVENT_IDX
    (``features`` overrides the wanted set, for tests), sets up request queue 2 with
    ``queue_depth`` slots of ``max_transfer_bytes`` (capped by the device's
    max_sectors), sets up the control queue (task management) when the arena has room,
    and starts the completion task.  If requests are in flight and none completes for
    ``request_timeout`` seconds (None: wait forever), they are aborted (ABORT TASK; the
    callers get HardwareError saying so) and, if that does not bring them back within
    another ``request_timeout``, their LUNs reset; if even that fails (or there is no
    control queue) the controller gives up: every request fails with DeviceGone, and so
    does every later one (at most about 3 x ``request_timeout`` after the last
    completion).  On exit the device is reset (so it no longer touches the arena) and
    every request still waiting fails with DeviceGone.
    Raises HardwareError/DeviceGone when the device misbehaves or the backend dies.
    """
    if not 1 <= queue_depth <= 256:
        raise UsageError(f"queue_depth must be in 1..256, got {queue_depth}")
    if request_timeout is not None and request_timeout <= 0:
        raise UsageError(f"request_timeout must be positive, got {request_timeout}")
    if max_transfer_bytes < 4096 or max_transfer_bytes % 4096:
        raise UsageError(f"max_transfer_bytes must be a multiple of 4096, got {max_transfer_bytes}")
    if backend._virtio_scsi_claimed:
        raise UsageError("this backend's virtio-scsi controller is already open")
    backend._virtio_scsi_claimed = True
    try:
        async with _open_virtio_scsi(
            backend, transport, queue_depth, max_transfer_bytes, features, request_timeout
        ) as controller:
            yield controller
    finally:
        backend._virtio_scsi_claimed = False


@contextlib.asynccontextmanager
async def _open_virtio_scsi(
    backend: Backend,
    transport: Literal["auto", "legacy", "modern"],
    queue_depth: int,
    max_transfer_bytes: int,
    features: int | None,
    request_timeout: float | None,
) -> AsyncIterator[VirtioScsiController]:
    function = await find_virtio_scsi(backend)
    await configure_function(backend, function)
    vt = open_transport(backend, function, transport)
    wanted = (
        bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_SCSI_F_HOTPLUG)
    )
    accepted = await negotiate(vt, wanted if features is None else features)
    config = await read_scsi_config(vt)
    if config.cdb_size < 6 or config.cdb_size > 255 or config.sense_size > 4096:
        raise HardwareError(f"virtio-scsi config has implausible cdb_size/sense_size: {config}")
    device_max = config.max_sectors * 512 if config.max_sectors else max_transfer_bytes
    max_transfer = min(max_transfer_bytes, device_max) // 4096 * 4096
    if max_transfer < 4096:
        raise HardwareError(f"virtio-scsi max_sectors {config.max_sectors} is below 4 KiB")
    queue_max = await vt.queue_max_size(REQUEST_QUEUE)
    if queue_max == 0:
        raise HardwareError("virtio-scsi request queue 2 is not available")
    queue_size = queue_max if vt.queue_size_fixed else min(queue_max, 256)
    indirect = bool(accepted & bit(VIRTIO_RING_F_INDIRECT_DESC))
    per_request = 1 if indirect else MAX_INDIRECT
    queue_depth = min(queue_depth, queue_size // per_request)
    layout = RingLayout.contiguous(queue_size, 4096)
    arena = backend.arena
    if arena.bus_address % 4096:
        raise HardwareError(f"DMA arena at {arena.bus_address:#x} is not 4096-aligned")
    slot_layouts = plan_arena(
        arena.size_bytes, layout, queue_depth, config.cdb_size, config.sense_size, max_transfer
    )
    ring: SplitRing[_Slot] = SplitRing(
        arena.view[: layout.total_bytes],
        layout,
        event_idx=bool(accepted & bit(VIRTIO_RING_F_EVENT_IDX)),
    )
    slots = [_Slot(i, lay) for i, lay in enumerate(slot_layouts)]
    base = arena.bus_address
    # MSI-X where the backend offers it (VFIO): the request queue signals on vector 0;
    # INTx otherwise, or when the device refuses the vector.
    msix = await backend.enable_msix(function.devfn)
    vt.set_msix(msix)
    vector = await vt.setup_queue(
        REQUEST_QUEUE,
        queue_size,
        base + layout.desc_offset,
        base + layout.avail_offset,
        base + layout.used_offset,
        msix_vector=0,
    )
    if not msix or vector != 0:
        await backend.enable_interrupts(function.devfn)
        vt.set_msix(False)
        msix = False
    ring.enable_interrupts()
    control_start = slot_layouts[-1].data + max_transfer
    control = await _setup_control(vt, arena, control_start, msix, ring.event_idx)
    events = None
    if accepted & bit(VIRTIO_SCSI_F_HOTPLUG):
        events_start = control_start if control is None else control.end
        events = await _setup_events(vt, arena, events_start, msix, ring.event_idx)
    await driver_ok(vt)
    controller = VirtioScsiController(
        backend, vt, config, accepted, ring, slots, max_transfer, control, events
    )
    if events is not None:
        # Give the device every event buffer (after DRIVER_OK: it may notify now).
        for buffer in events.buffers:
            events.ring.add([Segment(arena.bus_address + buffer.offset, _EVENT.size, True)], buffer)
        events.ring.enable_interrupts()
        events.ring.publish()
        vt.notify(EVENT_QUEUE)
        await backend.sync()
    # The body's exception is re-raised outside the nursery (not in an ExceptionGroup).
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(controller._completion_loop)
        if request_timeout is not None:
            nursery.start_soon(controller._watchdog, request_timeout)
        try:
            yield controller
        except BaseException as exc:
            body_error = exc
        finally:
            with trio.CancelScope(shield=True):
                if not backend.dead:
                    with trio.move_on_after(2), contextlib.suppress(DeviceGone, HardwareError):
                        await vt.reset()
            controller._fail_all(DeviceGone("the virtio-scsi controller was closed"))
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
