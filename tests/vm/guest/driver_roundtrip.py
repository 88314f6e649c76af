"""Run inside the test guest: the whole driver (PCI, VirtIO, SCSI layers) over
VfioBackend on the controller at argv[1].  Prints one JSON object.

Per disk: INQUIRY identity, capacity, block size; block 0 read; a write/read round trip
of distinct patterns at several LBAs (concurrent), flush; then reads of the
``--bad-lba`` (blkdebug-injected error) if given.  ``--interrupts auto|msix|intx``
chooses the interrupt mode; the one used is reported (``interrupt_mode``, ``msix_note``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import trio

from amigafuse.driver.backends.vfio import open_vfio
from amigafuse.driver.virtio.scsi import read_scsi_config
from amigafuse.errors import AmigaFuseError


async def _check(disk: Any, lba: int, expected: bytes, got: dict[int, bool]) -> None:
    got[lba] = await disk.read(lba, len(expected) // disk.block_size) == expected


async def run(
    bdf: str,
    bad_lba: int | None,
    bad_write_lba: int | None,
    transport: str = "auto",
    interrupts: str = "auto",
) -> dict[str, object]:
    out: dict[str, object] = {}
    async with open_vfio(bdf, transport=transport, interrupts=interrupts) as controller:  # type: ignore[arg-type]
        out["transport"] = controller.transport_name
        backend = controller.transport.backend  # type: ignore[attr-defined]
        out["interrupt_mode"] = backend.interrupt_mode
        out["msix_note"] = backend.msix_note
        # The device config read again now that interrupts are set up (legacy with MSI-X:
        # it moved from 0x14 to 0x18) matches what was read at open.
        scsi = controller.transport
        out["config_stable"] = await read_scsi_config(scsi.transport) == scsi.config  # type: ignore[attr-defined]
        disks = []
        for disk in controller.disks:
            entry: dict[str, object] = {
                "target": getattr(disk, "target", None),
                "block_size": disk.block_size,
                "block_count": disk.block_count,
                "read_only": disk.read_only,
                "product": disk.info.product,
            }
            entry["block0"] = (await disk.read(0, 1))[:16].decode(errors="replace")
            if not disk.read_only:
                bs = disk.block_size
                lbas = [1, 16, disk.block_count // 2, disk.block_count - 8]  # 8 blocks each, disjoint
                patterns = {
                    lba: bytes([(lba * 7 + entry["target"] * 31 + i) & 0xFF for i in range(bs * 8)])  # type: ignore[operator]
                    for lba in lbas
                }
                async with trio.open_nursery() as nursery:
                    for lba, data in patterns.items():
                        nursery.start_soon(disk.write, lba, data)
                await disk.flush()
                got: dict[int, bool] = {}
                async with trio.open_nursery() as nursery:
                    for lba in lbas:
                        nursery.start_soon(_check, disk, lba, patterns[lba], got)
                entry["roundtrip"] = all(got.values()) and len(got) == len(lbas)
                entry["lbas"] = lbas
            else:
                try:
                    await disk.write(1, bytes(disk.block_size))
                    entry["write"] = "accepted"
                except AmigaFuseError as exc:
                    entry["write"] = type(exc).__name__
            if bad_lba is not None:
                try:
                    await disk.read(bad_lba, 1)
                    entry["bad_read"] = "ok"
                except AmigaFuseError as exc:
                    entry["bad_read"] = f"{type(exc).__name__}: {exc.errno}"
                entry["after_bad"] = len(await disk.read(0, 1))
            if bad_write_lba is not None and not disk.read_only:
                try:
                    await disk.write(bad_write_lba, bytes(disk.block_size))
                    entry["bad_write"] = "ok"
                except AmigaFuseError as exc:
                    entry["bad_write"] = f"{type(exc).__name__}: {exc.errno}"
            disks.append(entry)
        out["disks"] = disks
        out["stats"] = {k: v for k, v in controller.stats.items() if isinstance(v, int)}
    return out


def main() -> int:
    bdf = sys.argv[1]
    bad = int(sys.argv[sys.argv.index("--bad-lba") + 1]) if "--bad-lba" in sys.argv else None
    bad_write = (
        int(sys.argv[sys.argv.index("--bad-write-lba") + 1]) if "--bad-write-lba" in sys.argv else None
    )
    transport = sys.argv[sys.argv.index("--transport") + 1] if "--transport" in sys.argv else "auto"
    interrupts = (
        sys.argv[sys.argv.index("--interrupts") + 1] if "--interrupts" in sys.argv else "auto"
    )
    try:
        result = trio.run(run, bdf, bad, bad_write, transport, interrupts)
    except AmigaFuseError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": exc.message}))
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
