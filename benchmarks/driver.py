#!/usr/bin/env python3
"""Driver benchmark: the VirtIO SCSI driver under QEMU against raw pread of the same file.

Usage: .venv/bin/python benchmarks/driver.py [--json] [--transport auto|legacy|modern] IMAGE

Measures, in one run:

* baseline: sequential ``os.pread`` of the image from the page cache (1 MiB and 64 KiB
  chunks) and 4 KiB random preads (IOPS), in this process;
* through the driver: sequential read and write with 64 KiB and 1 MiB requests, 16 in
  flight (MB/s); 4 KiB random reads at depth 1 and 16 (IOPS); kicks and interrupts per
  request from the transport's counters.

Writes go to a private copy of IMAGE (in the same directory as --scratch-dir, default
/dev/shm when it has room, else the system temp dir): the image is never modified.
Each workload runs ``--repeat`` passes after a warm-up; the best pass is reported (the
baseline is the best of 7 passes) with the median beside it: on a shared, loaded machine the
best pass says what the code can do, the median what it did.  Results are printed as
JSON with ``--json`` (one object), else as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amigafuse.driver.controller import DiskImage, open_qemu
from amigafuse.driver.scsi.disk import ScsiDisk
from benchmarks.parallel import run_parallel

KIB = 1024
MIB = 1024 * 1024
DEPTH = 16


# ----------------------------------------------------------------------------- baseline


def pread_sequential(path: Path, chunk: int, limit_bytes: int) -> float:
    """MB/s of sequential preads over the first ``limit_bytes`` (already cached)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        best = 0.0
        for _ in range(7):
            start = time.perf_counter()
            offset = 0
            while offset < limit_bytes:
                got = os.pread(fd, chunk, offset)
                if not got:
                    break
                offset += len(got)
            best = max(best, offset / (time.perf_counter() - start) / 1e6)
        return best
    finally:
        os.close(fd)


