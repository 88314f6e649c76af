"""The FFS data read path: from a read's device ranges to its bytes.

:meth:`FfsVolumeBase._plan_read <amigafuse.fs.ffs.volume.FfsVolumeBase>` turns a read
into device ranges (first block, count) in file order; :func:`read_planned` fetches them.

Design notes (invariants):

* Few requests: ranges that follow each other on the disk with small gaps between them
  (a file FFS wrote has an extension block after every 72 data blocks: 29 ranges per
  MiB) are fetched as one *span* per device request, gaps included, up to the device's
  maximum transfer (:func:`merge_ranges`, pure).  The gap blocks are read and dropped;
  reading them has no effect on anything.
* Zero copy where possible: a read that is one span and one range is returned as the
  device's lease itself (for the VirtIO disk: a view of the request's DMA buffer), only
  narrowed to the bytes asked for.  Anything else is gathered into one new buffer, one
  copy per byte, each span's lease released as soon as its bytes are copied.
* Bounded buffers: at most ``in_flight`` spans are at the device at once, and each
  worker holds at most one lease, never across an await, so a read never holds more
  than ``in_flight`` of the device's buffers and cannot starve other requests (the
  VirtIO queue has 16).
* Errors: the first DeviceError cancels the other requests of the read and is raised
  as itself; every lease taken is released on every path (cancellation included).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from amigafuse.blockdev.base import ReadLease
from amigafuse.blockdev.window import FsBlockIO
from amigafuse.errors import DeviceError

MERGE_GAP_BYTES = 32 * 1024  # ranges this close on the disk are read in one request


@dataclass(frozen=True, slots=True)
class Span:
    """One device request of a read: ``count`` blocks from ``start``; ``pieces`` are
    (block offset in the span, block count, byte offset in the read's output)."""

    start: int
    count: int
    pieces: tuple[tuple[int, int, int], ...]


def merge_ranges(
    ranges: list[tuple[int, int]], block_size: int, max_gap_blocks: int, max_span_blocks: int
) -> list[Span]:
    """Group ``ranges`` (first block, count), in file order, into spans: a range joins
    the span before it when it starts at most ``max_gap_blocks`` after that span's end
    (never before it: going back on the disk starts a new span) and the span stays
    within ``max_span_blocks``.  A range longer than ``max_span_blocks`` is its own span
    (the device splits it).  Pure; output offsets follow the ranges' order."""
    spans: list[Span] = []
    start = count = 0
    pieces: list[tuple[int, int, int]] = []
    out_pos = 0
    for first, n in ranges:
        gap = first - (start + count)
        if pieces and 0 <= gap <= max_gap_blocks and first + n - start <= max_span_blocks:
            pieces.append((first - start, n, out_pos))
            count = first + n - start
        else:
            if pieces:
                spans.append(Span(start, count, tuple(pieces)))
            start, count, pieces = first, n, [(0, n, out_pos)]
        out_pos += n * block_size
    if pieces:
        spans.append(Span(start, count, tuple(pieces)))
    return spans


async def read_planned(
    io: FsBlockIO,
    ranges: list[tuple[int, int]],
    skip: int,
    nbytes: int,
    *,
    max_span_blocks: int,
    in_flight: int,
) -> ReadLease:
    """The ``nbytes`` bytes after the first ``skip`` of the data in ``ranges`` (device
    ranges in file order), as a lease the caller releases (zero-copy when the data is
    one contiguous range: see the module notes).  At most ``in_flight`` device requests
    at once.  Raises the first DeviceError (the other requests are then cancelled);
    cancellation releases every lease taken."""
    bs = io.fs_block_size
    gap = max(0, MERGE_GAP_BYTES // bs)
    spans = merge_ranges(ranges, bs, gap, max(1, max_span_blocks))
    if len(spans) == 1 and len(spans[0].pieces) == 1:
        lease = await io.read_lease(spans[0].start, spans[0].count)
        if skip == 0 and len(lease.view) == nbytes:
            return lease
        return lease.narrowed(skip, skip + nbytes)
    out = bytearray(sum(n for _, n in ranges) * bs)
    pending = iter(spans)
    failure: list[DeviceError] = []

    async def worker(cancel_scope: trio.CancelScope) -> None:
        for span in pending:
            try:
                lease = await io.read_lease(span.start, span.count)
            except DeviceError as exc:
                failure.append(exc)
                cancel_scope.cancel()
                return
            with lease:  # no await inside: the copy is done before anyone else runs
                view = lease.view
                for offset, n, pos in span.pieces:
                    out[pos : pos + n * bs] = view[offset * bs : (offset + n) * bs]

    tasks = min(in_flight, len(spans))
    if tasks <= 1:
        await worker(trio.CancelScope())
    else:
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker, nursery.cancel_scope)
    if failure:
        raise failure[0]
    return ReadLease(memoryview(out)[skip : skip + nbytes])


def lease_bytes(lease: ReadLease) -> bytes:
    """A copy of ``lease.view`` as ``bytes`` (the caller still releases the lease), or
    the very ``bytes`` object it views when that is all of it and nothing was lent."""
    view = lease.view
    if not lease.lent and isinstance(view.obj, bytes) and len(view.obj) == view.nbytes:
        return view.obj
    return bytes(view)
