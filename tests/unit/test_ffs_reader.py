"""merge_ranges (pure): a read's device ranges grouped into few requests, gaps bridged
only forwards and within bounds, every range's bytes placed where the read wants them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from amigafuse.fs.ffs.reader import Span, merge_ranges

BS = 512


def test_extension_block_gaps_are_bridged() -> None:
    # a file FFS wrote: 72 data blocks, its extension block, 72 more...
    ranges = [(100, 72), (173, 72), (246, 72)]
    assert merge_ranges(ranges, BS, 4, 1 << 20) == [
        Span(100, 218, ((0, 72, 0), (73, 72, 72 * BS), (146, 72, 144 * BS)))
    ]


def test_backwards_far_and_too_long_start_new_spans() -> None:
    ranges = [(100, 10), (50, 10), (61, 10), (200, 10), (211, 10)]
    spans = merge_ranges(ranges, BS, 4, 1 << 20)
    assert [(s.start, s.count) for s in spans] == [(100, 10), (50, 21), (200, 21)]
    assert merge_ranges([(0, 8), (9, 8)], BS, 4, 16) == [
        Span(0, 8, ((0, 8, 0),)), Span(9, 8, ((0, 8, 8 * BS),))
    ]
    # a range longer than the maximum is its own span (the device splits it)
    assert merge_ranges([(0, 100)], BS, 4, 16) == [Span(0, 100, ((0, 100, 0),))]
    assert merge_ranges([], BS, 4, 16) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 400), st.integers(1, 40)), max_size=30),
    st.integers(0, 8),
    st.integers(1, 120),
)
def test_spans_reassemble_the_ranges(ranges: list[tuple[int, int]], gap: int, span_max: int) -> None:
    disk = [f"b{i}" for i in range(600)]
    want = [disk[b] for first, n in ranges for b in range(first, first + n)]
    spans = merge_ranges(ranges, 1, gap, span_max)
    out: list[str | None] = [None] * len(want)
    for span in spans:
        assert len(span.pieces) == 1 or span.count <= span_max
        read = disk[span.start : span.start + span.count]  # one device request
        prev_end = 0
        for offset, n, pos in span.pieces:
            assert 0 <= offset - prev_end <= gap or (offset == 0 and prev_end == 0)
            prev_end = offset + n
            out[pos : pos + n] = read[offset : offset + n]
        assert prev_end == span.count
    assert out == want
    assert sum(len(s.pieces) for s in spans) == len(ranges)
