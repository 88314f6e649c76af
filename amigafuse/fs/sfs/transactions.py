"""The SmartFilesystem handler's own transaction format (pure codecs, no I/O).

An unfinished handler transaction is marked by a TRFA block at root OC + 2 whose
``firsttransaction`` starts a chain of TRST blocks (``fsTransactionStorage``: header,
``next``, data).  The data areas, concatenated, hold ``OperationInformation`` records:
UWORD ``length``, ULONG ``blckno``, UBYTE ``bits`` (1 = OI_EMPTY: no original,
2 = OI_DELETE: block freed, nothing to write), then ``length`` bytes of compressed
block contents, the record padded to an even size (``(length | 1) + 7`` bytes); a
zero ``length`` ends the list.

Compression (SFS 1.84, ``LONGCOMPRESSION``), a control byte per run of 1..64 longs:
``0x40|n-1`` unchanged (skip), ``0x80|n-1`` all ones, ``0x00|n-1`` zeros,
``0xC0|n-1`` n literal longs follow.  Applying the codes to the block's original (or
to zeros for OI_EMPTY) gives the new block; applying them to the *new* block gives the
new block too (unchanged runs are equal in both), so a replay interrupted halfway can
be repeated.  The format was read from the 1.84 sources; no handler-written TRFA was
available to test against, so the caller verifies every rebuilt block (checksum,
ownblock) before writing any of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from amigafuse.errors import CorruptError

OI_EMPTY = 1
OI_DELETE = 2
TRANSACTIONSTORAGE_HEADER = 16


@dataclass(frozen=True)
class Operation:
    blckno: int
    bits: int
    data: bytes


def parse_operations(stream: bytes) -> list[Operation]:
    """The records of the concatenated TRST data areas."""
    ops: list[Operation] = []
    pos = 0
    while pos + 2 <= len(stream):
        length = struct.unpack_from(">H", stream, pos)[0]
        if length == 0:
            return ops
        total = (length | 1) + 7
        if pos + total > len(stream):
            raise CorruptError(f"transaction record of {length} bytes runs past the stored data", field="length")
        blckno, bits = struct.unpack_from(">IB", stream, pos + 2)
        ops.append(Operation(blckno, bits, bytes(stream[pos + 7 : pos + 7 + length])))
        pos += total
    return ops


def uncompress(base: bytes, data: bytes) -> bytes:
    """Apply the compressed changes ``data`` to ``base`` (a whole block)."""
    out = bytearray(base)
    longs = len(out) // 4
    dest = 0
    pos = 0
    while pos < len(data):
        code = data[pos]
        pos += 1
        n = (code & 0x3F) + 1
        kind = code & 0xC0
        if dest + n > longs:
            raise CorruptError("transaction data runs past the block end", field="data")
        if kind == 0x40:
            pass
        elif kind == 0x80:
            out[dest * 4 : (dest + n) * 4] = b"\xff" * (4 * n)
        elif kind == 0x00:
            out[dest * 4 : (dest + n) * 4] = bytes(4 * n)
        else:
            if pos + 4 * n > len(data):
                raise CorruptError("transaction literal runs past its record", field="data")
            out[dest * 4 : (dest + n) * 4] = data[pos : pos + 4 * n]
            pos += 4 * n
        dest += n
    return bytes(out)


def compress(original: bytes, new: bytes) -> bytes:
    """The handler's encoding of ``new`` against ``original`` (used by tests and to
    write handler-format records)."""
    a = struct.unpack(f">{len(original) // 4}I", original)
    b = struct.unpack(f">{len(new) // 4}I", new)
    out = bytearray()
    i = 0
    while i < len(b):
        run = 1
        if a[i] == b[i]:
            while i + run < len(b) and run < 64 and a[i + run] == b[i + run]:
                run += 1
            out.append(0x40 | (run - 1))
        elif b[i] in (0, 0xFFFFFFFF):
            while i + run < len(b) and run < 64 and b[i + run] == b[i] and a[i + run] != b[i + run]:
                run += 1
            out.append((0x80 if b[i] else 0x00) | (run - 1))
        else:
            while (i + run < len(b) and run < 64 and a[i + run] != b[i + run]
                   and b[i + run] not in (0, 0xFFFFFFFF)):  # fmt: skip
                run += 1
            out.append(0xC0 | (run - 1))
            out += new[i * 4 : (i + run) * 4]
        i += run
    return bytes(out)


def pack_operations(ops: list[Operation]) -> bytes:
    """Records as the handler stores them, with the terminating zero length."""
    out = bytearray()
    for op in ops:
        out += struct.pack(">HIB", len(op.data), op.blckno, op.bits) + op.data
        if len(op.data) % 2 == 0:
            out += b"\0"
    return bytes(out + b"\0\0")
