"""FFS codecs (round trips, golden LNFS blocks from FFS 47.4), hashing, checksums, bitmap."""

from __future__ import annotations

from dataclasses import replace

import hypothesis.strategies as st
import pytest
from hypothesis import given

from amigafuse.amiga.dates import DateStamp
from amigafuse.fs.ffs.bitmap import Bitmap
from amigafuse.fs.ffs.layout import (
    ST_FILE,
    ST_USERDIR,
    T_COMMENT,
    BitmapBlock,
    BitmapExtBlock,
    BootBlock,
    CommentBlock,
    DirCacheBlock,
    DirCacheRecord,
    EntryBlock,
    FileExtBlock,
    OfsDataBlock,
    RootBlock,
    boot_checksum,
    hash_name,
    lnfs_comment_fits,
    upper_name,
    verify_checksum,
    with_checksum,
)
from tests.conftest import REAL, shared_image

SIZES = st.sampled_from([512, 1024, 2048, 4096, 32768])


@st.composite
def block(draw: st.DrawFn) -> bytes:
    size = draw(SIZES)
    seed = draw(st.binary(min_size=16, max_size=64))
    reps = size // len(seed) + 1
    return (seed * reps)[:size]


@given(block(), st.booleans())
def test_entry_round_trip(data: bytes, lnfs: bool) -> None:
    assert EntryBlock.unpack(data, lnfs).pack() == data


@given(block())
def test_other_codecs_round_trip(data: bytes) -> None:
    for codec in (RootBlock, FileExtBlock, OfsDataBlock, BitmapBlock, BitmapExtBlock, DirCacheBlock, CommentBlock):
        assert codec.unpack(data).pack() == data  # type: ignore[attr-defined]


@given(st.binary(min_size=1024, max_size=1024))
def test_boot_round_trip(data: bytes) -> None:
    assert BootBlock.unpack(data).pack() == data


NAME = st.binary(min_size=1, max_size=30)


@given(
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1),
    st.integers(-128, 127), NAME, st.binary(max_size=79),
)  # fmt: skip
def test_dircache_record_round_trip(header: int, size: int, days: int, typ: int, name: bytes, comment: bytes) -> None:
    rec = DirCacheRecord(header, size, 0xAA00, 1, 2, days, 1439, 2999, typ, name, comment)
    raw = rec.pack()
    assert len(raw) == rec.packed_size and len(raw) % 2 == 0
    again, end = DirCacheRecord.unpack_from(raw + b"\0\0", 0)
    assert again == rec and end == len(raw)


def test_dircache_record_overrun_is_an_error() -> None:
    rec = DirCacheRecord(1, 2, 3, 0, 0, 1, 2, 3, -3, b"name", b"")
    with pytest.raises(ValueError):
        DirCacheRecord.unpack_from(rec.pack()[:-4], 0)


def golden(name: str) -> bytes:
    return shared_image(f"real/{name}.bin").read_bytes()


@pytest.mark.parametrize("prefix", ["dos7_", "dos7_bs1024_"])
def test_lnfs_golden_blocks(prefix: str) -> None:
    h1 = golden(prefix + "file-header-block-1")
    assert verify_checksum(h1)
    e = EntryBlock.unpack(h1, lnfs=True)
    assert e.sec_type == ST_FILE and e.byte_size == 14
    assert e.name == b"1234567890" * 5 + b".txt"
    assert len(e.name) == 54 and e.inline_comment == b"comment1" and e.comment_block == 0
    assert e.date == DateStamp(0x3FF0, 0x4E8, 0x766)
    # our encoder lays name and comment out exactly as FFS 47.4 does
    assert e.with_name_comment(e.name, b"comment1").pack() == e.pack()
    assert with_checksum(e.pack()) == h1

    h2 = EntryBlock.unpack(golden(prefix + "file-header-block-2"), lnfs=True)
    assert len(h2.name) == 104 and h2.inline_comment == b"" and h2.comment_block != 0
    c = CommentBlock.unpack(golden(prefix + "comment-block-1"))
    assert verify_checksum(golden(prefix + "comment-block-1"))
    assert c.type == T_COMMENT and c.owner == h2.header_key and c.header_key == h2.comment_block
    assert len(c.comment) == 79 and c.comment.startswith(b"1234567890")
    assert not lnfs_comment_fits(h2.name, c.comment)
    assert CommentBlock.new(len(c.pack()), c.header_key, c.owner, c.comment).packed_with_checksum() == golden(prefix + "comment-block-1")

    d = EntryBlock.unpack(golden(prefix + "dir-block-1"), lnfs=True)
    assert d.sec_type == ST_USERDIR and d.name.startswith(b"DirectoryWithLongName")
    assert d.inline_comment == b"dir-comment1"


