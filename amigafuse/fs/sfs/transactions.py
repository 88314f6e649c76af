"""The SmartFilesystem handler's transaction format (pure codecs, no I/O).

This is the format amigafuse writes its own commits in, so that the real handler
replays a transaction a crash left unfinished (docs/sfs.md, "Writing: crash safety",
lists every rule with its source and the handler-written samples it was checked on).

An unfinished transaction is marked by a TRFA block at root OC + 2 whose
``firsttransaction`` starts a chain of TRST blocks (``fsTransactionStorage``: block
header, ``next``, data from byte 16).  The data areas, read in chain order as one
stream, hold ``OperationInformation`` records: UWORD ``length``, ULONG ``blckno``,
UBYTE ``bits`` (1 = OI_EMPTY: no original, 2 = OI_DELETE), then ``length`` bytes of
compressed block contents; a record takes ``(length | 1) + 7`` bytes (padded to an
even size) and may continue in the next TRST block; a zero ``length`` ends the list.

Compression (SFS 1.84 ``LONGCOMPRESSION``): a control byte per run of 1..64 longs,
``0x40|n-1`` unchanged (skip), ``0x80|n-1`` all ones, ``0x00|n-1`` zeros, ``0xC0|n-1``
followed by n literal longs.  A record describes every long of its block.  Replay:
the block's on-disk contents (OI_EMPTY: a buffer whose contents do not matter, so an
OI_EMPTY record has no skip runs) with the runs applied.  Skip runs only cover longs
equal in the original and the new block, so a replay interrupted halfway can be
repeated on the partly written disk.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass

from amigafuse.errors import CorruptError
from amigafuse.fs.sfs import codec

OI_EMPTY = 1
OI_DELETE = 2
TRANSACTIONSTORAGE_HEADER = 16
RECORD_HEADER = 7  # UWORD length, ULONG blckno, UBYTE bits
MAX_RUN = 64
ALL_ONES = 0xFFFFFFFF


@dataclass(frozen=True)
class Operation:
    """One ``OperationInformation`` record: ``data`` is the compressed block."""

    blckno: int
    bits: int
    data: bytes


def record_size(length: int) -> int:
    """Bytes a record with ``length`` bytes of compressed data takes in the stream."""
    return (length | 1) + RECORD_HEADER


def parse_operations(stream: bytes) -> list[Operation]:
    """The records of the concatenated TRST data areas, up to the zero length (or the
    end of the stream).  Raises CorruptError when a record runs past the stream."""
    ops: list[Operation] = []
    pos = 0
    while pos + 2 <= len(stream):
        length = struct.unpack_from(">H", stream, pos)[0]
        if length == 0:
            return ops
        total = record_size(length)
        if pos + total > len(stream):
            raise CorruptError(f"transaction record of {length} bytes runs past the stored data", field="length")
        blckno, bits = struct.unpack_from(">IB", stream, pos + 2)
        ops.append(Operation(blckno, bits, bytes(stream[pos + RECORD_HEADER : pos + RECORD_HEADER + length])))
        pos += total
    return ops


def uncompress(base: bytes, data: bytes, *, empty: bool = False) -> bytes:
    """Apply the compressed record ``data`` to ``base`` (a whole block).

    Raises CorruptError unless the runs describe exactly every long of the block (as
    every record the handler writes does), when a literal run is cut short, or when an
    OI_EMPTY record (``empty``) has a skip run (the handler replays those onto an
    uninitialised buffer, so their result would be undefined)."""
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
            if empty:
                raise CorruptError("an OI_EMPTY transaction record keeps unchanged longs", field="data")
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
    if dest != longs:
        raise CorruptError(f"transaction record describes {dest} of the block's {longs} longs", field="data")
    return bytes(out)


_WINDOWS = {0: (0,) * MAX_RUN, ALL_ONES: (ALL_ONES,) * MAX_RUN}


def _run(values: tuple[int, ...], start: int, limit: int, value: int) -> int:
    if values[start] != value:
        return 0
    if values[start : start + limit] == _WINDOWS[value][:limit]:
        return limit
    n = 0
    while n < limit and values[start + n] == value:
        n += 1
    return n


def _literal(a: tuple[int, ...] | None, b: tuple[int, ...], start: int, limit: int) -> int:
    """Length of the literal run at ``start``: up to a long that is zero, all ones or
    (``a`` given) unchanged.  Whole windows are tested first at C speed."""
    wb = b[start : start + limit]
    if 0 not in wb and ALL_ONES not in wb and (a is None or not any(map(operator.eq, a[start : start + limit], wb))):
        return limit
    n = 0
    while n < limit and b[start + n] not in (0, ALL_ONES) and (a is None or a[start + n] != b[start + n]):
        n += 1
    return n


def compress(original: bytes, new: bytes) -> bytes:
    """``new`` encoded against ``original`` with the handler's choices: at each
    position the longest of the unchanged, zero and all-ones runs (at most 64 longs)
    wins, ties going to unchanged, then zeros; when none applies, a literal run up to
    the next long that is zero, all ones or unchanged."""
    if len(original) != len(new):
        raise ValueError("blocks of different sizes")
    return _encode(struct.unpack(f">{len(original) // 4}I", original), new)


def compress_from_zero(new: bytes) -> bytes:
    """``new`` encoded for an OI_EMPTY record (the handler's ``compressfromzero``
    choices): zero and all-ones runs, else literal runs; never a skip run."""
    return _encode(None, new)


def _encode(a: tuple[int, ...] | None, new: bytes) -> bytes:
    """The run choices of :func:`compress`; without an original (``a`` None) there are
    no unchanged runs, which gives :func:`compress_from_zero`."""
    b = struct.unpack(f">{len(new) // 4}I", new)
    end = len(b)
    out = bytearray()
    i = 0
    while i < end:
        limit = min(MAX_RUN, end - i)
        unchanged = 0
        if a is not None:
            if a[i : i + limit] == b[i : i + limit]:
                unchanged = limit
            else:
                while a[i + unchanged] == b[i + unchanged]:
                    unchanged += 1
        cleared = set_ = 0
        if unchanged < limit:
            cleared = _run(b, i, limit, 0)
            set_ = _run(b, i, limit, ALL_ONES)
        if unchanged or cleared != set_:
            if unchanged >= cleared and unchanged >= set_:
                out.append(0x40 | (unchanged - 1))
                i += unchanged
            elif cleared:
                out.append(cleared - 1)
                i += cleared
            else:
                out.append(0x80 | (set_ - 1))
                i += set_
            continue
        n = _literal(a, b, i, limit)
        out.append(0xC0 | (n - 1))
        out += new[i * 4 : (i + n) * 4]
        i += n
    return bytes(out)


def pack_operations(ops: list[Operation]) -> bytes:
    """Records as the handler stores them, followed by the terminating zero length."""
    out = bytearray()
    for op in ops:
        if not 0 < len(op.data) <= 0xFFFF:
            raise ValueError(f"a transaction record holds 1..65535 bytes, not {len(op.data)}")
        out += struct.pack(">HIB", len(op.data), op.blckno, op.bits) + op.data
        if len(op.data) % 2 == 0:
            out += b"\0"
    return bytes(out + b"\0\0")


def storage_block_count(stream_bytes: int, block_size: int) -> int:
    """TRST blocks needed for a stream of ``stream_bytes`` (terminator included)."""
    area = block_size - TRANSACTIONSTORAGE_HEADER
    return max(1, (stream_bytes + area - 1) // area)


def storage_blocks(stream: bytes, chain: list[int], block_size: int, sfs2: bool) -> dict[int, bytes]:
    """The TRST blocks holding ``stream`` at the blocks ``chain`` (in chain order):
    each block's ``next`` is the following block, 0 on the last; unused bytes zero."""
    area = block_size - TRANSACTIONSTORAGE_HEADER
    if len(chain) != storage_block_count(len(stream), block_size):
        raise ValueError("wrong number of transaction storage blocks")
    out: dict[int, bytes] = {}
    for i, block in enumerate(chain):
        piece = stream[i * area : (i + 1) * area]
        ts = codec.TransactionStorage(
            codec.TRANSACTIONSTORAGE_ID, 0, block, chain[i + 1] if i + 1 < len(chain) else 0, piece.ljust(area, b"\0")
        )
        out[block] = bytes(codec.finish_block(bytearray(ts.pack()), codec.TRANSACTIONSTORAGE_ID, block, sfs2))
    return out


def failure_block(tr_block: int, first: int, block_size: int, sfs2: bool) -> bytes:
    """The TRFA block (cleared, header, ``firsttransaction``) that marks the chain."""
    tf = codec.TransactionFailure(codec.TRANSACTIONFAILURE_ID, 0, tr_block, first, bytes(block_size - 16))
    return bytes(codec.finish_block(bytearray(tf.pack()), codec.TRANSACTIONFAILURE_ID, tr_block, sfs2))


def ok_block(tr_block: int, block_size: int, sfs2: bool) -> bytes:
    """The TROK block (cleared but for the header) written when a transaction is done."""
    return bytes(codec.finish_block(bytearray(block_size), codec.TRANSACTIONOK_ID, tr_block, sfs2))
