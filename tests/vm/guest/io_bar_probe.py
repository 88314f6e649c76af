"""Run inside the test guest: the I/O-port BAR path of VfioBackend on a transitional
virtio-scsi controller (legacy register block in BAR0).  Prints one JSON object."""

from __future__ import annotations

import json
import sys

import trio

from amigafuse.driver.backends.vfio import open_vfio_backend

LEGACY_HOST_FEATURES = 0x00
LEGACY_QUEUE_SIZE = 0x0C
LEGACY_QUEUE_SELECT = 0x0E
LEGACY_STATUS = 0x12


async def probe(bdf: str) -> dict[str, object]:
    async with open_vfio_backend(bdf, arena_bytes=1 << 20) as be:
        info = be.bar_info(0)
        bar = be.map_bar(be.devfn, info)
        bar.write(LEGACY_STATUS, 1, 0)  # reset
        sizes = []
        for queue in range(4):
            bar.write(LEGACY_QUEUE_SELECT, 2, queue)
            sizes.append(await bar.read(LEGACY_QUEUE_SIZE, 2))
        bar.write(LEGACY_STATUS, 1, 1)
        status = await bar.read(LEGACY_STATUS, 1)
        bar.write(LEGACY_STATUS, 1, 0)
        return {
            "kind": info.kind.value,
            "size": info.size_bytes,
            "region": type(bar).__name__,
            "features": await bar.read(LEGACY_HOST_FEATURES, 4),
            "queue_sizes": sizes,
            "status_ack": status,
        }


if __name__ == "__main__":
    print(json.dumps(trio.run(probe, sys.argv[1])))
