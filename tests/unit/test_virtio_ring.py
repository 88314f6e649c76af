"""The pure split virtqueue, against a simulated device that reads the ring memory the
way a device does (descriptor walk, INDIRECT tables, avail/used rings, event indices)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from amigafuse.driver.virtio.ring import (
    DESC_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    RingLayout,
    Segment,
    SplitRing,
    vring_need_event,
)
from amigafuse.errors import HardwareError

U16 = struct.Struct("<H")


class FakeDevice:
    """The device side, reading the same bytes (bus address = offset in ``bus``)."""

    def __init__(self, bus: bytearray, layout: RingLayout, base: int, start: int = 0) -> None:
        self.bus = bus
        self.layout = layout
        self.base = base
        self.size = layout.queue_size
        self.last_avail = start
        self.used_idx = start
        self.taken: list[tuple[int, list[Segment]]] = []  # heads the device holds

    def _u16(self, offset: int) -> int:
        value: int = U16.unpack_from(self.bus, self.base + offset)[0]
        return value

    def avail_idx(self) -> int:
        return self._u16(self.layout.avail_offset + 2)

    def avail_flags(self) -> int:
        return self._u16(self.layout.avail_offset)

    def used_event(self) -> int:
        return self._u16(self.layout.avail_offset + 4 + 2 * self.size)

    def set_avail_event(self, value: int) -> None:
        U16.pack_into(self.bus, self.base + self.layout.used_offset + 4 + 8 * self.size, value)

    def set_used_flags(self, value: int) -> None:
        U16.pack_into(self.bus, self.base + self.layout.used_offset, value)

    def _walk(self, table_addr: int, index: int, limit: int, allow_indirect: bool) -> list[Segment]:
        segments = []
        for _ in range(limit + 1):
            addr, length, flags, nxt = struct.unpack_from(
                "<QIHH", self.bus, table_addr + DESC_SIZE * index
            )
            if flags & VRING_DESC_F_INDIRECT:
                assert allow_indirect and not flags & VRING_DESC_F_NEXT
                assert length % DESC_SIZE == 0 and length > 0
                return self._walk(addr, 0, length // DESC_SIZE - 1, False)
            segments.append(Segment(addr, length, bool(flags & VRING_DESC_F_WRITE)))
            if not flags & VRING_DESC_F_NEXT:
                return segments
            assert nxt < limit + 1 or not allow_indirect
            index = nxt
        raise AssertionError("descriptor chain loops")

    def consume(self) -> list[tuple[int, list[Segment]]]:
        """Take every published avail entry (as QEMU's virtqueue_pop does)."""
        got = []
        while self.last_avail != self.avail_idx():
            slot = self.layout.avail_offset + 4 + 2 * (self.last_avail % self.size)
            head = self._u16(slot)
            assert 0 <= head < self.size
            segs = self._walk(self.base + self.layout.desc_offset, head, self.size - 1, True)
            got.append((head, segs))
            self.taken.append((head, segs))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        self.set_avail_event(self.last_avail)
        return got

    def complete(self, position: int, written: int) -> bool:
        """Return taken entry ``position`` as used; True when an interrupt is due."""
        head, _ = self.taken.pop(position)
        off = self.base + self.layout.used_offset + 4 + 8 * (self.used_idx % self.size)
        struct.pack_into("<II", self.bus, off, head, written)
        old = self.used_idx
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        U16.pack_into(self.bus, self.base + self.layout.used_offset + 2, self.used_idx)
        return vring_need_event(self.used_event(), self.used_idx, old)


def make(queue_size: int = 8, *, event_idx: bool = True, start: int = 0):  # type: ignore[no-untyped-def]
    layout = RingLayout.contiguous(queue_size)
    base = 0x1000
    bus = bytearray(0x40000)
    ring: SplitRing[int] = SplitRing(
        memoryview(bus)[base : base + layout.total_bytes],
        layout,
        event_idx=event_idx,
        start_index=start,
    )
    dev = FakeDevice(bus, layout, base, start)
    dev.set_avail_event(start)  # a device that has seen everything up to ``start``
    ring.enable_interrupts()
    return bus, layout, ring, dev


def test_layout_legacy_alignment() -> None:
    layout = RingLayout.contiguous(256)
    assert (layout.desc_offset, layout.avail_offset) == (0, 4096)
    assert layout.used_offset == 8192 and layout.used_offset % 4096 == 0
    assert layout.total_bytes == 12288
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError):
            RingLayout.contiguous(bad)


def test_need_event_known_values() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(5, 6, 0)
    assert not vring_need_event(5, 7, 6)
    assert vring_need_event(0xFFFF, 0, 0xFFFE)  # across the wrap
    assert not vring_need_event(3, 3, 3)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(1, 300))
def test_need_event_is_passing_the_event_index(event: int, old: int, step: int) -> None:
    new = (old + step) & 0xFFFF
    passed = any(((old + k) & 0xFFFF) == event for k in range(step))
    assert vring_need_event(event, new, old) == passed


