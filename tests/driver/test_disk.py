"""ScsiDisk against real QEMU virtio-scsi (both transports): data checked against the
image file's bytes."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from amigafuse.driver import DiskImage, attach_qemu, open_qemu
from amigafuse.driver.scsi import cdb as C
from amigafuse.errors import IllegalRequest, NotAvailable, UsageError, WriteProtected

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]

TRANSPORTS = ["legacy", "modern"]
MIB = 1 << 20


def make_image(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_read_write_round_trip(tmp_path: Path, transport: str) -> None:
    img = tmp_path / "disk.img"
    original = make_image(img, 16 * MIB, 1)
    async with open_qemu([DiskImage(img)], transport=transport) as ctl:  # type: ignore[arg-type]
        assert ctl.transport_name == transport
        (disk,) = ctl.disks
        assert (disk.block_size, disk.block_count) == (512, 16 * MIB // 512)
        assert not disk.read_only
        assert disk.info.vendor == "QEMU" and "HARDDISK" in disk.info.product
        # Small, odd-sized and larger-than-one-transfer reads, all against the file.
        for lba, count in [(0, 1), (1, 7), (12345, 3), (100, 4096), (32768 - 9, 9)]:
            got = await disk.read(lba, count)
            assert got == original[lba * 512 : (lba + count) * 512], (lba, count)
        big = await disk.read(0, 8 * MIB // 512)
        assert big == original[: 8 * MIB]
        assert disk.max_transfer_blocks < 8 * MIB // 512  # that read was split

        payload = random.Random(2).randbytes(3 * MIB + 512)
        await disk.write(777, payload)
        await disk.write(0, b"\xa5" * 512)
        await disk.flush()
        assert await disk.read(777, len(payload) // 512) == payload
        # The image file holds exactly what was written, and nothing else changed.
        assert file_bytes(img, 777 * 512, len(payload)) == payload
        assert file_bytes(img, 0, 512) == b"\xa5" * 512
        assert file_bytes(img, 512, 777 * 512 - 512) == original[512 : 777 * 512]
        end = 777 * 512 + len(payload)
        assert file_bytes(img, end, 16 * MIB - end) == original[end:]
        assert disk.stats.flushes == 1 and disk.stats.blocks_written == 1 + len(payload) // 512
        # The power-on UNIT ATTENTION was seen and retried during bring-up.
        assert disk.stats.unit_attention_codes[:1] == [(0x29, 0x00)]
        assert ctl.stats["disks"]["0:0"]["unit_attentions"] == 1
        assert ctl.stats["requests"] > 0 and ctl.stats["interrupts"] > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_several_targets(tmp_path: Path, transport: str) -> None:
    sizes = [2 * MIB, 3 * MIB, 1 * MIB, 4 * MIB, 1 * MIB, 2 * MIB, 1 * MIB, 3 * MIB]
    images = []
    contents = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"d{i}.img"
        contents.append(make_image(p, size, 10 + i))
        images.append(DiskImage(p))
    async with open_qemu(images, transport=transport) as ctl:  # type: ignore[arg-type]
        assert [d.target for d in ctl.disks] == list(range(8))
        assert [d.size_bytes for d in ctl.disks] == sizes
        serials = {d.info.serial for d in ctl.disks}

        async def check(i: int) -> None:
            d = ctl.disks[i]
            assert await d.read(0, d.block_count) == contents[i]
            await d.write(1, bytes([i]) * 512)

        async with trio.open_nursery() as n:
            for i in range(len(sizes)):
                n.start_soon(check, i)
        for i, d in enumerate(ctl.disks):
            assert await d.read(1, 1) == bytes([i]) * 512
        await ctl.disks[0].flush()
    for i in range(len(sizes)):
        assert file_bytes(tmp_path / f"d{i}.img", 512, 512) == bytes([i]) * 512
        assert file_bytes(tmp_path / f"d{i}.img", 1024, 512) == contents[i][1024:1536]
    assert serials == {""}  # QEMU lists VPD 0x80 only for drives given a serial


async def test_inquiry_vpd_serial_and_identification(tmp_path: Path) -> None:
    from amigafuse.driver.backends.qtest import QemuDisk, launch_qemu
    from amigafuse.driver.controller import open_controller

    img = tmp_path / "ser.img"
    make_image(img, MIB, 8)
    async with (
        launch_qemu([QemuDisk(img, serial="AMIGA-0001")]) as backend,
        open_controller(backend) as ctl,
    ):
        (disk,) = ctl.disks
        info = disk.info
        assert info.serial == "AMIGA-0001"
        assert (info.vendor, info.product, info.revision) == ("QEMU", "QEMU HARDDISK", "2.5+")
        assert "1.0 MiB in 2048 blocks of 512 bytes" in info.description
        assert disk.identifiers and all(d.designator for d in disk.identifiers)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_4k_sector_disk(tmp_path: Path, transport: str) -> None:
    img = tmp_path / "4k.img"
    original = make_image(img, 8 * MIB, 3)
    async with open_qemu(
        [DiskImage(img, logical_block_size=4096)],
        transport=transport,  # type: ignore[arg-type]
    ) as ctl:
        (disk,) = ctl.disks
        assert (disk.block_size, disk.block_count) == (4096, 2048)
        assert await disk.read(5, 3) == original[5 * 4096 : 8 * 4096]
        with pytest.raises(ValueError):
            await disk.write(0, bytes(512))  # not a whole 4 KiB block
        await disk.write(2047, b"\x42" * 4096)
        await disk.flush()
    assert file_bytes(img, 2047 * 4096, 4096) == b"\x42" * 4096


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sparse_3tib_disk_past_lba_2_32(tmp_path: Path, transport: str) -> None:
    img = tmp_path / "big.img"
    size = 3 << 40
    with open(img, "wb") as f:
        f.truncate(size)
    lba = (1 << 32) + 12345  # past what READ(10)/WRITE(10) can address
    marker = b"".join(i.to_bytes(4, "big") for i in range(256))  # 1 KiB, distinctive
    with open(img, "r+b") as f:
        f.seek((lba + 2) * 512)
        f.write(b"\x77" * 512)
    try:
        async with open_qemu([DiskImage(img)], transport=transport) as ctl:  # type: ignore[arg-type]
            (disk,) = ctl.disks
            assert disk.block_count == size // 512 > 1 << 32  # from READ CAPACITY(16)
            assert C.needs_16(lba, 2)
            await disk.write(lba, marker)
            assert await disk.read(lba, 3) == marker + b"\x77" * 512
            # The last block of the disk.
            await disk.write(disk.block_count - 1, b"\x99" * 512)
            assert await disk.read(disk.block_count - 1, 1) == b"\x99" * 512
            await disk.flush()
        assert file_bytes(img, lba * 512, 1024) == marker
        assert file_bytes(img, size - 512, 512) == b"\x99" * 512
        # Nothing landed at the address a 32-bit truncation would have produced.
        assert file_bytes(img, (lba & 0xFFFFFFFF) * 512, 1024) == bytes(1024)
    finally:
        img.unlink()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_read_only_drive_refuses_writes(tmp_path: Path, transport: str) -> None:
    img = tmp_path / "ro.img"
    original = make_image(img, 2 * MIB, 4)
    async with open_qemu([DiskImage(img, read_only=True)], transport=transport) as ctl:  # type: ignore[arg-type]
        (disk,) = ctl.disks
        assert disk.read_only  # the device's MODE SENSE WP bit
        assert await disk.read(10, 2) == original[5120:6144]
        with pytest.raises(WriteProtected):
            await disk.write(10, bytes(512))
        # Past our own check, straight to the device: DATA PROTECT -> EROFS.
        with pytest.raises(WriteProtected) as exc:
            await disk.execute(C.write(10, 1), data_out=bytes(512))
        assert exc.value.errno == errno.EROFS
        assert "DATA PROTECT" in str(exc.value)
        assert await disk.read(10, 1) == original[5120:5632]  # still usable afterwards
    assert img.read_bytes() == original


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_concurrent_readers_and_writers(tmp_path: Path, transport: str) -> None:
    """16 tasks at once, each on its own region, against a model; plus readers of a
    region where every block names itself, so a mixed-up completion cannot go unseen."""
    img = tmp_path / "conc.img"
    blocks = 16 * 1024
    labelled = b"".join(i.to_bytes(8, "big") * 64 for i in range(blocks))
    img.write_bytes(labelled)
    model = bytearray(labelled)
    async with open_qemu([DiskImage(img)], transport=transport) as ctl:  # type: ignore[arg-type]
        (disk,) = ctl.disks

        async def writer(slot: int) -> None:
            rng = random.Random(slot)
            base = slot * 1024
            for _ in range(40):
                lba = base + rng.randrange(1000)
                count = rng.randrange(1, 24)
                if rng.random() < 0.5:
                    data = rng.randbytes(count * 512)
                    await disk.write(lba, data)
                    model[lba * 512 : (lba + count) * 512] = data
                else:
                    got = await disk.read(lba, count)
                    assert got == bytes(model[lba * 512 : (lba + count) * 512])

        async def reader(slot: int) -> None:
            rng = random.Random(100 + slot)
            for _ in range(60):
                lba = 8 * 1024 + rng.randrange(8 * 1024 - 64)
                count = rng.randrange(1, 64)
                got = await disk.read(lba, count)
                for i in range(count):
                    assert got[i * 512 : i * 512 + 8] == (lba + i).to_bytes(8, "big")

        async with trio.open_nursery() as n:
            for slot in range(8):
                n.start_soon(writer, slot)
            for slot in range(8):
                n.start_soon(reader, slot)
        await disk.flush()
        assert await disk.read(0, blocks) == bytes(model)
    assert img.read_bytes() == bytes(model)


async def test_attach_qemu_to_a_running_qemu(tmp_path: Path) -> None:
    from amigafuse.driver.backends.qtest import QemuDisk, qemu_command

    img = tmp_path / "att.img"
    original = make_image(img, 2 * MIB, 9)
    sock = tmp_path / "qtest.sock"
    shm = Path("/dev/shm") / f"amigafuse-test-d2-attach-{os.getpid()}"
    cmd = qemu_command([QemuDisk(img)], socket_path=str(sock), shm_path=str(shm), ram_mib=64)
    cmd[cmd.index(f"unix:{sock}")] = f"unix:{sock},server=on,wait=off"
    proc = await trio.lowlevel.open_process(cmd, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(20):  # hang guard while QEMU starts
            while not (sock.exists() and shm.exists()):
                await trio.sleep(0.02)
        async with attach_qemu(sock, shm) as ctl:
            (disk,) = ctl.disks
            assert disk.block_count == 2 * MIB // 512
            assert await disk.read(100, 8) == original[100 * 512 : 108 * 512]
            await disk.write(3, b"\x5a" * 512)
            await disk.flush()
        assert proc.returncode is None  # detaching leaves the user's QEMU running
        assert file_bytes(img, 3 * 512, 512) == b"\x5a" * 512
    finally:
        proc.kill()
        await proc.wait()
        shm.unlink(missing_ok=True)


async def test_clear_errors_before_launch(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    img.write_bytes(bytes(MIB))
    with pytest.raises(UsageError, match="at most 8"):
        async with open_qemu([DiskImage(img)] * 9):
            pass
    with pytest.raises(UsageError, match="no such image"):
        async with open_qemu([DiskImage(tmp_path / "missing.img")]):
            pass
    with pytest.raises(UsageError, match="512 or 4096"):
        async with open_qemu([DiskImage(img, logical_block_size=1024)]):
            pass
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(bytes(100))
    with pytest.raises(UsageError, match="smaller than one block"):
        async with open_qemu([DiskImage(tiny)]):
            pass


async def test_partial_4k_block_is_left_out(tmp_path: Path) -> None:
    img = tmp_path / "odd4k.img"
    original = make_image(img, MIB + 1024, 13)
    async with open_qemu([DiskImage(img, logical_block_size=4096)]) as ctl:
        (disk,) = ctl.disks
        assert disk.block_count == MIB // 4096
        assert await disk.read(disk.block_count - 1, 1) == original[MIB - 4096 : MIB]
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(MIB + 300))
    with pytest.raises(UsageError, match="not a multiple of 512"):
        async with open_qemu([DiskImage(odd)]):
            pass


async def test_qemu_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "x.img"
    img.write_bytes(bytes(MIB))
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-system-x86_64 on it
    with pytest.raises(NotAvailable, match="apt-get install qemu-system-x86"):
        async with open_qemu([DiskImage(img)]):
            pass
    assert os.environ["PATH"] == str(tmp_path)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancelled_requests_leave_the_disk_consistent(tmp_path: Path, transport: str) -> None:
    """Requests cancelled while in flight must not leak into later ones: every block
    names itself, so a late completion delivered to the wrong request would show."""
    img = tmp_path / "cancel.img"
    blocks = 8192
    img.write_bytes(b"".join(i.to_bytes(8, "big") * 64 for i in range(blocks)))
    async with open_qemu([DiskImage(img)], transport=transport) as ctl:  # type: ignore[arg-type]
        (disk,) = ctl.disks
        rng = random.Random(3)
        cancelled = 0
        for round_ in range(20):
            with trio.move_on_after(0.0005 * (round_ % 5)) as scope:
                async with trio.open_nursery() as n:
                    for _ in range(16):
                        n.start_soon(disk.read, rng.randrange(blocks - 256), 256)
            cancelled += scope.cancelled_caught
            # Straight after: reads return their own blocks.
            for _ in range(8):
                lba = rng.randrange(blocks - 16)
                got = await disk.read(lba, 16)
                assert [got[i * 512 : i * 512 + 8] for i in range(16)] == [
                    (lba + i).to_bytes(8, "big") for i in range(16)
                ]
        assert cancelled > 0  # the scenario really happened


async def test_pass_through_commands_on_qemu(tmp_path: Path) -> None:
    """The CDB builders and parsers the bring-up does not use, against QEMU's answers."""
    from amigafuse.driver.scsi import sense as S

    img = tmp_path / "pt.img"
    make_image(img, MIB, 12)
    async with open_qemu([DiskImage(img)]) as ctl:
        (disk,) = ctl.disks
        luns = C.parse_report_luns((await disk.execute(C.report_luns(), data_in_len=2056)).data)
        assert luns == (0,)
        raw = (await disk.execute(C.request_sense(), data_in_len=252)).data
        sense = S.parse_sense(raw)
        assert sense is not None and sense.sense_key == S.NO_SENSE
        header = C.parse_mode_sense_6((await disk.execute(C.mode_sense_6(), data_in_len=192)).data)
        assert not header.write_protect
        cap = C.parse_read_capacity_16(
            (await disk.execute(C.read_capacity_16(), data_in_len=32)).data
        )
        assert cap.block_count == MIB // 512 and cap.block_length == 512
        # An opcode QEMU's scsi-hd does not implement: ILLEGAL REQUEST, named.
        with pytest.raises(IllegalRequest, match="ILLEGAL REQUEST"):
            await disk.execute(bytes([0xEE]) + bytes(5))
        assert await disk.read(0, 1)  # and the disk carries on


@pytest.mark.parametrize(
    "relpath", ["handler/ffs_dos3_v40.hdf.gz", "real/a590_WD93028XA_6parts.hdd.gz"]
)
async def test_real_amiga_disks_read_identically(image_copy: Any, relpath: str) -> None:
    """Whole real Amiga disk images (RDB first) read through the driver byte for byte."""
    import hashlib

    img = image_copy(relpath)
    size = img.stat().st_size
    async with open_qemu([DiskImage(img, read_only=True)]) as ctl:
        (disk,) = ctl.disks
        assert disk.size_bytes == size
        digest = hashlib.sha256()
        for lba in range(0, disk.block_count, 4096):
            digest.update(await disk.read(lba, min(4096, disk.block_count - lba)))
    with open(img, "rb") as f:
        assert digest.hexdigest() == hashlib.sha256(f.read(size)).hexdigest()
    rdb_found = False
    with open(img, "rb") as f:
        for block in range(16):
            f.seek(block * 512)
            rdb_found = rdb_found or f.read(4) == b"RDSK"
    assert rdb_found  # these are RDB disks, the case the driver exists for
