"""Run inside the test guest (by tests/vm): exercise VfioBackend on a controller bound
to vfio-pci without the VirtIO layer.  Prints one JSON object."""

from __future__ import annotations

import json
import struct
import sys

import trio

from amigafuse.driver.backends.base import BarKind
from amigafuse.driver.backends.vfio import open_vfio_backend
from amigafuse.errors import AmigaFuseError

VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
QSIZE = 8
DESC, AVAIL, USED, REQ, RESP, DATA = 0x0, 0x1000, 0x2000, 0x3000, 0x3100, 0x4000


def _caps(cfg: bytes) -> dict[int, tuple[int, int, int]]:
    """virtio cfg_type -> (bar, offset, notify_off_multiplier) from the capability list."""
    caps: dict[int, tuple[int, int, int]] = {}
    ptr, seen = cfg[0x34], 0
    while ptr and seen < 48:
        seen += 1
        if cfg[ptr] == 0x09 and cfg[ptr + 3] not in caps:
            mult = int.from_bytes(cfg[ptr + 16 : ptr + 20], "little")
            caps[cfg[ptr + 3]] = (cfg[ptr + 4], int.from_bytes(cfg[ptr + 8 : ptr + 12], "little"), mult)
        ptr = cfg[ptr + 1]
    return caps


async def raw_scsi(be: object, cfg: bytes, out: dict[str, object]) -> None:
    """A hand-made virtio-scsi request queue (modern transport, one request at a time):
    proves DMA through the IOMMU at the arena's IOVA and INTx via the eventfd, with no
    VirtIO layer involved."""
    from amigafuse.driver.backends.vfio import VfioBackend

    assert isinstance(be, VfioBackend)
    devfn = be.devfn
    caps = _caps(cfg)
    cbar, coff, _ = caps[VIRTIO_PCI_CAP_COMMON_CFG]
    nbar, noff, mult = caps[VIRTIO_PCI_CAP_NOTIFY_CFG]
    ibar, ioff, _ = caps[VIRTIO_PCI_CAP_ISR_CFG]
    common = be.map_bar(devfn, be.bar_info(cbar))
    notify = be.map_bar(devfn, be.bar_info(nbar))
    isr = be.map_bar(devfn, be.bar_info(ibar))
    view, base = be.arena.view, be.arena.bus_address
    view[0:0x10000] = bytes(0x10000)
    common.write(coff + 0x14, 1, 0)
    for status in (1, 3):
        common.write(coff + 0x14, 1, status)
    common.write(coff + 0x08, 4, 0)
    common.write(coff + 0x0C, 4, 0)
    common.write(coff + 0x08, 4, 1)
    common.write(coff + 0x0C, 4, 0b11)  # VERSION_1 | ACCESS_PLATFORM
    common.write(coff + 0x14, 1, 0b1011)
    out["features_ok"] = bool(await common.read(coff + 0x14, 1) & 8)
    common.write(coff + 0x16, 2, 2)  # request queue
    common.write(coff + 0x18, 2, QSIZE)
    common.write(coff + 0x20, 8, base + DESC)
    common.write(coff + 0x28, 8, base + AVAIL)
    common.write(coff + 0x30, 8, base + USED)
    notify_off = await common.read(coff + 0x1E, 2)
    common.write(coff + 0x1C, 2, 1)
    common.write(coff + 0x14, 1, 0b1111)  # DRIVER_OK
    await be.enable_interrupts(devfn)
    avail_idx = 0
    isr_bits: list[int] = []

    async def command(cdb: bytes, data_len: int) -> tuple[int, int, bytes]:
        nonlocal avail_idx
        req = bytes([1, 0, 0x40, 0, 0, 0, 0, 0]) + (avail_idx + 1).to_bytes(8, "little") + bytes(3)
        view[REQ : REQ + 51] = req + cdb.ljust(32, b"\0")
        descs = [(REQ, 51, 1), (RESP, 108, 3), (DATA, data_len, 2)]
        for i, (off, length, flags) in enumerate(descs):
            struct.pack_into("<QIHH", view, DESC + 16 * i, base + off, length, flags, i + 1)
        struct.pack_into("<H", view, AVAIL + 4 + 2 * (avail_idx % QSIZE), 0)
        avail_idx += 1
        struct.pack_into("<H", view, AVAIL + 2, avail_idx)
        notify.write(noff + notify_off * mult, 2, 2)
        # Every completion must raise INTx: wait for it even if the used ring is
        # already updated, then read ISR (deasserts the line) and unmask.
        with trio.fail_after(20):
            while True:
                await be.wait_interrupt()
                isr_bits.append(await isr.read(ioff, 1))
                be.ack_interrupt()
                if struct.unpack_from("<H", view, USED + 2)[0] == avail_idx:
                    break
        _sense_len, _resid, _q, status, response = struct.unpack_from("<IIHBB", view, RESP)
        return response, status, bytes(view[DATA : DATA + data_len])

    response, status, data = await command(bytes([0x12, 0, 0, 0, 36, 0]), 36)
    out["inquiry"] = [response, status, data[8:16].decode(errors="replace").strip()]
    for _attempt in range(3):
        response, status, data = await command(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), 512)
        if status == 0:
            break
    out["read0"] = [response, status, data[:16].decode(errors="replace")]
    out["interrupts"] = be.interrupt_count
    out["isr_bits"] = isr_bits
    out["commands"] = avail_idx
    common.write(coff + 0x14, 1, 0)


