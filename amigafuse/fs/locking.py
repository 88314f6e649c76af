"""The volume lock both engines use (pure trio, no I/O).

Design note (invariant): a volume serialises its operations with one ``trio.Lock``;
file-data reads locate their blocks holding it and may then read the device outside it,
counted in the volume's ``_data_reads`` (``_reads_done`` is set when none is left).
Every other holder of the lock waits, holding it, until no such read is at the device,
so no block such a read is reading is changed or reused under it.  Data reads take the
lock *beside* reads (they only add readers and must not wait for each other).
"""

from __future__ import annotations

from typing import Protocol

import trio


class ReadCountingVolume(Protocol):
    _lock: trio.Lock
    _data_reads: int
    _reads_done: trio.Event


class VolumeLock:
    """``async with`` for a volume's lock (see the module's design note), taken without a
    trip through the scheduler when it is free (most operations are shorter than a
    reschedule).  Holds no state of its own use, so one instance serves every task.
    Cancellation while waiting releases the lock and changes nothing."""

    __slots__ = ("_beside_reads", "_vol")

    def __init__(self, vol: ReadCountingVolume, *, beside_reads: bool) -> None:
        self._vol = vol
        self._beside_reads = beside_reads

    async def __aenter__(self) -> None:
        vol = self._vol
        try:
            vol._lock.acquire_nowait()
        except trio.WouldBlock:
            await vol._lock.acquire()
        try:
            while vol._data_reads and not self._beside_reads:
                await vol._reads_done.wait()
        except BaseException:
            vol._lock.release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._vol._lock.release()
