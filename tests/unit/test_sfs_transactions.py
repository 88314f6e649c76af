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
