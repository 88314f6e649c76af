"""Run inside the test guest: open the controller at argv[1] through VFIO, signal
readiness by creating argv[2], then read disk 0 in a loop until an error ends it.
Prints one JSON object: the error, how many reads succeeded, whether the process ended
on its own (no hang)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import trio

from amigafuse.driver.backends.vfio import open_vfio
from amigafuse.errors import AmigaFuseError


async def run(bdf: str, ready: Path) -> dict[str, object]:
    reads = 0
    out: dict[str, object] = {}
    try:
        async with open_vfio(bdf) as controller:
            disk = controller.disks[0]
            ready.touch()
            with trio.fail_after(60):
                while True:
                    await disk.read(reads % disk.block_count, 1)
                    reads += 1
                    await trio.sleep(0.01)
    except AmigaFuseError as exc:
        out["error"] = type(exc).__name__
        out["message"] = exc.message
    except trio.TooSlowError:
        out["error"] = "TooSlowError"
    out["reads"] = reads
    out["closed_at"] = time.monotonic()
    return out


if __name__ == "__main__":
    print(json.dumps(trio.run(run, sys.argv[1], Path(sys.argv[2]))), flush=True)
