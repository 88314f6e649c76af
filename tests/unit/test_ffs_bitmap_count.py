"""The bitmap's free count is kept exact by every change (it is read on the hot path of
every allocation), including after pages are loaded with garbage past the volume's end."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from amigafuse.fs.ffs.bitmap import Bitmap

RESERVED = 2


def brute_free(bm: Bitmap) -> int:
    return sum(bm.is_free(b) for b in range(RESERVED, RESERVED + bm.count))


ops = st.one_of(
    st.tuples(st.just("mark"), st.integers(0, 10_000), st.booleans()),
    st.tuples(st.just("range"), st.integers(0, 10_000), st.integers(1, 300), st.booleans()),
    st.tuples(st.just("blocks"), st.lists(st.integers(0, 10_000), max_size=20), st.booleans()),
    st.tuples(st.just("load"), st.integers(0, 10), st.binary(min_size=4, max_size=4)),
    st.tuples(st.just("all"), st.booleans()),
)


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 3000), block_size=st.sampled_from([512, 1024]), steps=st.lists(ops, max_size=25))
def test_free_count_matches_the_bits(count: int, block_size: int, steps: list[tuple]) -> None:  # type: ignore[type-arg]
    bm = Bitmap(RESERVED, count, block_size)
    assert bm.free_count() == 0
    for step in steps:
        if step[0] == "mark":
            bm.mark(RESERVED + step[1] % count, step[2])
        elif step[0] == "range":
            start = step[1] % count
            n = min(step[2], count - start)
            bm.mark_range(RESERVED + start, n, step[3])
        elif step[0] == "blocks":
            bm.mark_blocks(sorted({RESERVED + b % count for b in step[1]}), step[2])
        elif step[0] == "load":
            page = step[1] % bm.pages
            bm.load_page(page, step[2] * (bm.bytes_per_block // 4))  # garbage past the end too
        else:
            bm.set_all(step[1])
        assert bm.free_count() == brute_free(bm), step
        found = bm.find_free(RESERVED, count)
        assert len(found) == bm.free_count()


def test_free_count_after_load_counts_only_covered_blocks() -> None:
    bm = Bitmap(RESERVED, 10, 512)
    bm.load_page(0, b"\xff" * bm.bytes_per_block)  # bits past block 10 set on "disk"
    assert bm.free_count() == 10
    bm.mark(RESERVED + 3, False)
    bm.mark(RESERVED + 3, False)  # twice: counted once
    assert bm.free_count() == 9
    bm.mark_range(RESERVED, 10, False)
    assert bm.free_count() == 0


@settings(max_examples=80, deadline=None)
@given(count=st.integers(1, 2500), seed=st.lists(st.tuples(st.integers(0, 2500), st.integers(1, 200)), max_size=12),
       blocks=st.lists(st.integers(0, 2500), max_size=300), goal=st.integers(0, 2600), want=st.integers(0, 2600))
def test_mark_blocks_and_find_free_match_a_block_at_a_time_model(
    count: int, seed: list[tuple[int, int]], blocks: list[int], goal: int, want: int
) -> None:
    """mark_blocks takes runs, not blocks, and find_free takes whole free bytes with
    range(): both must give what one block at a time gives (any order, repeats)."""
    fast, slow = Bitmap(RESERVED, count, 512), Bitmap(RESERVED, count, 512)
    fast.set_all(True)
    slow.set_all(True)
    for start, n in seed:  # some used runs
        s = start % count
        fast.mark_range(RESERVED + s, min(n, count - s), False)
        slow.mark_range(RESERVED + s, min(n, count - s), False)
    chosen = [RESERVED + b % count for b in blocks]
    fast.mark_blocks(chosen, True)
    for b in chosen:
        slow.mark(b, True)
    assert fast.copy_bits() == slow.copy_bits() and fast.free_count() == slow.free_count()
    assert fast.dirty_pages >= slow.dirty_pages
    # find_free: the free blocks from goal's byte on, wrapping, at most ``want``
    k0 = min(max(goal - RESERVED, 0), count - 1)
    order = [*range((k0 >> 3) * 8, count), *range(0, (k0 >> 3) * 8)]
    model = [RESERVED + k for k in order if slow.is_free(RESERVED + k)][:want]
    assert fast.find_free(goal, want) == model
