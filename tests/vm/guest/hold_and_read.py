"""Run inside the test guest: open the controller at argv[1] through VFIO, signal
readiness by creating argv[2], read disk 0 in a loop until an error ends it, print the
error (JSON), wait for ``argv[2] minus suffix + .done``, then print a final JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from amigafuse.driver.backends.vfio import open_vfio
from amigafuse.errors import AmigaFuseError


async def run(bdf: str, ready: Path) -> dict[str, object]:
    """Reads until an error, then stays inside the open controller (like an idle mount)
    until ``<ready>.done`` exists: the device must be given back without our closing."""
    reads = 0
    out: dict[str, object] = {}
    done = ready.with_suffix(".done")
    try:
        async with open_vfio(bdf) as controller:
            disk = controller.disks[0]
            ready.touch()
            with trio.move_on_after(60):
                try:
                    while True:
                        await disk.read(reads % disk.block_count, 1)
                        reads += 1
                        await trio.sleep(0.01)
                except AmigaFuseError as exc:
                    out["error"] = type(exc).__name__
                    out["message"] = exc.message
                print(json.dumps(out), flush=True)
                while not done.exists():
                    await trio.sleep(0.05)
    except AmigaFuseError as exc:
        out["close_error"] = f"{type(exc).__name__}: {exc.message}"
    out["reads"] = reads
    return out


if __name__ == "__main__":
    print(json.dumps(trio.run(run, sys.argv[1], Path(sys.argv[2]))), flush=True)