async def probe(bdf: str, mmap_bars: bool) -> dict[str, object]:
    out: dict[str, object] = {}
    async with open_vfio_backend(bdf, arena_bytes=1 << 20, mmap_bars=mmap_bars) as be:
        devfn = be.devfn
        out["vendor"] = await be.config_read(devfn, 0, 2)
        out["device"] = await be.config_read(devfn, 2, 2)
        out["other_devfn_vendor"] = await be.config_read(devfn ^ 8, 0, 2)
        out["command"] = await be.config_read(devfn, 4, 2)
        cfg = await be.config_read_block(devfn, 0, 256)
        out["config_block_matches"] = int.from_bytes(cfg[0:2], "little") == out["vendor"]
        bars = {}
        for i in range(6):
            try:
                bar = be.map_bar(devfn, be.bar_info(i))
            except AmigaFuseError:
                continue
            bars[i] = [bar.kind.value, bar.size_bytes, type(bar).__name__]
        out["bars"] = bars
        # Walk the capability list to the virtio COMMON_CFG; read device features.
        ptr = cfg[0x34]
        seen = 0
        features = None
        while ptr and seen < 48:
            seen += 1
            cap_id, nxt = cfg[ptr], cfg[ptr + 1]
            if cap_id == 0x09 and cfg[ptr + 3] == VIRTIO_PCI_CAP_COMMON_CFG:
                bar_index = cfg[ptr + 4]
                offset = int.from_bytes(cfg[ptr + 8 : ptr + 12], "little")
                bar = be.map_bar(devfn, be.bar_info(bar_index))
                assert bar.kind is BarKind.MEMORY
                bar.write(offset + 0x14, 1, 0)  # device_status = 0 (reset)
                await be.sync()
                out["status_after_reset"] = await bar.read(offset + 0x14, 1)
                feats = 0
                for sel in (0, 1):
                    bar.write(offset + 0x00, 4, sel)  # device_feature_select
                    feats |= (await bar.read(offset + 0x04, 4)) << (32 * sel)
                features = feats
                out["num_queues"] = await bar.read(offset + 0x12, 2)
                bar.write(offset + 0x14, 1, 1)  # ACKNOWLEDGE
                out["status_ack"] = await bar.read(offset + 0x14, 1)
                bar.write(offset + 0x14, 1, 0)
            ptr = nxt
        out["features"] = features
        out["access_platform"] = bool(features is not None and features >> 33 & 1)
        arena = be.arena
        arena.view[0:4] = b"abcd"
        out["arena"] = [arena.size_bytes, arena.bus_address, bytes(arena.view[0:4]).decode()]
        # MSI-X first, then INTx, as when the device refuses the queue's vector: the
        # backend switches MSI-X off again, and the raw requests below must raise INTx.
        out["msix_enabled"] = await be.enable_msix(devfn)
        out["mode_msix"] = be.interrupt_mode
        await be.enable_interrupts(devfn)
        out["mode_after_fallback"] = be.interrupt_mode
        out["msix_note"] = be.msix_note
        with trio.move_on_after(0.3) as scope:
            await be.wait_interrupt()
        out["spurious_interrupt"] = not scope.cancelled_caught
        await raw_scsi(be, cfg, out)
        out["dead_while_open"] = be.dead
    out["dead_after_close"] = be.dead
    try:
        await be.config_read(be.devfn, 0, 2)
    except AmigaFuseError as exc:
        out["after_close_error"] = type(exc).__name__
    return out


def main() -> int:
    bdf = sys.argv[1]
    try:
        result = trio.run(probe, bdf, "--no-mmap" not in sys.argv)
    except AmigaFuseError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": exc.message}))
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
