"""Pure parts of the VirtIO layer: feature choice, capability decoding, virtio-scsi
request/response codecs and DMA arena planning, the QEMU command line."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.driver.backends.qtest import QemuDisk, qemu_command
from amigafuse.driver.pci import Capability
from amigafuse.driver.virtio.device import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    bit,
    choose_features,
    describe_features,
)
from amigafuse.driver.virtio.ring import RingLayout
from amigafuse.driver.virtio.scsi import (
    encode_lun,
    pack_cmd_req,
    plan_arena,
    unpack_cmd_resp,
)
from amigafuse.driver.virtio.transport import CAP_NOTIFY_CFG, parse_virtio_capability
from amigafuse.errors import HardwareError, UsageError

WANT = bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX)


def test_features_legacy_and_modern() -> None:
    offered = WANT | bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_ACCESS_PLATFORM) | 0x7
    assert choose_features(offered, WANT, modern=False) == WANT
    modern = choose_features(offered, WANT, modern=True)
    assert modern == WANT | bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_ACCESS_PLATFORM)
    assert choose_features(bit(VIRTIO_F_VERSION_1), WANT, modern=True) == bit(VIRTIO_F_VERSION_1)
    with pytest.raises(HardwareError, match="VERSION_1"):
        choose_features(WANT, WANT, modern=True)
    assert describe_features(modern) == "INDIRECT_DESC,EVENT_IDX,VERSION_1,ACCESS_PLATFORM"


def test_virtio_capability_decoding() -> None:
    body = bytearray(40)
    body[0:5] = bytes([9, 0, 20, CAP_NOTIFY_CFG, 4])
    struct.pack_into("<III", body, 8, 0x3000, 0x1000, 4)
    assert parse_virtio_capability(Capability(0x84, 9, bytes(body))) == (2, 4, 0x3000, 0x1000, 4)
    body[2] = 16  # a notify capability without its multiplier
    with pytest.raises(HardwareError, match="too short"):
        parse_virtio_capability(Capability(0x84, 9, bytes(body)))
    body[2] = 8
    with pytest.raises(HardwareError, match="< 16"):
        parse_virtio_capability(Capability(0x84, 9, bytes(body)))


def test_lun_and_request_header() -> None:
    assert encode_lun(3, 0) == bytes([1, 3, 0x40, 0, 0, 0, 0, 0])
    assert encode_lun(7, 0x123) == bytes([1, 7, 0x41, 0x23, 0, 0, 0, 0])
    with pytest.raises(UsageError):
        encode_lun(0, 16384)
    req = pack_cmd_req(2, 0, 0x1122334455667788, b"\x28" + bytes(9), 32)
    assert len(req) == 8 + 8 + 3 + 32
    assert req[8:16] == struct.pack("<Q", 0x1122334455667788)
    assert req[19] == 0x28 and req[20:] == bytes(31)
    with pytest.raises(UsageError, match="cdb_size"):
        pack_cmd_req(0, 0, 0, bytes(33), 32)


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(min_size=96, max_size=96),
    st.integers(0, 1 << 20),
)
def test_response_is_clamped(
    sense_len: int, residual: int, status: int, response: int, sense: bytes, data_len: int
) -> None:
    buf = struct.pack("<IIHBB", sense_len, residual, 0, status, response) + sense
    got_response, got_status, got_sense, got_residual = unpack_cmd_resp(buf, 96, data_len)
    assert (got_response, got_status) == (response, status)
    assert got_sense == sense[: min(sense_len, 96)]
    assert got_residual == min(residual, data_len)


def test_arena_plan_is_disjoint_and_bounded() -> None:
    ring = RingLayout.contiguous(256)
    slots = plan_arena(64 << 20, ring, 16, 32, 96, 1 << 20)
    spans = [(0, ring.total_bytes)]
    for s in slots:
        spans += [(s.table, s.table + 64), (s.request, s.request + 51)]
        spans += [(s.response, s.response + 108), (s.data, s.data + (1 << 20))]
        assert s.data % 4096 == 0
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert spans[-1][1] <= 64 << 20
    with pytest.raises(UsageError, match="too small"):
        plan_arena(8 << 20, ring, 16, 32, 96, 1 << 20)


def test_qemu_command_line() -> None:
    disks = [
        QemuDisk("/img/a,b.img", read_only=True),
        QemuDisk(
            "/img/c.img", logical_block_size=4096, target=5, blkdebug_errors=[("read_aio", 8, 5)]
        ),
    ]
    cmd = qemu_command(
        disks,
        socket_path="/t/s",
        shm_path="/dev/shm/x",
        ram_mib=64,
        device="modern",
        blkdebug_dir="/tmp",
    )
    line = " ".join(cmd)
    for piece in (
        "-M q35,memory-backend=mem",
        "mem-path=/dev/shm/x,share=on",
        "-accel tcg -S -qtest unix:/t/s -qtest-log /dev/null",
        "-display none -nodefaults",
        "virtio-scsi-pci-non-transitional,id=scsi0,addr=04.0",
        "file=/img/a,,b.img",
        "readonly=on",
        "rerror=report,werror=report,cache=writeback,aio=threads",
        "scsi-id=5",
        "logical_block_size=4096,physical_block_size=4096",
        "file=blkdebug:/tmp/blkdebug1.conf:/img/c.img",
    ):
        assert piece in line, piece
    assert 'event = "read_aio"' in (disks[1].blkdebug_config() or "")
    with pytest.raises(UsageError, match="target"):
        qemu_command(
            [QemuDisk("/a"), QemuDisk("/b", target=0)], socket_path="s", shm_path="m", ram_mib=64
        )
    with pytest.raises(UsageError, match="at most 8"):
        qemu_command([QemuDisk("/a")] * 9, socket_path="s", shm_path="m", ram_mib=64)


# ----------------------------------------------------------------------------- events


@given(st.binary(min_size=16, max_size=16))
def test_scsi_event_codec_round_trip(raw: bytes) -> None:
    from amigafuse.driver.virtio.scsi import ScsiEvent

    assert ScsiEvent.unpack(raw).pack() == raw


async def test_next_event_hands_out_events_in_order_and_reports_overflow() -> None:
    import collections
    import types

    import trio
    import trio.testing

    from amigafuse.driver.virtio.scsi import (
        MAX_KEPT_EVENTS,
        VIRTIO_SCSI_T_TRANSPORT_RESET,
        ControllerStats,
        ScsiEvent,
        VirtioScsiController,
        encode_lun,
    )

    # Only the event bookkeeping of a controller (no device): what the completion path
    # does on each event is append it and count it.
    ctl = VirtioScsiController.__new__(VirtioScsiController)
    ctl.backend = types.SimpleNamespace(dead=False)  # type: ignore[assignment]
    ctl._failure = None
    ctl._events = object()  # type: ignore[assignment]
    ctl.events = collections.deque(maxlen=MAX_KEPT_EVENTS)
    ctl.stats = ControllerStats()
    ctl._events_read = 0
    ctl._event_arrived = trio.Event()

    def arrive(target: int) -> None:
        ctl.events.append(ScsiEvent(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(target, 0), 1))
        ctl.stats.events += 1
        ctl._event_arrived.set()

    arrive(1)
    arrive(2)
    assert [(await ctl.next_event()).target for _ in range(2)] == [1, 2]
    # A consumer waits for the next one.
    async with trio.open_nursery() as nursery:
        got: list[int] = []

        async def consume() -> None:
            got.append((await ctl.next_event()).target)

        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        arrive(3)
    assert got == [3]
    # More than the deque keeps: one "missed" event, then the kept ones in order.
    for i in range(MAX_KEPT_EVENTS + 5):
        arrive(i % 8)
    first = await ctl.next_event()
    assert first.missed
    rest = [(await ctl.next_event()).target for _ in range(MAX_KEPT_EVENTS)]
    assert rest == [i % 8 for i in range(5, MAX_KEPT_EVENTS + 5)]
    with trio.move_on_after(0.05) as scope:
        await ctl.next_event()
    assert scope.cancelled_caught
