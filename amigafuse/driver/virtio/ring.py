"""A split virtqueue (virtio 1.x §2.7; legacy §2.7 with 4096 alignment), pure.

No I/O and no trio: the ring is bookkeeping over a memoryview the device shares
(``mem``), written little-endian.  The transport publishes its addresses and sends the
notifications this module says are needed.

Invariants (checked by tests/unit/test_virtio_ring.py, including a state machine):

* A descriptor is either on the free list or part of exactly one in-flight chain; a
  chain returns to the free list only when the device returned its head in the used
  ring.  ``num_free + sum(chain lengths in flight) == queue_size`` always.
* Every used-ring entry is checked: an id that is not the head of an in-flight chain
  (out of range, free, duplicate) raises HardwareError instead of corrupting the free
  list; the ring then refuses further use (``broken``).
* 16-bit indices wrap: ``avail_idx`` and ``last_used_idx`` are kept modulo 2**16.
* With VIRTIO_RING_F_EVENT_IDX, kicks are suppressed with ``vring_need_event`` over the
  device's ``avail_event``, and interrupts are requested by writing ``used_event``.
* Memory ordering: the device runs on another CPU.  x86 keeps stores in order and loads
  in order, but lets a load pass an earlier store (the store buffer).  So a full fence
  stands between storing ``avail->idx`` and loading the device's suppression state, and
  between storing ``used_event`` and loading ``used->idx`` (virtio's virtio_mb()); without
  it both sides can decide the other will act, and a request waits forever.
* Every 16-bit ring field the device may read or write while we run (indices, flags,
  events, avail entries) is stored and loaded as ONE 16-bit access through a ``'H'``
  view.  ``struct.pack_into`` writes byte by byte: QEMU once read a torn ``avail->idx``
  crossing a 256 boundary (0x01FF -> 0x0100 half-written), took it for 65,000 new
  requests and stopped with "Virtqueue size exceeded".
"""

from __future__ import annotations

import struct
import sys
import threading
from dataclasses import dataclass
from typing import Generic, TypeVar

from amigafuse.errors import HardwareError

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

T = TypeVar("T")

