"""The FFS block bitmap held in memory, and the allocator.  Pure: no I/O, no trio.

Bit ``k`` stands for block ``reserved + k``; a set bit means *free* (as on disk).  On disk
each bitmap block holds ``B/4 - 1`` big-endian longs, bit 0 of the first long being the
first block it covers; in memory the bits are kept little-endian per byte (byte ``k>>3``,
bit ``k&7``) so that a search for free blocks is a byte scan done in C.
"""

from __future__ import annotations

import re
from array import array

from amigafuse.fs.ffs.layout import runs

_NONZERO = re.compile(rb"[^\x00]")
_FULL = re.compile(rb"\xff+")


def _swap_longs(raw: bytes) -> bytes:
    arr = array("I")
    if arr.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte I
        raise RuntimeError("array('I') is not 32-bit here")
    arr.frombytes(raw)
    arr.byteswap()
    return arr.tobytes()


def _clear_bits(buf: bytearray, first_bit: int) -> None:
    """Clear bit ``first_bit`` and every bit after it to the end of ``buf`` (bit k is
    bit ``k & 7`` of byte ``k >> 3``); whole bytes at once (a 32 KiB-block bitmap page
    holds 262,112 bits: bit by bit that was ~90 ms a call)."""
    byte = first_bit >> 3
    if first_bit & 7:
        buf[byte] &= (1 << (first_bit & 7)) - 1
        byte += 1
    buf[byte:] = bytes(len(buf) - byte)


