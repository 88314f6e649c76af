"""The one workload runner the benchmarks share (driver.py, vfio.py).

``run_parallel(jobs, depth, op)``: ``depth`` trio workers take ``(lba, count)`` jobs in
order from one iterator and await ``op(lba, count)`` for each; returns the wall-clock
seconds of the whole run.  At most ``depth`` operations are in flight at any time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import trio


async def run_parallel(
    jobs: list[tuple[int, int]], depth: int, op: Callable[[int, int], Awaitable[None]]
) -> float:
    """Run ``op(lba, count)`` for every job with ``depth`` workers; return seconds.

    An exception from ``op`` cancels the other workers and propagates inside an
    ExceptionGroup (trio's nursery)."""
    it = iter(jobs)

    async def worker() -> None:
        for lba, count in it:
            await op(lba, count)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(min(depth, len(jobs))):
            nursery.start_soon(worker)
    return time.perf_counter() - start