def pread_random(path: Path, size: int, limit_bytes: int, count: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        rng = random.Random(1)
        offsets = [rng.randrange(limit_bytes // size) * size for _ in range(count)]
        start = time.perf_counter()
        for off in offsets:
            os.pread(fd, size, off)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- driver


def counters(controller_stats: dict[str, Any]) -> dict[str, int]:
    """The transport counters that are plain integers (requests, kicks, interrupts...)."""
    return {k: v for k, v in controller_stats.items() if isinstance(v, int)}


def per_request(before: dict[str, int], after: dict[str, int], requests: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in after.items():
        if key in before and requests:
            out[f"{key}_per_request"] = round((value - before[key]) / requests, 4)
    return out


async def bench_driver(path: Path, transport: str, limit_bytes: int, repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with open_qemu([DiskImage(path)], transport=transport) as controller:  # type: ignore[arg-type]
        disk: ScsiDisk = controller.disks[0]
        results["transport"] = controller.transport_name
        results["disk"] = disk.info.description
        bs = disk.block_size
        region_blocks = min(disk.block_count, limit_bytes // bs)

        async def reader(lba: int, count: int) -> None:
            await disk.read(lba, count)

        payload_cache: dict[int, bytes] = {}

        async def writer(lba: int, count: int) -> None:
            data = payload_cache.get(count)
            if data is None:
                data = payload_cache[count] = os.urandom(count * bs)
            await disk.write(lba, data)

        async def measure(name: str, jobs: list[tuple[int, int]], depth: int, op: Any) -> None:
            # Warm-up pass (first touches, UNIT ATTENTIONs), then `repeat` measured passes;
            # the best pass is reported (as for the baseline), the median beside it.
            await run_parallel(jobs[: max(1, len(jobs) // 8)], depth, op)
            before = counters(controller.stats)
            times = [await run_parallel(jobs, depth, op) for _ in range(repeat)]
            after = counters(controller.stats)
            seconds = min(times)
            nbytes = sum(c for _, c in jobs) * bs
            entry: dict[str, Any] = {
                "requests": len(jobs),
                "depth": depth,
                "passes": repeat,
                "seconds": round(seconds, 4),
                "mb_per_s": round(nbytes / seconds / 1e6, 1),
                "iops": round(len(jobs) / seconds),
                "median_mb_per_s": round(nbytes / statistics.median(times) / 1e6, 1),
                "median_iops": round(len(jobs) / statistics.median(times)),
            }
            entry.update(per_request(before, after, len(jobs) * repeat))
            results[name] = entry

        for size, label in ((64 * KIB, "64k"), (MIB, "1m")):
            count = size // bs
            jobs = [(lba, count) for lba in range(0, region_blocks - count + 1, count)]
            await measure(f"seq_read_{label}_qd{DEPTH}", jobs, DEPTH, reader)
            await measure(f"seq_write_{label}_qd{DEPTH}", jobs, DEPTH, writer)

        rng = random.Random(2)
        small = max(1, 4 * KIB // bs)
        slots = region_blocks // small
        for depth, n in ((1, 3000), (DEPTH, 30000)):
            jobs = [(rng.randrange(slots) * small, small) for _ in range(n)]
            await measure(f"rand_read_4k_qd{depth}", jobs, depth, reader)
        await disk.flush()
        results["stats"] = controller.stats
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path, help="disk image to read (writes go to a copy)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--transport", default="auto", choices=["auto", "legacy", "modern"])
    parser.add_argument(
        "--limit-mib", type=int, default=256, help="use at most this much of the image (MiB)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="measured passes per workload (best reported)"
    )
    parser.add_argument("--scratch-dir", type=Path, default=None, help="where the copy goes")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        parser.error(f"{args.image}: no such image file")

    limit = args.limit_mib * MIB
    size = args.image.stat().st_size
    scratch_dir = args.scratch_dir
    if scratch_dir is None:
        shm = Path("/dev/shm")
        free = shutil.disk_usage(shm).free if shm.is_dir() else 0
        scratch_dir = shm if free > 2 * min(size, limit) + 64 * MIB else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix="amigafuse-bench-") as tmp:
        copy = Path(tmp) / args.image.name
        # Copy only the region the benchmark touches (sparse beyond it): the disk keeps
        # the image's size.
        with open(args.image, "rb") as src, open(copy, "wb") as dst:
            remaining = min(size, limit)
            while remaining > 0:
                chunk = src.read(min(remaining, 8 * MIB))
                if not chunk:
                    break
                dst.write(chunk)
                remaining -= len(chunk)
            dst.truncate(size)
        used = min(size, limit)
        baseline = {
            "pread_seq_1m_mb_per_s": round(pread_sequential(copy, MIB, used), 1),
            "pread_seq_64k_mb_per_s": round(pread_sequential(copy, 64 * KIB, used), 1),
            "pread_rand_4k_iops": round(pread_random(copy, 4 * KIB, used, 30000)),
        }
        driver = trio.run(bench_driver, copy, args.transport, limit, args.repeat)

    out: dict[str, Any] = {
        "image": str(args.image),
        "image_bytes": size,
        "region_bytes": used,
        "baseline": baseline,
        "driver": driver,
    }
    seq = driver.get(f"seq_read_1m_qd{DEPTH}", {}).get("mb_per_s", 0.0)
    rand = driver.get(f"rand_read_4k_qd{DEPTH}", {}).get("iops", 0)
    out["targets"] = {
        "seq_read_1m_vs_pread": round(seq / baseline["pread_seq_1m_mb_per_s"], 3),
        "seq_read_1m_target_0.5_met": seq >= 0.5 * baseline["pread_seq_1m_mb_per_s"],
        "rand_read_4k_qd16_iops": rand,
        "rand_read_4k_qd16_target_40000_met": rand >= 40000,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"image {args.image} ({size} bytes), transport {driver.get('transport')}")
        for key, value in baseline.items():
            print(f"  baseline {key:28} {value}")
        for key, value in driver.items():
            if isinstance(value, dict) and "mb_per_s" in value:
                extra = {k: v for k, v in value.items() if k.endswith("_per_request")}
                print(
                    f"  driver   {key:28} {value['mb_per_s']:9.1f} MB/s {value['iops']:8} IOPS  {extra}"
                )
        for key, value in out["targets"].items():
            print(f"  target   {key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