class Bitmap:
    """Free-block bitmap of ``block_count`` blocks starting at block ``reserved``."""

    def __init__(self, reserved: int, block_count: int, block_size: int) -> None:
        self.reserved = reserved
        self.count = block_count  # blocks covered (volume blocks - reserved)
        self.longs_per_block = block_size // 4 - 1
        self.bits_per_block = self.longs_per_block * 32
        self.bytes_per_block = self.longs_per_block * 4
        self.pages = -(-block_count // self.bits_per_block)
        self._bits = bytearray(self.pages * self.bytes_per_block)
        self.dirty_pages: set[int] = set()
        # free bits among the ``count`` covered, kept exact by every change; None: not
        # known (after a load), counted by the next free_count (a scan of the whole map)
        self._free: int | None = 0

    # ------------------------------------------------------------------ disk form
    def load_page(self, page: int, map_bytes: bytes) -> None:
        """Take the ``map`` of bitmap block number ``page`` (big-endian longs)."""
        start = page * self.bytes_per_block
        self._bits[start : start + self.bytes_per_block] = _swap_longs(map_bytes)
        self._free = None

    def page_map(self, page: int) -> bytes:
        """The on-disk ``map`` of bitmap page ``page``, bits past the volume clear."""
        start = page * self.bytes_per_block
        chunk = bytearray(self._bits[start : start + self.bytes_per_block])
        # bits beyond the last block must stay 0 (not free)
        first_bit = page * self.bits_per_block
        last_valid = self.count - first_bit
        if last_valid < self.bits_per_block:
            _clear_bits(chunk, max(last_valid, 0))
        return _swap_longs(bytes(chunk))

    def set_all(self, free: bool) -> None:
        self._bits[:] = (b"\xff" if free else b"\0") * len(self._bits)
        if free:
            _clear_bits(self._bits, self.count)
        self._free = self.count if free else 0
        self.dirty_pages.update(range(self.pages))

    # ------------------------------------------------------------------ queries
    def in_range(self, block: int) -> bool:
        return self.reserved <= block < self.reserved + self.count

    def is_free(self, block: int) -> bool:
        k = block - self.reserved
        return bool(self._bits[k >> 3] >> (k & 7) & 1)

    def free_count(self) -> int:
        """Free blocks.  O(1) except the first call after :meth:`load_page`."""
        if self._free is None:
            self._free = self._count_free(0, self.count)
        return self._free

    def _count_free(self, k: int, end: int) -> int:
        """Free bits ``k <= bit < end`` (bit numbers, not blocks)."""
        if end <= k:
            return 0
        lo = k >> 3
        value = int.from_bytes(self._bits[lo : ((end - 1) >> 3) + 1], "little") >> (k - lo * 8)
        return (value & ((1 << (end - k)) - 1)).bit_count()

    # ------------------------------------------------------------------ changes
    def mark(self, block: int, free: bool) -> None:
        if not self.in_range(block):
            raise ValueError(f"block {block} is outside the bitmap")
        k = block - self.reserved
        was = self._bits[k >> 3] >> (k & 7) & 1
        if free:
            self._bits[k >> 3] |= 1 << (k & 7)
        else:
            self._bits[k >> 3] &= ~(1 << (k & 7)) & 0xFF
        if self._free is not None:
            self._free += int(free) - was
        self.dirty_pages.add(k // self.bits_per_block)

    def mark_blocks(self, blocks: list[int], free: bool) -> None:
        """Mark many blocks; runs of consecutive blocks are set a byte at a time (the
        runs found with :func:`~amigafuse.fs.ffs.layout.runs`: a few Python steps per
        run, not per block)."""
        for start, count in runs(blocks, limit=1 << 62):
            self.mark_range(start, count, free)

    def mark_range(self, start: int, count: int, free: bool) -> None:
        if count <= 0:
            return
        if not (self.in_range(start) and self.in_range(start + count - 1)):
            raise ValueError(f"blocks {start}..{start + count - 1} are outside the bitmap")
        k = start - self.reserved
        end = k + count
        if self._free is not None:
            self._free += (count if free else 0) - self._count_free(k, end)
        while k < end and k & 7:
            self._set_bit(k, free)
            k += 1
        nbytes = (end - k) >> 3
        if nbytes:
            self._bits[k >> 3 : (k >> 3) + nbytes] = (b"\xff" if free else b"\0") * nbytes
            k += nbytes * 8
        while k < end:
            self._set_bit(k, free)
            k += 1
        self.dirty_pages.update(
            range((start - self.reserved) // self.bits_per_block, (end - 1) // self.bits_per_block + 1)
        )

    def _set_bit(self, k: int, free: bool) -> None:
        if free:
            self._bits[k >> 3] |= 1 << (k & 7)
        else:
            self._bits[k >> 3] &= ~(1 << (k & 7)) & 0xFF

    def find_free(self, goal: int, count: int) -> list[int]:
        """Up to ``count`` free blocks, searching forward from ``goal`` and wrapping.
        Prefers whole free bytes (runs of 8) so large files stay contiguous.  Does not
        mark them; returns fewer than ``count`` when the volume is that full."""
        out: list[int] = []
        if count <= 0:
            return out
        k0 = min(max(goal - self.reserved, 0), self.count - 1) if self.count else 0
        nbytes = len(self._bits)
        start_byte = k0 >> 3
        for lo, hi in ((start_byte, nbytes), (0, start_byte)):
            pos = lo
            while pos < hi and len(out) < count:
                m = _NONZERO.search(self._bits, pos, hi)
                if m is None:
                    break
                i = m.start()
                if count - len(out) >= 8:
                    run = _FULL.match(self._bits, i, hi)
                    if run is not None:
                        need = count - len(out)
                        nb = min(run.end() - i, -(-need // 8))
                        # the run's bits, at most ``need`` of them, none past the last
                        # block (a whole byte may reach beyond it)
                        k_end = min((i + nb) * 8, self.count, i * 8 + need)
                        out.extend(range(i * 8 + self.reserved, k_end + self.reserved))
                        pos = i + nb
                        continue
                byte = self._bits[i]
                for bit in range(8):
                    kk = i * 8 + bit
                    if byte >> bit & 1 and kk < self.count and len(out) < count:
                        out.append(kk + self.reserved)
                pos = i + 1
            if len(out) >= count:
                break
        return out

    def find_free_run_end(self, goal: int, count: int, exclude: set[int]) -> list[int]:
        """Up to ``count`` free blocks taken from the *end* of the run of free blocks at
        or after ``goal`` (highest first), not in ``exclude``; falls back to
        :meth:`find_free` when there is no such run.  Does not mark them."""
        if count <= 0:
            return []
        k0 = max(goal - self.reserved, 0)
        if k0 >= self.count:
            k0 = 0
        out: list[int] = []
        m = _NONZERO.search(self._bits, k0 >> 3)
        if m is not None:
            run = _FULL.match(self._bits, m.start())
            if run is not None and run.end() - run.start() >= 2:
                k = min(run.end() * 8, self.count) - 1
                low = run.start() * 8
                while k >= low and len(out) < count:
                    b = k + self.reserved
                    if b not in exclude and self.is_free(b):
                        out.append(b)
                    k -= 1
        if len(out) < count:
            more = [b for b in self.find_free(goal, count + len(exclude) + len(out)) if b not in exclude and b not in out]
            out.extend(more[: count - len(out)])
        return out

    def copy_bits(self) -> bytes:
        return bytes(self._bits)
