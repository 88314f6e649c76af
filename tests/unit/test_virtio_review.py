"""Review of the publish-while-in-flight ring protocol: a device that only wakes on a
kick and a driver that only harvests on an interrupt (or when enable_interrupts says
entries wait) move more than 65536 requests across the 16-bit index wrap; a missed
kick or interrupt stalls the run, a double or lost completion fails the count."""

from __future__ import annotations

import random

from amigafuse.driver.virtio.ring import Segment
from tests.unit.test_virtio_ring import make


def test_long_run_over_index_wrap_no_missed_kick_or_interrupt() -> None:
    rng = random.Random(2)
    _bus, _layout, ring, dev = make(16, start=0xFFF0)
    next_token = 0
    completed: set[int] = set()
    device_awake = False  # it sleeps until kicked, having set avail_event
    irq = False
    total = 70_000
    steps = 0
    while len(completed) < total:
        steps += 1
        assert steps < 10 * total, "stalled: a kick or an interrupt was lost"
        # driver: submit a few, publishing each at once while others are in flight
        for _ in range(rng.randint(0, 4)):
            if next_token >= total or ring.num_free == 0:
                break
            ring.add([Segment(0x9000, 16)], next_token)
            next_token += 1
            if rng.random() < 0.6:  # sometimes several adds share one publish
                old, new = ring.publish()
                if ring.kick_needed(old, new):
                    device_awake = True
        old, new = ring.publish()  # the end of the batch publishes the rest
        if ring.kick_needed(old, new):
            device_awake = True
        # device: when awake, take what is published, then sleep (avail_event set)
        if device_awake:
            dev.consume()
            device_awake = False
        # device: complete some, in any order
        for _ in range(rng.randint(0, len(dev.taken))):
            if dev.complete(rng.randrange(len(dev.taken)), 0):
                irq = True
        # driver: harvest only on an interrupt, then re-arm with coalescing
        if irq:
            irq = False
            while True:
                for token, _written in ring.harvest():
                    assert token not in completed, f"token {token} completed twice"
                    completed.add(token)
                after = (ring.in_flight - 1) // 4 if ring.in_flight else 0
                if not ring.enable_interrupts(after):
                    break
    assert completed == set(range(total))
    assert ring.in_flight == 0 and ring.num_free == 16
