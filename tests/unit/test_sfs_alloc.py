"""The SFS free-space map (pure): allocation against a model set, holds, rollback."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.errors import NoSpace
from amigafuse.fs.sfs.alloc import FreeMap


def fresh(total: int, used: set[int]) -> FreeMap:
    raw = bytearray((total + 7) // 8)
    for b in range(total):
        if b not in used:
            raw[b >> 3] |= 0x80 >> (b & 7)
    return FreeMap(total, 4000, bytes(raw))


@given(
    total=st.integers(8, 3000),
    ops=st.lists(st.tuples(st.booleans(), st.integers(1, 300), st.integers(0, 3000)), max_size=40),
)
def test_allocate_and_free_match_a_model(total: int, ops: list[tuple[bool, int, int]]) -> None:
    fm = fresh(total, {0})
    owned: list[tuple[int, int]] = []
    used = {0}
    for is_alloc, count, hint in ops:
        if is_alloc:
            if count > total - len(used) - len(fm.held):
                with pytest.raises(NoSpace):
                    fm.allocate(count, hint)
                continue
            runs = fm.allocate(count, hint)
            assert sum(n for _, n in runs) == count
            for start, n in runs:
                blocks = set(range(start, start + n))
                assert not blocks & used and not blocks & fm.held
                used |= blocks
                owned.append((start, n))
        elif owned:
            start, n = owned.pop(count % len(owned))
            fm.mark_free(start, n)
            used -= set(range(start, start + n))
        assert fm.free_count == total - len(used)
        assert all(fm.is_free(b) == (b not in used) for b in range(total))
    fm.committed()
    assert not fm.held


def test_rollback_restores_bits_and_holds() -> None:
    fm = fresh(100, set())
    first = fm.allocate(10, 0)
    fm.begin()
    fm.allocate(20, 50)
    fm.mark_free(*first[0])
    assert fm.free_count == 100 - 20
    fm.rollback()
    assert fm.free_count == 90
    assert not fm.held
    assert [fm.is_free(b) for b in range(10)] == [False] * 10


def test_hint_gives_contiguous_run() -> None:
    fm = fresh(1000, set(range(0, 100)))
    assert fm.allocate(50, 500) == [(500, 50)]
    assert fm.allocate(10, 540) == [(550, 10)]
    assert fm.find_run(1000, 0) == -1


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(1, 70)), max_size=30))
def test_used_map_marks_runs_and_finds_overlaps(runs: list[tuple[int, int]]) -> None:
    from amigafuse.fs.sfs.check import UsedMap, set_positions

    um = UsedMap(600)
    model: set[int] = set()
    for start, count in runs:
        blocks = set(range(start, start + count))
        dup = um.mark(start, count)
        if blocks & model:
            assert dup in blocks & model
            model |= {b for b in blocks if um.test(b)}
        else:
            assert dup == -1
            model |= blocks
        assert {b for b in range(600) if um.test(b)} == model
    assert set_positions(um.as_int(), len(um.bits), 1000) == sorted(model)
