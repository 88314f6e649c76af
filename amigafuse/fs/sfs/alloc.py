"""The in-memory free-space bitmap of an SFS volume (pure: no I/O).

Encoding as on disk: one bit per block, most significant bit first, a set bit means
*free*.  Bitmap block ``i`` covers blocks ``i * per_block ..``; ``encode_block(i)``
returns the bytes after its 12-byte header.

Invariants: ``free_count`` equals the number of set bits below ``total``; bits at and
above ``total`` (padding of the last bitmap block) are 0.  Blocks freed by the
transaction being built are kept in ``held`` and are not handed out again until the
transaction commits (the committed metadata may still reference them).  The last
``reserve`` usable blocks are not handed out by ``allocate``: they keep room for a
transaction's records (the handler keeps ALWAYSFREE blocks for the same reason).
"""

from __future__ import annotations

import re

from amigafuse.errors import CorruptError, NoSpace

_NONZERO = re.compile(rb"[^\x00]")
_NOT_FULL = re.compile(rb"[^\xff]")


class FreeMap:
    def __init__(self, total: int, per_block: int, raw: bytes) -> None:
        self.total = total
        self.per_block = per_block
        nbytes = (total + 7) // 8
        bits = bytearray(raw[:nbytes].ljust(nbytes, b"\0"))
        if total % 8:
            bits[-1] &= (0xFF << (8 - total % 8)) & 0xFF
        self.bits = bits
        self.free_count = int.from_bytes(bits, "big").bit_count()
        self.dirty_blocks: set[int] = set()
        self.held: set[int] = set()
        self.changes: list[tuple[int, int, bool]] | None = None  # undo log: (start, count, was_free)
        self.reserve = 0

    # ------------------------------------------------------------------ queries
    def is_free(self, block: int) -> bool:
        return bool(self.bits[block >> 3] & (0x80 >> (block & 7)))

    def usable(self, block: int) -> bool:
        return self.is_free(block) and block not in self.held

    def run_length(self, start: int, limit: int) -> int:
        """Usable blocks from ``start`` on, at most ``limit`` (whole 0xFF bytes of the
        map are taken at once)."""
        end = min(self.total, start + limit)
        pos = start
        bits = self.bits
        while pos < end and pos & 7:
            if not bits[pos >> 3] & (0x80 >> (pos & 7)) or pos in self.held:
                return pos - start
            pos += 1
        if end - pos >= 8:
            m = _NOT_FULL.search(bits, pos >> 3, end >> 3)
            full_end = (m.start() if m else end >> 3) << 3
            if self.held:
                inside = [h for h in self.held if pos <= h < full_end]
                if inside:
                    return min(inside) - start
            pos = full_end
        while pos < end:
            if not bits[pos >> 3] & (0x80 >> (pos & 7)) or pos in self.held:
                break
            pos += 1
        return pos - start

    def next_free(self, start: int) -> int:
        """First usable block at or after ``start`` (wrapping once), or -1."""
        for lo, hi in ((start, self.total), (0, start)):
            pos = lo
            while pos < hi:
                m = _NONZERO.search(self.bits, pos >> 3)
                if m is None:
                    break
                byte = m.start()
                base = byte << 3
                value = self.bits[byte]
                found = -1
                for bit in range(8):
                    b = base + bit
                    if b >= pos and value & (0x80 >> bit) and b < hi and b not in self.held:
                        found = b
                        break
                if found >= 0:
                    return found
                pos = max(pos, base + 8)
        return -1

    # ------------------------------------------------------------------ changes
    def _set(self, start: int, count: int, free: bool) -> None:
        """Mark blocks free or used.  CorruptError (nothing changed) when a block lies
        outside the bitmap or already has that state (the disk's bitmap disagrees with
        its files).  Whole bytes are checked and set at once."""
        end = start + count
        if start < 0 or end > self.total:
            bad = start if start < 0 else max(start, self.total)
            raise CorruptError(f"block {bad} lies outside the bitmap", block=bad, field="bitmap")
        bits = self.bits
        head = min(end, (start + 7) & ~7)  # bits before the first whole byte
        tail = max(head, end & ~7)  # bits after the last whole byte
        want_byte = 0x00 if free else 0xFF  # the state every block must have now
        whole = bits[head >> 3 : tail >> 3]
        if whole.count(want_byte) != len(whole) or any(
            bool(bits[b >> 3] & (0x80 >> (b & 7))) == free for b in (*range(start, head), *range(tail, end))
        ):
            for b in range(start, end):
                if bool(bits[b >> 3] & (0x80 >> (b & 7))) == free:
                    state = "free" if free else "in use"
                    raise CorruptError(f"block {b} is already marked {state} in the bitmap", block=b, field="bitmap")
        for b in (*range(start, head), *range(tail, end)):
            mask = 0x80 >> (b & 7)
            if free:
                bits[b >> 3] |= mask
            else:
                bits[b >> 3] &= ~mask & 0xFF
        if tail > head:
            bits[head >> 3 : tail >> 3] = bytes([0xFF if free else 0x00]) * ((tail - head) >> 3)
        if count:
            self.dirty_blocks.update(range(start // self.per_block, (end - 1) // self.per_block + 1))
        self.free_count += count if free else -count
        if self.changes is not None:
            self.changes.append((start, count, not free))

    def mark_used(self, start: int, count: int = 1) -> None:
        self._set(start, count, False)

    def mark_free(self, start: int, count: int = 1) -> None:
        """Free blocks; they stay held (unallocatable) until the transaction commits."""
        self._set(start, count, True)
        self.held.update(range(start, start + count))

    def usable_count(self) -> int:
        return self.free_count - len(self.held)  # held blocks are always free ones

    def allocate(self, count: int, hint: int) -> list[tuple[int, int]]:
        """``count`` blocks as (start, length) runs, marked used: one run at ``hint`` if
        possible, else the first run after it (then from 0) that holds them all, else
        free pieces in disk order from ``hint``.  NoSpace when they are not there (the
        ``reserve`` excluded)."""
        if count > self.usable_count() - self.reserve:
            raise NoSpace(f"the SFS volume is full ({max(0, self.usable_count() - self.reserve)} blocks free, {count} needed)")
        runs: list[tuple[int, int]] = []
        need = count
        hint = hint if 0 <= hint < self.total else 0
        n = self.run_length(hint, need)
        if n:
            runs.append((hint, n))
            self.mark_used(hint, n)
            need -= n
        if need:
            b = self.find_run(need, hint)
            if b < 0:
                b = self.find_run(need, 0)
            if b >= 0:
                runs.append((b, need))
                self.mark_used(b, need)
                need = 0
        pos = hint
        while need:
            b = self.next_free(pos)
            if b < 0:
                raise CorruptError("the bitmap's free count and its bits disagree", field="bitmap")
            length = self.run_length(b, need)
            runs.append((b, length))
            self.mark_used(b, length)
            need -= length
            pos = b + length if b + length < self.total else 0
        return runs

    def find_run(self, count: int, start: int = 0) -> int:
        """First block of ``count`` usable blocks in a row (no marking), or -1."""
        pos = start
        while pos < self.total:
            b = self.next_free(pos)
            if b < 0 or b < pos:
                return -1
            length = self.run_length(b, count)
            if length >= count:
                return b
            pos = b + length
        return -1

    # ------------------------------------------------------------------ transactions
    def begin(self) -> None:
        self.changes = []

    def rollback(self) -> None:
        changes, self.changes = self.changes or [], None
        for start, count, was_free in reversed(changes):
            for b in range(start, start + count):
                mask = 0x80 >> (b & 7)
                if was_free:
                    self.bits[b >> 3] |= mask
                else:
                    self.bits[b >> 3] &= ~mask & 0xFF
                    self.held.discard(b)
            self.free_count += count if was_free else -count

    def end(self) -> None:
        self.changes = None

    def committed(self) -> None:
        self.held.clear()

    def encode_block(self, index: int, nbytes: int) -> bytes:
        """The bitmap bytes (after the header) of bitmap block ``index``."""
        first = index * self.per_block // 8
        return bytes(self.bits[first : first + nbytes]).ljust(nbytes, b"\0")
