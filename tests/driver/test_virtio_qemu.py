"""The VirtIO layer and the qtest backend against real QEMU, on both transports."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from amigafuse.driver.backends.base import BarKind
from amigafuse.driver.backends.qtest import (
    ARENA_GUEST_OFFSET,
    QemuDisk,
    QtestBackend,
    attach_qtest,
    launch_qemu,
    qemu_command,
)
from amigafuse.driver.pci import configure_function, enumerate_bus
from amigafuse.driver.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    bit,
)
from amigafuse.driver.virtio.scsi import find_virtio_scsi, open_virtio_scsi
from amigafuse.errors import DeviceGone, HardwareError, NotAvailable, UsageError
from tests.driver.conftest import requires_qemu

pytestmark = [pytest.mark.qemu, requires_qemu]

MIB = 1 << 20
INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


async def test_handshake_features_and_inquiry(
    transport: str, scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    path, _ = disk_image(4 * MIB)
    async with scsi_controller([path], transport=transport) as (backend, ctl):
        assert ctl.transport.kind == transport
        want = bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX)
        assert ctl.features & want == want
        assert bool(ctl.features & bit(VIRTIO_F_VERSION_1)) == (transport == "modern")
        assert ctl.config.cdb_size == 32 and ctl.config.sense_size == 96
        assert ctl.max_target >= 7 and ctl.queue_depth == 16
        assert ctl.max_transfer_bytes == MIB
        status = await ctl.transport.get_status()
        assert status & 0x4  # DRIVER_OK
        result = await ctl.execute(0, 0, INQUIRY, data_in_len=96)
        assert (result.response, result.status) == (0, 0)
        assert result.data[8:16] == b"QEMU    " and b"HARDDISK" in result.data[16:32]
        # no disk at target 5: virtio-scsi BAD_TARGET
        missing = await ctl.execute(5, 0, INQUIRY, data_in_len=96)
        assert missing.response == 3
        with pytest.raises(UsageError, match="already open"):
            async with open_virtio_scsi(backend):
                pass
        assert (await ctl.execute(0, 0, INQUIRY, data_in_len=96)).status == 0


async def test_reads_match_image(
    transport: str, scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    path, data = disk_image(8 * MIB)
    async with scsi_controller([path], transport=transport) as (_, ctl):
        first = await ctl.execute(0, 0, read10(0, 1), data_in_len=512)
        if first.status == 2:  # the first command after power-on: UNIT ATTENTION 29/00
            assert first.sense[2] & 0xF == 6 and first.sense[12] == 0x29
        for lba, blocks in [(0, 1), (7, 9), (1000, 2048), (16384 - 3, 3)]:
            result = await ctl.execute(0, 0, read10(lba, blocks), data_in_len=blocks * 512)
            assert (result.response, result.status, result.residual) == (0, 0, 0)
            assert result.data == data[lba * 512 : (lba + blocks) * 512]


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


async def settle_unit_attention(ctl: Any, target: int = 0) -> None:
    """The first command to a LUN after power-on answers UNIT ATTENTION: consume it."""
    for _ in range(3):
        result = await ctl.execute(target, 0, bytes(6), data_in_len=0)  # TEST UNIT READY
        if result.status == 0:
            return
    raise AssertionError("unit attention did not clear")


async def test_many_concurrent_requests_are_not_mixed_up(
    transport: str, scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    path, data = disk_image(16 * MIB)
    expected = bytearray(data)
    async with scsi_controller([path], transport=transport) as (_, ctl):
        await settle_unit_attention(ctl)
        failures: list[str] = []

        async def worker(k: int) -> None:
            rng = random.Random(k)
            region = k * (16 * MIB // 512 // 32)  # 32 disjoint regions of 1024 blocks
            for step in range(25):
                lba = region + rng.randrange(0, 1024 - 64)
                blocks = rng.choice([1, 8, 64])
                if step % 5 == 4:
                    payload = rng.randbytes(blocks * 512)
                    result = await ctl.execute(0, 0, write10(lba, blocks), data_out=payload)
                    if result.status:
                        failures.append(f"write {lba} status {result.status}")
                    expected[lba * 512 : (lba + blocks) * 512] = payload
                else:
                    result = await ctl.execute(0, 0, read10(lba, blocks), data_in_len=blocks * 512)
                    if result.data != expected[lba * 512 : (lba + blocks) * 512]:
                        failures.append(f"task {k} read {lba}+{blocks} got other data")

        with trio.fail_after(60):  # a hang guard, not a speed assertion
            async with trio.open_nursery() as nursery:
                for k in range(32):
                    nursery.start_soon(worker, k)
        assert failures == []
        stats = ctl.stats
        assert stats.requests == stats.completions >= 32 * 25
        # suppression works: fewer notifies and interrupts than requests
        assert stats.kicks < stats.requests and stats.interrupts < stats.requests
        assert len(ctl._free) == ctl.queue_depth
    assert Path(path).read_bytes() == bytes(expected)


async def test_cancelled_callers_do_not_lose_slots(
    transport: str, scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    path, data = disk_image(8 * MIB)
    async with scsi_controller([path], transport=transport, queue_depth=4) as (_, ctl):
        await settle_unit_attention(ctl)

        async def read(k: int) -> None:
            await ctl.execute(0, 0, read10(k * 256, 256), data_in_len=256 * 512)

        for round_ in range(10):
            async with trio.open_nursery() as nursery:
                for k in range(8):
                    nursery.start_soon(read, k)
                await trio.sleep(0.0005 * round_)
                nursery.cancel_scope.cancel()
        # abandoned commands still complete and give their slots back
        with trio.fail_after(10):
            while ctl.stats.completions < ctl.stats.requests:
                await trio.sleep(0.01)
        assert len(ctl._free) == ctl.queue_depth == 4
        for lba in (0, 5000):
            result = await ctl.execute(0, 0, read10(lba, 16), data_in_len=16 * 512)
            assert result.data == data[lba * 512 : (lba + 16) * 512]


async def test_read_only_and_4k_disks(
    transport: str, scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    ro_path, _ = disk_image(MIB)
    k4_path, k4_data = disk_image(4 * MIB)
    disks = [
        QemuDisk(ro_path, read_only=True),
        QemuDisk(k4_path, logical_block_size=4096, target=3),
    ]
    async with scsi_controller(disks, transport=transport) as (_, ctl):
        await settle_unit_attention(ctl, 0)
        await settle_unit_attention(ctl, 3)
        denied = await ctl.execute(0, 0, write10(0, 1), data_out=bytes(512))
        assert denied.status == 2 and denied.sense[2] & 0xF == 7  # DATA PROTECT
        capacity = await ctl.execute(3, 0, bytes([0x25]) + bytes(9), data_in_len=8)
        last_lba, block = struct.unpack(">II", capacity.data)
        assert (last_lba + 1, block) == (4 * MIB // 4096, 4096)
        result = await ctl.execute(3, 0, read10(100, 3), data_in_len=3 * 4096)
        assert result.data == k4_data[100 * 4096 : 103 * 4096]


async def test_qemu_killed_mid_io_fails_everyone_with_device_gone(
    transport: str, scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    path, _ = disk_image(8 * MIB)
    gone: list[DeviceGone] = []
    async with scsi_controller([path], transport=transport) as (backend, ctl):
        await settle_unit_attention(ctl)

        async def hammer(k: int) -> None:
            try:
                while True:
                    await ctl.execute(0, 0, read10(k * 64, 64), data_in_len=64 * 512)
            except DeviceGone as exc:
                gone.append(exc)

        with trio.fail_after(15):  # must not hang
            async with trio.open_nursery() as nursery:
                for k in range(20):
                    nursery.start_soon(hammer, k)
                await trio.sleep(0.2)
                backend.process.kill()
        assert len(gone) == 20
        assert "QEMU" in str(gone[0]) and "killed by signal 9" in str(gone[0])
        assert backend.dead
        with pytest.raises(DeviceGone):
            await ctl.execute(0, 0, read10(0, 1), data_in_len=512)
        with pytest.raises(DeviceGone):
            await backend.config_read(0, 0, 2)


async def test_files_are_cleaned_up_on_exit_error_and_cancel(
    disk_image: Callable[..., Any],
) -> None:
    path, _ = disk_image(MIB)
    procs: list[trio.Process] = []

    async def check_running(backend: QtestBackend) -> None:
        # QEMU has its RAM mapped: the files are already gone, the mapping works
        assert backend.shm_path is not None and backend.workdir is not None
        assert not backend.shm_path.exists() and not backend.workdir.exists()
        backend.guest_ram[ARENA_GUEST_OFFSET : ARENA_GUEST_OFFSET + 4] = b"\xde\xad\xbe\xef"
        assert await backend.config_read(4 << 3, 0, 2) == 0x1AF4
        assert backend.process is not None and backend.process.returncode is None
        procs.append(backend.process)

    async with launch_qemu([QemuDisk(path)]) as backend:
        await check_running(backend)
    with pytest.raises(RuntimeError, match="boom"):
        async with launch_qemu([QemuDisk(path)]) as backend:
            await check_running(backend)
            raise RuntimeError("boom")
    with trio.CancelScope() as scope:
        async with launch_qemu([QemuDisk(path)]) as backend:
            await check_running(backend)
            scope.cancel()
            await trio.sleep(30)
    assert scope.cancelled_caught
    assert len(procs) == 3 and all(p.returncode is not None for p in procs)
    ours = f"amigafuse-qemu-{os.getpid()}-"
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(ours)]


async def test_killed_driver_leaves_no_qemu_behind(
    tmp_path: Path, disk_image: Callable[..., Any]
) -> None:
    path, _ = disk_image(MIB)
    script = tmp_path / "driver.py"
    script.write_text(
        "import sys, trio\n"
        "from amigafuse.driver.backends.qtest import QemuDisk, launch_qemu\n"
        "async def main():\n"
        f"    async with launch_qemu([QemuDisk({str(path)!r})]) as b:\n"
        "        print(b.process.pid, flush=True)\n"
        "        await trio.sleep(60)\n"
        "trio.run(main)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(script)], stdout=subprocess.PIPE, cwd=str(repo)
    )
    assert proc.stdout is not None
    with trio.fail_after(30):
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(100)
            assert chunk, "the driver process ended early"
            line += chunk
    qemu_pid = int(line)
    os.kill(qemu_pid, 0)  # running
    proc.kill()  # SIGKILL: no cleanup code of ours runs
    await proc.wait()
    await proc.stdout.aclose()
    with trio.fail_after(10):
        while Path(f"/proc/{qemu_pid}").exists() and "Z" not in _proc_state(qemu_pid):
            await trio.sleep(0.05)
    shm = f"amigafuse-qemu-{proc.pid}-"
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(shm)]


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (OSError, IndexError):
        return "gone"


async def test_missing_and_failing_qemu(tmp_path: Path, disk_image: Callable[..., Any]) -> None:
    path, _ = disk_image(MIB)
    with pytest.raises(NotAvailable, match="apt-get install qemu-system-x86"):
        async with launch_qemu([QemuDisk(path)], qemu_binary="qemu-system-amigafuse-missing"):
            pass
    fake = tmp_path / "fake-qemu"
    fake.write_text(
        "#!/bin/sh\necho 'qemu-system-x86_64: -device foo: no such device' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    ours = f"amigafuse-qemu-{os.getpid()}-"  # our process's RAM files
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(ours)]
    with pytest.raises(DeviceGone, match=r"failed to start.*no such device"):
        async with launch_qemu([QemuDisk(path)], qemu_binary=str(fake)):
            pass
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(ours)]


async def test_legacy_transport_refused_on_a_modern_only_device(
    scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    path, _ = disk_image(MIB)
    with pytest.raises(HardwareError, match="modern-only"):
        async with scsi_controller([path], transport="legacy", device="modern"):
            pass


async def test_attach_to_a_running_qemu(tmp_path: Path, disk_image: Callable[..., Any]) -> None:
    path, data = disk_image(2 * MIB)
    sock = tmp_path / "qtest.sock"
    shm = Path("/dev/shm") / f"amigafuse-test-attach-{os.getpid()}"
    cmd = qemu_command([QemuDisk(path)], socket_path=str(sock), shm_path=str(shm), ram_mib=64)
    cmd[cmd.index(f"unix:{sock}")] = f"unix:{sock},server=on,wait=off"
    proc = await trio.lowlevel.open_process(cmd, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(20):
            while not (sock.exists() and shm.exists()):
                await trio.sleep(0.02)
        async with attach_qtest(sock, shm) as backend, open_virtio_scsi(backend) as ctl:
            await settle_unit_attention(ctl)
            result = await ctl.execute(0, 0, read10(10, 4), data_in_len=2048)
            assert result.data == data[5120 : 5120 + 2048]
        assert proc.returncode is None  # attaching and leaving does not stop the user's QEMU
    finally:
        proc.kill()
        await proc.wait()
        shm.unlink(missing_ok=True)


async def test_without_indirect_and_event_idx(
    transport: str, scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    """Direct descriptor chains and the legacy NO_NOTIFY/NO_INTERRUPT flags."""
    path, data = disk_image(4 * MIB)
    async with scsi_controller([path], transport=transport, features=0) as (_, ctl):
        want = bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX)
        assert ctl.features & want == 0
        assert ctl.queue_depth == 16  # 16 chains of up to 4 descriptors fit the ring
        await settle_unit_attention(ctl)
        wrong: list[int] = []

        async def reader(k: int) -> None:
            for step in range(20):
                lba = (k * 37 + step * 11) % (4 * MIB // 512 - 8)
                result = await ctl.execute(0, 0, read10(lba, 8), data_in_len=4096)
                if result.data != data[lba * 512 : lba * 512 + 4096]:
                    wrong.append(lba)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for k in range(24):
                    nursery.start_soon(reader, k)
        assert wrong == []
        assert ctl.stats.completions == ctl.stats.requests


@pytest.mark.parametrize(
    "errno_value,sense_key,asc_ascq",
    [(5, 0xB, (0x00, 0x06)), (61, 0x3, (0x11, 0x00))],  # EIO: ABORTED; ENODATA: MEDIUM ERROR
)
async def test_injected_error_is_reported_in_sense(
    transport: str,
    scsi_controller: Callable[..., Any],
    disk_image: Callable[..., Any],
    errno_value: int,
    sense_key: int,
    asc_ascq: tuple[int, int],
) -> None:
    path, data = disk_image(2 * MIB)
    disk = QemuDisk(path, blkdebug_errors=[("read_aio", 100, errno_value)])
    async with scsi_controller([disk], transport=transport) as (_, ctl):
        await settle_unit_attention(ctl)
        bad = await ctl.execute(0, 0, read10(96, 8), data_in_len=4096)
        assert bad.response == 0 and bad.status == 2
        assert bad.sense[2] & 0xF == sense_key and (bad.sense[12], bad.sense[13]) == asc_ascq
        good = await ctl.execute(0, 0, read10(0, 8), data_in_len=4096)
        assert good.status == 0 and good.data == data[:4096]


async def test_qtest_protocol_errors_surface(disk_image: Callable[..., Any]) -> None:
    path, _ = disk_image(MIB)
    async with launch_qemu([QemuDisk(path)]) as backend:
        # a failing posted command is reported by the next sync, in order
        backend._post("no_such_qtest_command 1")
        with pytest.raises(HardwareError, match="qtest command failed"):
            await backend.sync()
        await backend.sync()  # reported once; the connection stays usable
        # pipelined config reads come back in order
        block = await backend.config_read_block(4 << 3, 0, 64)
        assert block[:4] == bytes([0xF4, 0x1A, 0x04, 0x10])  # 1af4:1004 at 04.0
        assert await backend.config_read(4 << 3, 2, 2) == 0x1004
        assert await backend.config_read(31 << 3 | 7, 0, 2) == 0xFFFF  # nothing there
        assert backend.sends <= backend.commands_sent


async def test_attach_without_qemu_says_so(tmp_path: Path) -> None:
    shm = tmp_path / "ram"
    shm.write_bytes(bytes(32 << 20))
    with pytest.raises(DeviceGone, match="nothing listens"):
        async with attach_qtest(tmp_path / "no.sock", shm):
            pass
    with pytest.raises(UsageError, match="cannot open QEMU's RAM file"):
        async with attach_qtest(tmp_path / "no.sock", tmp_path / "missing"):
            pass


@pytest.mark.parametrize("divisor", [1, 3])
async def test_interrupt_coalescing_never_strands_a_request(
    divisor: int, scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    path, data = disk_image(4 * MIB)
    async with scsi_controller([path], transport="modern") as (_, ctl):
        await settle_unit_attention(ctl)
        ctl.coalesce_divisor = divisor
        wrong: list[int] = []

        async def reader(k: int, blocks: int, count: int) -> None:
            for step in range(count):
                lba = (k * 101 + step * 13) % (4 * MIB // 512 - blocks)
                got = await ctl.execute(0, 0, read10(lba, blocks), data_in_len=blocks * 512)
                if got.data != data[lba * 512 : (lba + blocks) * 512]:
                    wrong.append(lba)
                if step % 7 == k % 7:
                    await trio.sleep(0.001)  # stagger: completions arrive unevenly

        with trio.fail_after(60):  # a stranded request would hang here
            async with trio.open_nursery() as nursery:
                for k in range(20):
                    nursery.start_soon(reader, k, 8 if k % 2 else 256, 15)
            await reader(99, 8, 5)  # and alone: queue depth 1
        assert wrong == []
        assert ctl.stats.interrupts < ctl.stats.completions


@pytest.mark.slow
async def test_qemu_outlives_idle_worker_threads(disk_image: Callable[..., Any]) -> None:
    """QEMU's death signal is tied to our trio thread, not to a worker thread that
    trio retires after ~10 s idle (which once killed QEMU under an idle mount)."""
    path, data = disk_image(MIB)
    async with launch_qemu([QemuDisk(path)]) as backend, open_virtio_scsi(backend) as ctl:
        await settle_unit_attention(ctl)
        await trio.to_thread.run_sync(lambda: None)  # a worker thread exists, then idles
        await trio.sleep(13)
        assert not backend.dead
        result = await ctl.execute(0, 0, read10(0, 1), data_in_len=512)
        assert result.data == data[:512]


async def test_a_stopped_qemu_gives_device_gone_not_a_hang(
    scsi_controller: Callable[..., Any], disk_image: Callable[..., Any]
) -> None:
    path, _ = disk_image(MIB)
    gone: list[DeviceGone] = []
    async with scsi_controller([path], request_timeout=1.5) as (backend, ctl):
        await settle_unit_attention(ctl)
        await trio.sleep(2)  # idle time does not count against requests
        assert (await ctl.execute(0, 0, read10(0, 1), data_in_len=512)).status == 0
        backend.process.send_signal(signal.SIGSTOP)
        try:

            async def reader(k: int) -> None:
                try:
                    await ctl.execute(0, 0, read10(k, 1), data_in_len=512)
                except DeviceGone as exc:
                    gone.append(exc)

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for k in range(4):
                        nursery.start_soon(reader, k)
            assert len(gone) == 4 and "completed none of" in str(gone[0])
            with pytest.raises(DeviceGone):
                await ctl.execute(0, 0, read10(0, 1), data_in_len=512)
        finally:
            backend.process.send_signal(signal.SIGCONT)


@pytest.mark.parametrize(
    "device,asked,expected",
    [
        ("transitional", "auto", "legacy"),
        ("modern", "auto", "modern"),
        ("transitional", "modern", "modern"),
    ],
)
async def test_transport_choice(
    device: str,
    asked: str,
    expected: str,
    scsi_controller: Callable[..., Any],
    disk_image: Callable[..., Any],
) -> None:
    path, data = disk_image(MIB)
    async with scsi_controller([path], transport=asked, device=device) as (_, ctl):
        assert ctl.transport_kind == expected
        await settle_unit_attention(ctl)
        result = await ctl.execute(0, 0, read10(3, 2), data_in_len=1024)
        assert result.data == data[1536:2560]


async def test_pci_enumeration_and_bar_placement(disk_image: Callable[..., Any]) -> None:
    path, _ = disk_image(MIB)
    async with launch_qemu([QemuDisk(path)], device="transitional") as backend:
        functions = await enumerate_bus(backend)
        ids = {(f.devfn, f.header.vendor_id, f.header.device_id) for f in functions}
        assert (0, 0x8086, 0x29C0) in ids  # the q35 host bridge
        assert (4 << 3, 0x1AF4, 0x1004) in ids
        scsi = await find_virtio_scsi(backend)
        await configure_function(backend, scsi)
        bars = scsi.bars
        assert bars[0].kind is BarKind.IO and bars[0].address == 0xC000
        assert bars[4].is_64bit and bars[4].kind is BarKind.MEMORY
        assert all(b.address >= 0xE0000000 for b in bars.values() if b.kind is BarKind.MEMORY)
        assert all(b.address % b.size_bytes == 0 for b in bars.values())
        command = await backend.config_read(scsi.devfn, 4, 2)
        assert command & 0x7 == 0x7 and not command & 0x400  # I/O, memory, master; INTx on
        # the BARs read back as placed
        assert await backend.config_read(scsi.devfn, 0x10, 4) == 0xC000 | 1
        caps = [c.cap_id for c in scsi.capabilities]
        assert 0x11 in caps and caps.count(0x09) >= 4  # MSI-X and the virtio structures
