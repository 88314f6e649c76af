"""``amigafuse umount``: unmount, and wait until the volumes are flushed and marked clean."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from amigafuse.errors import AmigaFuseError, Busy, UsageError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "umount",
        help="unmount an amigafuse mount and wait until its volumes are clean on disk",
        description=(
            "Unmount MOUNTPOINT (the kernel first writes back cached data), then wait until "
            "the amigafuse process serving it has flushed and closed every volume (marked "
            "clean) and exited. Exit status 0 only when all of that happened."
        ),
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-l", "--lazy", action="store_true",
                   help="detach now even if files are open (cached data is synced first); "
                   "does not wait: the volumes are closed when the last open file is")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for the serving process to finish (default 300)")
    p.set_defaults(handler=run)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; it is only waiting for its parent.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run(args: argparse.Namespace) -> int:
    from amigafuse.fuse.session import mount_device_number, pid_file, syncfs, unmount

    mountpoint = os.path.abspath(args.mountpoint)
    if mount_device_number(mountpoint) is None:
        raise UsageError(f"{mountpoint} is not a mount point")
    pid: int | None = None
    try:
        pid = int(pid_file(mountpoint).read_text().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"amigafuse" not in f.read():
                pid = None  # a stale pid file whose number now belongs to someone else
    except (OSError, ValueError, IndexError):
        pid = None
    if args.lazy:
        syncfs(mountpoint)
    done, message = unmount(mountpoint, lazy=args.lazy)
    if not done:
        if "busy" in message.lower():
            raise Busy(
                f"{mountpoint} is busy: close the files and shells using it (see "
                f"'fuser -vm {mountpoint}'), or use --lazy"
            )
        raise AmigaFuseError(f"could not unmount {mountpoint}: {message}")
    if pid is None:
        return 0  # not ours, or started without a pid file: nothing to wait for
    if args.lazy:
        # Detached: the kernel keeps the filesystem until its last open file is closed,
        # and only then lets amigafuse close the volumes.
        if _pid_alive(pid):
            print(f"detached {mountpoint}; amigafuse (pid {pid}) closes the volumes when the "
                  "last file open on it is closed")
        return 0
    deadline = time.monotonic() + args.timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            raise AmigaFuseError(
                f"unmounted, but amigafuse (pid {pid}) is still closing the volumes after "
                f"{args.timeout:.0f} s; do not use the disk until it has exited"
            )
        time.sleep(0.05)
    return 0
