"""Serve MemoryVolumes on a real FUSE mount, in the foreground (run as a subprocess by tests).

    python -m tests.fuse.serve_memory MOUNTPOINT [--volumes N] [--ro] [--report FILE] [-o OPTS]

Prints ``READY`` on stdout once the mount is live.  On exit writes a JSON report (close
counts of every volume) to ``--report``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import trio

from amigafuse.fuse.ops import AmigaOperations, MountedVolume
from amigafuse.fuse.options import parse_options
from amigafuse.fuse.session import serve
from tests.fuse.memvolume import MemoryVolume


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mountpoint")
    p.add_argument("--volumes", type=int, default=0, help="0: one volume at the mount point")
    p.add_argument("--ro", action="store_true")
    p.add_argument("--report")
    p.add_argument("-o", action="append", default=[])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    opts = parse_options(args.o)
    count = max(1, args.volumes)
    vols = [MountedVolume(f"DH{i}", MemoryVolume(f"Vol{i}", read_only=args.ro), args.ro)
            for i in range(count)]
    ops = AmigaOperations(vols, opts, single=args.volumes == 0, mountpoint=args.mountpoint)

    def ready() -> None:
        print("READY", flush=True)

    problems = trio.run(lambda: serve(ops, args.mountpoint, opts.fuse_options("memory"),
                                      on_ready=ready))
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"closed": [v.volume.close_count for v in vols],  # type: ignore[attr-defined]
                       "problems": problems}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