_FENCE_LOCK = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: CPython's lock acquire is an atomic read-modify-write
    (a locked instruction on x86), which no load or store crosses."""
    with _FENCE_LOCK:
        pass


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True when moving an index from ``old_idx`` to ``new_idx`` passes ``event_idx``
    (all modulo 2**16): the other side asked to be told about this step."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass(frozen=True)
class RingLayout:
    """Byte offsets of the three parts inside one ring memory area."""

    queue_size: int
    desc_offset: int
    avail_offset: int
    used_offset: int
    total_bytes: int

    @classmethod
    def contiguous(cls, queue_size: int, align: int = 4096) -> RingLayout:
        """The legacy layout (usable by modern devices too): descriptors, then the avail
        ring with its used_event, then the used ring aligned to ``align``."""
        if queue_size <= 0 or queue_size > 32768 or queue_size & (queue_size - 1):
            raise ValueError(f"queue size {queue_size} is not a power of two in 1..32768")
        desc = 0
        avail = desc + DESC_SIZE * queue_size
        avail_end = avail + 4 + 2 * queue_size + 2
        used = (avail_end + align - 1) & ~(align - 1)
        used_end = used + 4 + 8 * queue_size + 2
        total = (used_end + align - 1) & ~(align - 1)
        return cls(queue_size, desc, avail, used, total)


@dataclass(frozen=True)
class Segment:
    """One buffer of a request: bus ``address``, ``length`` bytes, written by the device
    when ``device_writes``."""

    address: int
    length: int
    device_writes: bool = False


class SplitRing(Generic[T]):
    """Driver side of one split virtqueue over ``mem`` (see the module docstring).

    ``mem`` must be ``layout.total_bytes`` long (or longer) and is zeroed here.  Tokens
    (any object, e.g. a request slot) come back from :meth:`harvest` with the number of
    bytes the device wrote.
    """

    def __init__(
        self, mem: memoryview, layout: RingLayout, *, event_idx: bool, start_index: int = 0
    ) -> None:
        if len(mem) < layout.total_bytes:
            raise ValueError(f"ring memory of {len(mem)} bytes < {layout.total_bytes} needed")
        self.mem = mem
        self.layout = layout
        self.size = layout.queue_size
        self.event_idx = event_idx
        mem[: layout.total_bytes] = bytes(layout.total_bytes)
        if sys.byteorder != "little":
            raise NotImplementedError("the split ring's 16-bit view assumes a little-endian host")
        if layout.total_bytes % 2 or layout.avail_offset % 2 or layout.used_offset % 2:
            raise ValueError("ring layout offsets must be even for 16-bit accesses")
        self._words = mem[: layout.total_bytes].cast("B").cast("H")
        self._desc = layout.desc_offset
        self._avail_flags = layout.avail_offset
        self._avail_idx_off = layout.avail_offset + 2
        self._avail_ring = layout.avail_offset + 4
        self._used_event_off = layout.avail_offset + 4 + 2 * self.size
        self._used_flags = layout.used_offset
        self._used_idx_off = layout.used_offset + 2
        self._used_ring = layout.used_offset + 4
        self._avail_event_off = layout.used_offset + 4 + 8 * self.size
        self._free: list[int] = list(range(self.size - 1, -1, -1))
        self._chains: dict[int, list[int]] = {}
        self._tokens: dict[int, T] = {}
        # A device after reset starts at index 0; ``start_index`` (with the device's
        # indices set to match) lets tests exercise the 16-bit wraparound.
        start = start_index & 0xFFFF
        self.avail_idx = start  # next avail index we will fill (shadow of avail->idx)
        self.published_idx = start  # avail->idx as the device sees it
        self.last_used_idx = start  # next used index we will consume
        self._store16(self._avail_idx_off, start)
        self._store16(self._used_idx_off, start)
        self.broken: str | None = None

    # ------------------------------------------------------------------ state

    def _store16(self, byte_offset: int, value: int) -> None:
        """One 16-bit store (little-endian host), never two byte stores."""
        self._words[byte_offset >> 1] = value

    def _load16(self, byte_offset: int) -> int:
        value: int = self._words[byte_offset >> 1]
        return value

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._tokens)

    def in_flight_tokens(self) -> list[T]:
        return list(self._tokens.values())

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise HardwareError(f"virtqueue unusable: {self.broken}")

    # ------------------------------------------------------------------ submit

    def _write_desc(self, offset: int, address: int, length: int, flags: int, nxt: int) -> None:
        _DESC.pack_into(self.mem, offset, address, length, flags, nxt)

    def _push_avail(self, head: int, token: T) -> None:
        self._store16(self._avail_ring + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._tokens[head] = token

    def add(self, segments: list[Segment], token: T) -> int:
        """Queue a direct chain of ``segments`` (device-readable ones first).  Not yet
        visible to the device: call :meth:`publish`.  Returns the head descriptor.
        Raises ValueError when there are not enough free descriptors."""
        self._check_usable()
        count = len(segments)
        if count == 0:
            raise ValueError("a request needs at least one segment")
        if count > len(self._free):
            raise ValueError(f"{count} descriptors needed, {len(self._free)} free")
        chain = [self._free.pop() for _ in range(count)]
        for position, seg in enumerate(segments):
            flags = VRING_DESC_F_WRITE if seg.device_writes else 0
            nxt = 0
            if position + 1 < count:
                flags |= VRING_DESC_F_NEXT
                nxt = chain[position + 1]
            self._write_desc(
                self._desc + DESC_SIZE * chain[position], seg.address, seg.length, flags, nxt
            )
        self._chains[chain[0]] = chain
        self._push_avail(chain[0], token)
        return chain[0]

    def add_indirect(
        self, segments: list[Segment], table: memoryview, table_address: int, token: T
    ) -> int:
        """Queue ``segments`` through one INDIRECT descriptor whose table the caller owns:
        ``table`` (at bus address ``table_address``, at least 16 bytes per segment) must
        stay untouched until the token is harvested."""
        self._check_usable()
        count = len(segments)
        if count == 0:
            raise ValueError("a request needs at least one segment")
        if len(table) < DESC_SIZE * count:
            raise ValueError(f"indirect table of {len(table)} bytes < {DESC_SIZE * count}")
        if not self._free:
            raise ValueError("no free descriptor")
        for position, seg in enumerate(segments):
            flags = VRING_DESC_F_WRITE if seg.device_writes else 0
            nxt = 0
            if position + 1 < count:
                flags |= VRING_DESC_F_NEXT
                nxt = position + 1
            _DESC.pack_into(table, DESC_SIZE * position, seg.address, seg.length, flags, nxt)
        head = self._free.pop()
        self._write_desc(
            self._desc + DESC_SIZE * head,
            table_address,
            DESC_SIZE * count,
            VRING_DESC_F_INDIRECT,
            0,
        )
        self._chains[head] = [head]
        self._push_avail(head, token)
        return head

    def add_indirect_table(self, table_address: int, count: int, token: T) -> int:
        """Queue a request whose indirect table of ``count`` descriptors the caller has
        already written at ``table_address`` (the fast path of :meth:`add_indirect`)."""
        if self.broken is not None:
            self._check_usable()
        if not self._free:
            raise ValueError("no free descriptor")
        head = self._free.pop()
        _DESC.pack_into(
            self.mem, self._desc + DESC_SIZE * head, table_address, DESC_SIZE * count,
            VRING_DESC_F_INDIRECT, 0,
        )  # fmt: skip
        self._chains[head] = [head]
        self._store16(self._avail_ring + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._tokens[head] = token
        return head

    def publish(self) -> tuple[int, int]:
        """Make every added chain visible (write avail->idx).  Returns (old, new) index
        for :meth:`kick_needed`."""
        old = self.published_idx
        new = self.avail_idx
        self._store16(self._avail_idx_off, new)
        self.published_idx = new
        return old, new

    def kick_needed(self, old_idx: int, new_idx: int) -> bool:
        """Whether the device must be notified after publishing ``old_idx..new_idx``
        (read the device's suppression state *after* publishing)."""
        if old_idx == new_idx:
            return False
        full_fence()  # our avail->idx store must be visible before we read avail_event
        if self.event_idx:
            avail_event = self._load16(self._avail_event_off)
            return vring_need_event(avail_event, new_idx, old_idx)
        flags = self._load16(self._used_flags)
        return not flags & VRING_USED_F_NO_NOTIFY

    # ------------------------------------------------------------------ complete

    def used_idx(self) -> int:
        """The device's used->idx."""
        value: int = self._load16(self._used_idx_off)
        return value

    def has_used(self) -> bool:
        return self.used_idx() != self.last_used_idx

    def harvest(self) -> list[tuple[T, int]]:
        """Consume every new used entry: free its chain, return (token, written_bytes).
        Raises HardwareError (and marks the ring broken) on an entry that does not name
        an in-flight head, or when the device claims more entries than are in flight."""
        self._check_usable()
        used = self.used_idx()
        pending = (used - self.last_used_idx) & 0xFFFF
        if pending > len(self._tokens):
            self.broken = f"used->idx {used} is {pending} ahead of {self.last_used_idx} with {len(self._tokens)} in flight"
            raise HardwareError(f"virtqueue unusable: {self.broken}")
        out: list[tuple[T, int]] = []
        for _ in range(pending):
            head, length = _USED_ELEM.unpack_from(
                self.mem, self._used_ring + 8 * (self.last_used_idx % self.size)
            )
            chain = self._chains.pop(head, None)
            if chain is None:
                self.broken = f"used entry names descriptor {head}, which is not in flight"
                raise HardwareError(f"virtqueue unusable: {self.broken}")
            self._free.extend(chain)
            out.append((self._tokens.pop(head), length))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        return out

    def enable_interrupts(self, after: int = 0) -> bool:
        """Ask for an interrupt once more entries are used.

        With EVENT_IDX the interrupt is requested when the used index passes
        ``last_used_idx + after`` (``after`` = 0: at the next completion; larger values
        coalesce completions, and must stay below the number in flight or no interrupt
        comes).  Returns True when entries are already waiting (harvest again: their
        interrupt may have been suppressed).
        """
        if self.event_idx:
            self._store16(self._used_event_off, (self.last_used_idx + after) & 0xFFFF)
        else:
            self._store16(self._avail_flags, 0)
        full_fence()  # used_event must be visible before we look at used->idx again
        return self.has_used()

    def disable_interrupts(self) -> None:
        """Hint the device not to interrupt (legacy flag; with EVENT_IDX a no-op, since
        used_event already lies behind)."""
        if not self.event_idx:
            self._store16(self._avail_flags, VRING_AVAIL_F_NO_INTERRUPT)

    def used_event(self) -> int:
        value: int = self._load16(self._used_event_off)
        return value