def test_lnfs_dir_comment_moves_to_a_block_when_it_does_not_fit() -> None:
    d2 = EntryBlock.unpack(golden("dos7_bs1024_dir-block-2"), lnfs=True)
    c2 = CommentBlock.unpack(golden("dos7_bs1024_comment-block-2"))
    assert len(d2.name) == 100 and c2.comment == b"dir-comment"
    assert not lnfs_comment_fits(d2.name, c2.comment)  # 1 + 100 + 1 + 11 > 112
    assert lnfs_comment_fits(d2.name, c2.comment[:10])


def test_hash_and_upper() -> None:
    assert upper_name("äbc".encode("latin-1"), intl=True) == "ÄBC".encode("latin-1")
    assert upper_name("äbc".encode("latin-1"), intl=False) == "äBC".encode("latin-1")
    assert upper_name("÷ÿß".encode("latin-1"), intl=True) == "÷ÿß".encode("latin-1")
    assert hash_name(b"Trashcan", False, 512) == hash_name(b"TRASHCAN", False, 512)
    assert 0 <= hash_name(b"x" * 107, True, 32768) < 32768 // 4 - 56


def test_boot_checksum_of_a_real_floppy() -> None:
    if not (REAL / "dos1.adf").exists():
        pytest.skip("shared images absent")
    boot = (REAL / "dos1.adf").read_bytes()[:1024]
    b = BootBlock.unpack(boot)
    assert b.disk_type == 0x444F5301 and b.rootblock == 880
    assert boot_checksum(boot) == b.chksum
    fresh = BootBlock.new(0x444F5303)
    assert boot_checksum(fresh.pack()) == fresh.chksum


def test_entry_new_and_replace() -> None:
    e = EntryBlock.new(512, False, header_key=10, sec_type=ST_FILE, parent=880, name=b"file", date=DateStamp(1, 2, 3))
    e = replace(e, byte_size=5)
    back = EntryBlock.unpack(with_checksum(e.pack()), False)
    assert (back.name, back.byte_size, back.parent, back.date) == (b"file", 5, 880, DateStamp(1, 2, 3))


def test_bitmap_pages_and_allocation() -> None:
    bm = Bitmap(2, 5000, 512)
    assert bm.pages == 2  # 127 longs * 32 bits = 4064 per page
    bm.set_all(True)
    assert bm.free_count() == 5000
    got = bm.find_free(100, 20)  # byte-granular: starts at the goal's byte
    assert got == list(range(98, 118))
    for b in got:
        bm.mark(b, False)
    assert bm.free_count() == 4980 and not bm.is_free(105) and bm.is_free(120)
    # page maps survive a round trip, bits past the end stay clear
    other = Bitmap(2, 5000, 512)
    for p in range(bm.pages):
        other.load_page(p, bm.page_map(p))
    assert other.free_count() == 4980 and other.copy_bits() == bm.copy_bits()
    last = bm.page_map(1)
    assert int.from_bytes(last, "big") != 0
    # wrap-around: from near the end, the search continues at the start
    assert bm.find_free(5001, 3) == [4994, 4995, 4996]
    for b in range(4994, 5002):
        bm.mark(b, False)
    assert bm.find_free(5001, 3) == [2, 3, 4]
    with pytest.raises(ValueError):
        bm.mark(1, True)


@given(st.lists(st.integers(2, 3001), max_size=200), st.integers(2, 3001), st.integers(1, 50))
def test_find_free_never_returns_used_blocks(used: list[int], goal: int, count: int) -> None:
    bm = Bitmap(2, 3000, 512)
    bm.set_all(True)
    for b in used:
        bm.mark(b, False)
    got = bm.find_free(goal, count)
    assert len(got) == min(count, 3000 - len(set(used)))
    assert len(set(got)) == len(got)
    assert all(bm.is_free(b) and 2 <= b < 3002 for b in got)


@given(st.lists(st.integers(0, 60), max_size=300), st.integers(1, 70))
def test_runs_matches_a_plain_loop(steps: list[int], limit: int) -> None:
    from amigafuse.fs.ffs.volume import runs

    blocks = []
    b = 100
    for s in steps:
        b += 1 if s < 40 else s  # mostly consecutive, sometimes a jump
        blocks.append(b)
    plain: list[tuple[int, int]] = []
    for x in blocks:
        if plain and plain[-1][0] + plain[-1][1] == x and plain[-1][1] < limit:
            plain[-1] = (plain[-1][0], plain[-1][1] + 1)
        else:
            plain.append((x, 1))
    assert runs(blocks, limit) == plain