def test_direct_chain_round_trip() -> None:
    _bus, _layout, ring, dev = make()
    segs = [Segment(0x9000, 19 + 32), Segment(0xA000, 108, True), Segment(0xB000, 4096, True)]
    head = ring.add(segs, 7)
    assert dev.consume() == []  # not yet published
    old, new = ring.publish()
    assert (old, new) == (0, 1)
    assert ring.kick_needed(old, new)  # avail_event 0: the device wants to hear of idx 0
    assert dev.consume() == [(head, segs)]
    assert ring.num_free == 8 - 3 and ring.in_flight == 1
    assert dev.complete(0, 108 + 4096)  # used_event 0: interrupt on the first completion
    assert ring.harvest() == [(7, 108 + 4096)]
    assert ring.num_free == 8 and ring.in_flight == 0


def test_indirect_uses_one_descriptor_and_the_callers_table() -> None:
    bus, _layout, ring, dev = make(4)
    table_addr = 0x8000
    table = memoryview(bus)[table_addr : table_addr + 4 * DESC_SIZE]
    segs = [Segment(0x9000, 51), Segment(0x9100, 512), Segment(0x9200, 108, True)]
    for token in range(4):
        ring.add_indirect(segs, table, table_addr, token)
    assert ring.num_free == 0
    with pytest.raises(ValueError):
        ring.add_indirect(segs, table, table_addr, 99)
    ring.publish()
    got = dev.consume()
    assert [s for _, s in got] == [segs] * 4
    for _ in range(4):
        dev.complete(len(dev.taken) - 1, 108)
    assert sorted(t for t, _ in ring.harvest()) == [0, 1, 2, 3]
    assert ring.num_free == 4


def test_kick_suppression_with_event_idx() -> None:
    _bus, _layout, ring, dev = make()
    ring.add([Segment(0x9000, 16)], 1)
    old, new = ring.publish()
    assert ring.kick_needed(old, new)
    dev.consume()  # avail_event = 1: the device wants to hear when idx passes 1
    dev.set_avail_event(0)  # ...pretend it is still busy with entry 0 (no new kick needed)
    ring.add([Segment(0x9000, 16)], 2)
    old, new = ring.publish()
    assert not ring.kick_needed(old, new)
    dev.set_avail_event(2)
    ring.add([Segment(0x9000, 16)], 3)
    old, new = ring.publish()
    assert ring.kick_needed(old, new)
    assert not ring.kick_needed(new, new)


def test_legacy_flags_without_event_idx() -> None:
    _bus, _layout, ring, dev = make(event_idx=False)
    ring.add([Segment(0x9000, 16)], 1)
    old, new = ring.publish()
    assert ring.kick_needed(old, new)
    dev.set_used_flags(VRING_USED_F_NO_NOTIFY)
    assert not ring.kick_needed(old, new)
    ring.disable_interrupts()
    assert dev.avail_flags() == VRING_AVAIL_F_NO_INTERRUPT
    assert ring.enable_interrupts() is False
    assert dev.avail_flags() == 0


def test_interrupt_coalescing_through_used_event() -> None:
    _bus, _layout, ring, dev = make()
    for token in range(4):
        ring.add([Segment(0x9000, 16, True)], token)
    ring.publish()
    dev.consume()
    ring.enable_interrupts(after=3)  # one interrupt for four completions
    assert [dev.complete(0, 16) for _ in range(4)] == [False, False, False, True]
    assert [t for t, _ in ring.harvest()] == [0, 1, 2, 3]
    assert ring.enable_interrupts() is False
    assert ring.used_event() == ring.last_used_idx


def test_hostile_used_entries_break_the_ring() -> None:
    bus, layout, ring, dev = make()
    ring.add([Segment(0x9000, 16)], 1)
    ring.publish()
    dev.consume()
    dev.complete(0, 16)
    # rewrite the used entry to name a descriptor that is not in flight
    struct.pack_into("<II", bus, 0x1000 + layout.used_offset + 4, 5, 16)
    with pytest.raises(HardwareError, match="descriptor 5"):
        ring.harvest()
    with pytest.raises(HardwareError):
        ring.add([Segment(0x9000, 16)], 2)

    bus, layout, ring, dev = make()
    U16.pack_into(bus, 0x1000 + layout.used_offset + 2, 3)  # 3 used, none in flight
    with pytest.raises(HardwareError, match="ahead"):
        ring.harvest()


def test_add_rejects_what_does_not_fit() -> None:
    _bus, _layout, ring, _dev = make(4)
    with pytest.raises(ValueError):
        ring.add([], 1)
    with pytest.raises(ValueError):
        ring.add([Segment(0, 1)] * 5, 1)
    assert ring.num_free == 4


