"""The handler's transaction record format (pure): compression and record packing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.errors import CorruptError
from amigafuse.fs.sfs import transactions

longs = st.sampled_from([0, 0xFFFFFFFF, 1, 0x12345678])


@st.composite
def block_pair(draw: st.DrawFn) -> tuple[bytes, bytes]:
    n = draw(st.sampled_from([128, 256]))
    a = draw(st.lists(longs, min_size=n, max_size=n))
    b = list(a)
    for i in draw(st.lists(st.integers(0, n - 1), max_size=n)):
        b[i] = draw(longs | st.integers(0, 2**32 - 1))
    return (b"".join(x.to_bytes(4, "big") for x in a), b"".join(x.to_bytes(4, "big") for x in b))


@given(block_pair())
def test_compress_roundtrip(pair: tuple[bytes, bytes]) -> None:
    original, new = pair
    packed = transactions.compress(original, new)
    assert transactions.uncompress(original, packed) == new
    # Applying the changes to the new block again changes nothing (replay twice).
    assert transactions.uncompress(new, packed) == new
    assert len(packed) <= len(new) + len(new) // 64 + 4


@given(st.lists(st.tuples(st.integers(1, 2**32 - 1), st.sampled_from([0, 1, 2]), st.binary(min_size=1, max_size=300)), max_size=8))
def test_records_roundtrip(ops: list[tuple[int, int, bytes]]) -> None:
    records = [transactions.Operation(*op) for op in ops]
    stream = transactions.pack_operations(records)
    assert len(stream) % 2 == 0
    assert transactions.parse_operations(stream + bytes(40)) == records


def test_damaged_records_are_errors() -> None:
    with pytest.raises(CorruptError):
        transactions.parse_operations(b"\x01\x00\x00\x00\x00\x05\x00abc")
    with pytest.raises(CorruptError):
        transactions.uncompress(bytes(16), b"\x3f")  # 64 zero longs into a 4-long block
    with pytest.raises(CorruptError):
        transactions.uncompress(bytes(16), b"\xc1\x00")  # a literal run cut short


def L(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "big") for v in values)


ONES = 0xFFFFFFFF


@pytest.mark.parametrize(
    ("original", "new", "want"),
    [
        (L(*[0] * 128), L(*[0] * 128), bytes([0x7F, 0x7F])),  # unchanged, at most 64 a run
        (L(1, 1, 0, 0, 0, 0, 0, 0), L(*[0] * 8), bytes([0x07])),  # zeros
        (L(0, 0, 0, 5), L(0, 0, 0, 0), bytes([0x03])),  # 4 zeros beat 3 unchanged
        (L(0, 0, 7, 7), L(0, 0, 1, 1), bytes([0x41, 0xC1]) + L(1, 1)),  # a tie goes to unchanged
        (L(0, 0), L(ONES, ONES), bytes([0x81])),  # all ones
        (L(1, 2, 3), L(9, 2, 3), bytes([0xC0]) + L(9) + bytes([0x41])),  # a literal stops at unchanged
        (L(1, 2, 3), L(9, 0, 3), bytes([0xC0]) + L(9) + bytes([0x00, 0x40])),  # ... and at a zero
    ],
)
def test_compress_makes_the_handlers_choices(original: bytes, new: bytes, want: bytes) -> None:
    assert transactions.compress(original, new) == want
    assert transactions.uncompress(original, want) == new


def test_compress_from_zero_never_skips() -> None:
    new = L(0, 0, 5, ONES, ONES, ONES, 7, 8, 0)
    packed = transactions.compress_from_zero(new)
    assert packed == bytes([0x01, 0xC0]) + L(5) + bytes([0x82, 0xC1]) + L(7, 8) + bytes([0x00])
    assert transactions.uncompress(b"\xa5" * len(new), packed, empty=True) == new


@given(block_pair())
def test_compress_from_zero_roundtrip(pair: tuple[bytes, bytes]) -> None:
    _, new = pair
    packed = transactions.compress_from_zero(new)
    # empty=True refuses skip runs: the record needs nothing from the old block.
    assert transactions.uncompress(b"\x5a" * len(new), packed, empty=True) == new


def test_records_must_cover_their_block() -> None:
    with pytest.raises(CorruptError):
        transactions.uncompress(bytes(16), b"\x40")  # 1 of 4 longs
    with pytest.raises(CorruptError):
        transactions.uncompress(bytes(16), b"\x43", empty=True)  # OI_EMPTY keeping longs


@pytest.mark.parametrize("sfs2", [False, True])
def test_storage_chain(sfs2: bool) -> None:
    """A stream longer than a block is split over TRST blocks in chain order; a record
    may continue in the next block; the zero length is stored even when the records
    fill a block exactly."""
    from amigafuse.fs.sfs import codec

    bs = 512
    area = bs - transactions.TRANSACTIONSTORAGE_HEADER
    ops = [transactions.Operation(10 + i, 0, bytes([0xC0 | 63]) + bytes(range(256))) for i in range(3)]
    stream = transactions.pack_operations(ops)
    assert len(stream) == 3 * (257 | 1) + 3 * 7 + 2
    count = transactions.storage_block_count(len(stream), bs)
    assert count == 2
    blocks = transactions.storage_blocks(stream, [700, 650], bs, sfs2)
    first, second = codec.TransactionStorage.unpack(blocks[700]), codec.TransactionStorage.unpack(blocks[650])
    assert (first.next, second.next) == (650, 0)
    assert all(codec.checksum_ok(b, sfs2) for b in blocks.values())
    assert (first.data + second.data)[: len(stream)] == stream
    assert transactions.parse_operations(first.data + second.data) == ops
    # Records filling exactly one data area: the terminator takes a second block.
    one = [transactions.Operation(5, 0, bytes([0x7F]) * (area - 7 - 2 + 1))]
    exact = transactions.pack_operations(one)
    assert len(exact) == area + 2 and transactions.storage_block_count(len(exact), bs) == 2
    tf = codec.TransactionFailure.unpack(transactions.failure_block(5, 700, bs, sfs2))
    assert (tf.id, tf.ownblock, tf.firsttransaction) == (codec.TRANSACTIONFAILURE_ID, 5, 700)
    assert codec.checksum_ok(transactions.failure_block(5, 700, bs, sfs2), sfs2)
    assert codec.checksum_ok(transactions.ok_block(5, bs, sfs2), sfs2)
