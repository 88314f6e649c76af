#!/usr/bin/env python3
"""VFIO benchmark: the driver through VFIO beside the QEMU-socket backend, in one guest.

Usage: .venv/bin/python benchmarks/vfio.py [--mib N] [--repeat N] [--runs N] [IMAGE]

This machine has no VFIO, so the benchmark boots the Linux test guest
(scripts/vm/guest.py: Debian 6.1 under TCG with a vIOMMU) with a private copy of IMAGE
(default: a fresh 64 MiB zero image) on a modern virtio-scsi controller at 00:04.0.
Inside the guest, in one run and on the same TCG CPU:

* baseline: sequential ``pread`` of the image copy over 9p and 4 KiB random preads;
* ``qemu``: the driver through the QEMU-socket backend (a nested QEMU in the guest,
  ``open_qemu``) on the same image file;
* ``vfio``: the driver through VFIO (``open_vfio``) on the modern controller the outer
  QEMU provides (IOVA arena, BARs mmap'ed, MSI-X); ``vfio_intx``: the same on a second
  modern controller (00:07.0) with INTx forced (an ISR read and an unmask per
  interrupt); ``vfio_pread``: a modern controller (00:06.0) driven with pread/pwrite BAR
  access; ``vfio_transitional_legacy``: a transitional controller (00:05.0) with the
  legacy transport (physical-DMA huge-page arena, 64 KiB requests, MSI-X), and
  ``vfio_transitional_legacy_intx`` the same at 00:08.0 with INTx.  Each controller has
  its own copy of the image; each result names its ``interrupt_mode``.

Each: sequential read and write with 64 KiB requests 16 in flight (MB/s), 4 KiB random
reads at depth 1 and 16 (IOPS), interrupts and kicks per request.  All controllers are
open at once and each workload runs on each in turn, ``--repeat`` rounds (default 3),
the fastest pass counting, the median pass beside it (``median_iops``; load on the
shared machine then hits all of them alike).  Only ratios inside
the one guest mean anything (TCG is ~10-50x slower than the host).  Prints one JSON
object.  The guest-side part is this file run with ``--in-guest``.

``ratios``: IOPS of one backend over another's, from the best passes, and (``_median``)
from the median passes.  ``--runs N`` boots N guests one after the other and adds
``spread``: for each ratio (VFIO over QEMU socket, MSI-X over INTx) its value in every
run and min/median/max.
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
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.parallel import run_parallel  # noqa: E402 (after the path set-up)

KIB = 1024
MIB = 1024 * 1024
DEPTH = 16
REPEAT = 3
BDF = "0000:00:04.0"
LEGACY_BDF = "0000:00:05.0"  # transitional controller: physical-DMA mode, 64 KiB requests
PREAD_BDF = "0000:00:06.0"  # a second modern controller, driven with pread/pwrite BAR access
INTX_BDF = "0000:00:07.0"  # a modern controller with INTx forced (vs MSI-X on BDF)
LEGACY_INTX_BDF = "0000:00:08.0"  # transitional, legacy transport, INTx forced
WORKLOADS = ("seq_read_64k_qd16", "seq_write_64k_qd16", "rand_read_4k_qd1", "rand_read_4k_qd16")
#: (ratio name prefix, numerator backend, denominator backend)
RATIOS = (
    ("vfio_over_qemu", "vfio", "qemu"),
    ("msix_over_intx", "vfio", "vfio_intx"),
    ("legacy_msix_over_intx", "vfio_transitional_legacy", "vfio_transitional_legacy_intx"),
)


# ----------------------------------------------------------------------------- guest side


def pread_seq(path: Path, chunk: int, limit_bytes: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        offset = 0
        while offset < limit_bytes:
            got = os.pread(fd, chunk, offset)
            if not got:
                break
            offset += len(got)
        return offset / (time.perf_counter() - start) / 1e6
    finally:
        os.close(fd)


def pread_rand(path: Path, limit_bytes: int, count: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        rng = random.Random(1)
        offsets = [rng.randrange(limit_bytes // (4 * KIB)) * 4 * KIB for _ in range(count)]
        start = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4 * KIB, off)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


def _int_counters(stats: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)}


class _Bench:
    """The workload on disk 0 of one open controller, one pass at a time."""

    def __init__(self, controller: Any, limit_bytes: int) -> None:
        self.controller = controller
        self.disk = controller.disks[0]
        self.bs = self.disk.block_size
        self.region_blocks = min(self.disk.block_count, limit_bytes // self.bs)
        self.payload = os.urandom(64 * KIB)
        backend = getattr(controller.transport, "backend", None)
        self.results: dict[str, Any] = {
            "transport": controller.transport_name,
            "interrupt_mode": getattr(backend, "interrupt_mode", "?"),
        }
        self.pass_seconds: dict[str, list[float]] = {}

    async def reader(self, lba: int, count: int) -> None:
        await self.disk.read(lba, count)

    async def writer(self, lba: int, count: int) -> None:
        await self.disk.write(lba, self.payload[: count * self.bs])

    async def one_pass(self, name: str, jobs: list[tuple[int, int]], depth: int, write: bool) -> None:
        """Run ``jobs``; keep the fastest pass (with its counters) under ``name``."""
        op = self.writer if write else self.reader
        before = _int_counters(self.controller.stats)
        seconds = await run_parallel(jobs, depth, op)
        after = _int_counters(self.controller.stats)
        passes = self.pass_seconds.setdefault(name, [])
        passes.append(seconds)
        best = self.results.get(name)
        if best is not None:
            best["median_iops"] = round(len(jobs) / statistics.median(passes))
            best["pass_iops"] = [round(len(jobs) / t) for t in passes]
        if best is not None and best["seconds"] <= seconds:
            return
        nbytes = sum(c for _, c in jobs) * self.bs
        entry: dict[str, Any] = {
            "requests": len(jobs),
            "seconds": round(seconds, 4),
            "mb_per_s": round(nbytes / seconds / 1e6, 2),
            "iops": round(len(jobs) / seconds),
            "median_iops": round(len(jobs) / statistics.median(passes)),
            "pass_iops": [round(len(jobs) / t) for t in passes],
        }
        for key, value in after.items():
            if key in before:
                entry[f"{key}_per_request"] = round((value - before[key]) / len(jobs), 4)
        self.results[name] = entry


async def bench_all(
    openers: dict[str, Callable[[], AbstractAsyncContextManager[Any]]],
    limit_bytes: int,
    rand_count: int,
    repeat: int = REPEAT,
) -> dict[str, Any]:
    """Open every controller at once, then run each workload on each of them in turn,
    REPEAT rounds (A B C A B C ...), so load on the shared machine hits all alike; the
    fastest pass of each counts."""
    from contextlib import AsyncExitStack

    out: dict[str, Any] = {}
    benches: dict[str, _Bench] = {}
    async with AsyncExitStack() as stack:
        for name, opener in openers.items():
            start = time.perf_counter()
            try:
                controller = await stack.enter_async_context(opener())
            except Exception as exc:  # report, and keep the others
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            benches[name] = _Bench(controller, limit_bytes)
            benches[name].results["open_seconds"] = round(time.perf_counter() - start, 3)
        if not benches:
            return out
        bs_any = next(iter(benches.values()))
        count = 64 * KIB // bs_any.bs
        seq = [(lba, count) for lba in range(0, bs_any.region_blocks - count + 1, count)]
        rng = random.Random(2)
        small = max(1, 4 * KIB // bs_any.bs)
        slots = bs_any.region_blocks // small
        workloads = [
            (f"seq_read_64k_qd{DEPTH}", seq, DEPTH, False),
            (f"seq_write_64k_qd{DEPTH}", seq, DEPTH, True),
            ("rand_read_4k_qd1", [(rng.randrange(slots) * small, small) for _ in range(rand_count)], 1, False),
            (f"rand_read_4k_qd{DEPTH}", [(rng.randrange(slots) * small, small) for _ in range(rand_count)], DEPTH, False),
        ]
        failed: set[str] = set()

        async def attempt(bname: str, step: Awaitable[object]) -> None:
            # A backend that fails is reported and left out of later passes.
            try:
                await step
            except Exception as exc:
                benches[bname].results["error"] = f"{type(exc).__name__}: {exc}"
                failed.add(bname)

        for bname, bench in benches.items():  # warm-up: first touches, UNIT ATTENTIONs
            await attempt(bname, run_parallel(seq[: max(1, len(seq) // 16)], DEPTH, bench.reader))
        for name, jobs, depth, write in workloads:
            for _round in range(repeat):
                for bname, bench in benches.items():
                    if bname not in failed:
                        started = time.monotonic()
                        await attempt(bname, bench.one_pass(name, jobs, depth, write))
                        print(f"{bname} {name} {time.monotonic() - started:.1f}s", file=sys.stderr)
        for bname, bench in benches.items():
            if bname not in failed:
                await attempt(bname, bench.disk.flush())
    for name, bench in benches.items():
        out[name] = bench.results
    return out


def in_guest(image: Path, limit_bytes: int, rand_count: int, repeat: int = REPEAT) -> dict[str, Any]:
    import trio

    from amigafuse.driver.backends.vfio import open_vfio
    from amigafuse.driver.controller import DiskImage, open_qemu

    out: dict[str, Any] = {
        "baseline": {
            "pread_seq_64k_mb_per_s": round(pread_seq(image, 64 * KIB, limit_bytes), 2),
            "pread_rand_4k_iops": round(pread_rand(image, limit_bytes, rand_count)),
        }
    }

    def vfio_opener(
        bdf: str, mmap_bars: bool = True, transport: str = "modern", interrupts: str = "auto"
    ) -> Callable[[], AbstractAsyncContextManager[Any]]:
        return lambda: open_vfio(
            bdf,
            transport=transport,  # type: ignore[arg-type]
            mmap_bars=mmap_bars,
            interrupts=interrupts,  # type: ignore[arg-type]
        )

    def qemu_opener() -> AbstractAsyncContextManager[Any]:
        return open_qemu([DiskImage(image)], transport="modern")

    openers = {
        "vfio": vfio_opener(BDF),
        "vfio_intx": vfio_opener(INTX_BDF, interrupts="intx"),
        "vfio_pread": vfio_opener(PREAD_BDF, mmap_bars=False),
        "vfio_transitional_legacy": vfio_opener(LEGACY_BDF, transport="legacy"),
        "vfio_transitional_legacy_intx": vfio_opener(
            LEGACY_INTX_BDF, transport="legacy", interrupts="intx"
        ),
        "qemu": qemu_opener,
    }
    out.update(trio.run(bench_all, openers, limit_bytes, rand_count, repeat))
    return out


# ----------------------------------------------------------------------------- host side


def ratios_of(result: dict[str, Any]) -> dict[str, float]:
    """IOPS ratios between backends of one run (see RATIOS), where both have the workload."""
    out: dict[str, float] = {}
    for prefix, num, den in RATIOS:
        for key in WORKLOADS:
            a, b = result.get(num, {}).get(key), result.get(den, {}).get(key)
            if a and b:
                out[f"{key}_{prefix}"] = round(a["iops"] / b["iops"], 2)
                out[f"{key}_{prefix}_median"] = round(a["median_iops"] / b["median_iops"], 2)
    return out


def spread_of(runs: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """For every ratio: its value in each run, and min/median/max."""
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({k for r in runs for k in r}):
        values = [r[key] for r in runs if key in r]
        out[key] = {
            "runs": values,
            "min": min(values),
            "median": round(statistics.median(values), 2),
            "max": max(values),
        }
    return out


def one_run(image: Path | None, mib: int, rand: int, repeat: int) -> dict[str, Any] | None:
    """Boot one guest, run the benchmark in it; the result, or None (reported)."""
    from scripts.vm.guest import Controller, Disk, GuestError, guest_modprobe, run_in_guest

    limit = mib * MIB
    modern = {"vfio": ("04.0", True), "pread": ("06.0", True), "intx": ("07.0", True)}
    transitional = {"legacy": ("05.0", False), "legacy_intx": ("08.0", False)}
    with tempfile.TemporaryDirectory(prefix="amigafuse-vfio-bench-") as tmp:
        copies = {name: Path(tmp) / f"{name}.img" for name in (*modern, *transitional, "qemu")}
        size = max(limit, 64 * MIB)
        first = copies["vfio"]
        if image:
            shutil.copyfile(image, first)
            size = first.stat().st_size
        else:
            with open(first, "wb") as f:
                f.truncate(size)
        for path in copies.values():
            if path != first:
                shutil.copyfile(first, path)
        controllers = [
            Controller(disks=(Disk(copies[name]),), addr=addr, modern=is_modern)
            for name, (addr, is_modern) in (*modern.items(), *transitional.items())
        ]
        binds = "".join(
            f"$AMIGAFUSE_GUEST_PYTHON -m amigafuse bind-vfio {c.bdf} >&2 || exit 90\n"
            for c in controllers
        )
        script = (
            guest_modprobe("vfio_pci", "vfio_iommu_type1")
            + "\n"
            + binds
            + "echo 4 > /proc/sys/vm/nr_hugepages\n"
            + f"$AMIGAFUSE_GUEST_PYTHON benchmarks/vfio.py --in-guest {copies['qemu']} "
            + f"--mib {mib} --rand {rand} --repeat {repeat}\n"
        )
        try:
            res = run_in_guest(script, controllers=controllers, memory_mb=1024, timeout=2400)
        except GuestError as exc:
            print(f"vfio benchmark: {exc}", file=sys.stderr)
            return None
    sys.stderr.write(res.stderr)  # progress lines from the guest
    if res.rc != 0:
        print(f"vfio benchmark: guest failed ({res.rc}):\n{res.stderr[-4000:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    result["guest_seconds"] = round(res.seconds, 1)
    result["image"] = str(image) if image else f"zero image of {size} bytes"
    result["ratios"] = ratios_of(result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", type=Path, help="disk image (a private copy is used)")
    parser.add_argument("--mib", type=int, default=32, help="MiB of the image the workload touches")
    parser.add_argument("--rand", type=int, default=1000, help="random 4 KiB reads per depth")
    parser.add_argument("--repeat", type=int, default=REPEAT, help="passes per workload in a run")
    parser.add_argument("--runs", type=int, default=1, help="guests booted one after the other")
    parser.add_argument("--in-guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        print(json.dumps(in_guest(args.in_guest, args.mib * MIB, args.rand, args.repeat)))
        return 0
    runs = []
    failed = 0
    for n in range(args.runs):
        print(f"vfio benchmark: run {n + 1} of {args.runs}", file=sys.stderr)
        result = one_run(args.image, args.mib, args.rand, args.repeat)
        if result is None:
            failed += 1  # reported; the other runs still count
            continue
        runs.append(result)
    if not runs:
        return 1
    out: dict[str, Any] = dict(runs[-1]) if args.runs == 1 else {"runs": runs}
    if args.runs > 1:
        out["failed_runs"] = failed
        out["spread"] = spread_of([r["ratios"] for r in runs])
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