class RingMachine(RuleBasedStateMachine):
    """Random submit / publish / consume / complete / harvest sequences, starting near
    the 16-bit wrap, checked against a model: no descriptor leaks or double use, every
    completion matched to its own request with its own length."""

    def __init__(self) -> None:
        super().__init__()
        self.ring: SplitRing[int] | None = None

    @precondition(lambda self: self.ring is None)
    @rule(
        size=st.sampled_from([1, 2, 4, 8, 16]),
        start=st.sampled_from([0, 0xFFF0, 0xFFFF, 12345]),
        event_idx=st.booleans(),
    )
    def setup(self, size: int, start: int, event_idx: bool) -> None:
        self.bus, self.layout, self.ring, self.dev = make(size, event_idx=event_idx, start=start)
        self.size = size
        self.next_token = 0
        self.expected: dict[int, list[Segment]] = {}  # token -> segments submitted
        self.unpublished: list[int] = []
        self.device_tokens: dict[int, int] = {}  # head -> token while the device holds it
        self.completed: dict[int, int] = {}  # token -> written, not yet harvested
        self.submitted_heads: dict[int, int] = {}  # token -> head
        self.table_base = 0x20000

    @precondition(lambda self: self.ring is not None)
    @rule(
        count=st.integers(1, 4),
        indirect=st.sampled_from(["direct", "indirect", "prepared"]),
        lengths=st.lists(st.integers(1, 1 << 20), min_size=4, max_size=4),
    )
    def submit(self, count: int, indirect: str, lengths: list[int]) -> None:
        assert self.ring is not None
        need = 1 if indirect != "direct" else count
        assume(self.ring.num_free >= need)
        token = self.next_token
        self.next_token += 1
        segs = [
            Segment(0x100000 + 0x1000 * i, lengths[i], i >= count // 2 and i > 0)
            for i in range(count)
        ]
        if indirect == "indirect":
            addr = self.table_base + 0x100 * (token % 256)
            assume(all(addr != self.table_base + 0x100 * (t % 256) for t in self.expected))
            head = self.ring.add_indirect(
                segs, memoryview(self.bus)[addr : addr + 0x100], addr, token
            )
        elif indirect == "prepared":  # the caller writes the table itself
            addr = self.table_base + 0x100 * (token % 256)
            assume(all(addr != self.table_base + 0x100 * (t % 256) for t in self.expected))
            for i, seg in enumerate(segs):
                flags = (VRING_DESC_F_WRITE if seg.device_writes else 0) | (
                    VRING_DESC_F_NEXT if i + 1 < count else 0
                )
                nxt = i + 1 if i + 1 < count else 0
                struct.pack_into(
                    "<QIHH", self.bus, addr + DESC_SIZE * i, seg.address, seg.length, flags, nxt
                )
            head = self.ring.add_indirect_table(addr, count, token)
        else:
            head = self.ring.add(segs, token)
        assert head not in self.submitted_heads.values()
        self.submitted_heads[token] = head
        self.expected[token] = segs
        self.unpublished.append(token)

    @precondition(lambda self: self.ring is not None)
    @rule()
    def publish(self) -> None:
        assert self.ring is not None
        old, new = self.ring.publish()
        assert (new - old) & 0xFFFF == len(self.unpublished)
        if self.ring.event_idx and self.unpublished and self.dev.last_avail == old:
            # the device has consumed everything published before: it wants a kick
            assert self.ring.kick_needed(old, new)
        self.unpublished = []

    @precondition(lambda self: self.ring is not None)
    @rule()
    def device_consumes(self) -> None:
        by_head = {h: t for t, h in self.submitted_heads.items()}
        for head, segs in self.dev.consume():
            token = by_head[head]
            assert segs == self.expected[token], "device saw another request's buffers"
            assert head not in self.device_tokens
            self.device_tokens[head] = token

    @precondition(lambda self: self.ring is not None and self.dev.taken)
    @rule(data=st.data())
    def device_completes(self, data: st.DataObject) -> None:
        position = data.draw(st.integers(0, len(self.dev.taken) - 1))
        head = self.dev.taken[position][0]
        token = self.device_tokens.pop(head)
        written = sum(s.length for s in self.expected[token] if s.device_writes)
        self.dev.complete(position, written)
        self.completed[token] = written

    @precondition(lambda self: self.ring is not None)
    @rule()
    def harvest(self) -> None:
        assert self.ring is not None
        got = self.ring.harvest()
        tokens = [t for t, _ in got]
        assert len(set(tokens)) == len(tokens)
        assert sorted(tokens) == sorted(self.completed)
        for token, written in got:
            assert self.completed.pop(token) == written
            del self.expected[token]
            del self.submitted_heads[token]
        assert not self.ring.enable_interrupts()

    @invariant()
    def descriptors_accounted(self) -> None:
        if self.ring is None:
            return
        free = self.ring._free
        assert len(set(free)) == len(free)
        in_chains = [d for chain in self.ring._chains.values() for d in chain]
        assert len(set(in_chains)) == len(in_chains)
        assert not set(free) & set(in_chains)
        assert len(free) + len(in_chains) == self.size
        assert self.ring.in_flight == len(self.expected)


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
