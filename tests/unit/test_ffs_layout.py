"""FFS codecs (round trips, golden LNFS blocks from FFS 47.4), hashing, checksums, bitmap."""

from __future__ import annotations

from dataclasses import replace

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

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
    table_size,
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


@given(st.lists(st.integers(0, 40), max_size=200), st.integers(1, 70))
def test_runs_of_any_order_match_a_plain_loop(blocks: list[int], limit: int) -> None:
    """Out-of-order stretches whose end points look consecutive ([5, 7, 6, 8]) too."""
    from amigafuse.fs.ffs.layout import runs

    plain: list[tuple[int, int]] = []
    for x in blocks:
        if plain and plain[-1][0] + plain[-1][1] == x and plain[-1][1] < limit:
            plain[-1] = (plain[-1][0], plain[-1][1] + 1)
        else:
            plain.append((x, 1))
    assert runs(blocks, limit) == plain


def test_runs_with_end_points_that_look_consecutive() -> None:
    from amigafuse.fs.ffs.layout import runs

    assert runs([5, 7, 6, 8, 9], 100) == [(5, 1), (7, 1), (6, 1), (8, 2)]
    assert runs([10, 12, 11, 13], 100) == [(10, 1), (12, 1), (11, 1), (13, 1)]
    assert runs([*list(range(100, 200)), 300, *list(range(201, 300))], 1000) == [(100, 100), (300, 1), (201, 99)]


# ------------------------------------------------------------ extension chain scanning


def _ext_chain(
    block_size: int, first_ext: int, step: int, tables: list[list[int]], reserved: bytes, parent: int = 7
) -> tuple[bytes, int, list[int]]:
    """Extension blocks first_ext, first_ext+step, ... holding ``tables`` (data blocks in
    file order), packed by the codec with good checksums, laid out in one buffer from the
    lowest block.  Returns (raw, lowest block, chain blocks)."""
    chain = [first_ext + i * step for i in range(len(tables))]
    lowest = min(chain)
    raw = bytearray(block_size * len(chain))
    n = table_size(block_size)
    for i, (b, data) in enumerate(zip(chain, tables, strict=True)):
        table = (0,) * (n - len(data)) + tuple(reversed(data))
        x = replace(
            FileExtBlock.new(block_size, b, parent), table=table, high_seq=len(data),
            extension=chain[i + 1] if i + 1 < len(chain) else 0, unused=reserved,
        )  # fmt: skip
        raw[(b - lowest) * block_size : (b - lowest + 1) * block_size] = x.packed_with_checksum()
    return bytes(raw), lowest, chain


def _reference(raw: bytes, lowest: int, block_size: int, chain: list[int]) -> tuple[list[tuple[int, int]], int]:
    from amigafuse.fs.ffs.layout import runs

    data: list[int] = []
    for b in chain:
        x, total = FileExtBlock.unpack_summed(raw[(b - lowest) * block_size : (b - lowest + 1) * block_size])
        assert total == 0
        data.extend(reversed(x.table[len(x.table) - x.high_seq :]))
    return runs(data, limit=1 << 62), len(data)


@st.composite
def ext_chains(draw: st.DrawFn) -> tuple[int, int, list[list[int]], bytes]:
    block_size = draw(st.sampled_from([512, 1024, 4096]))
    n = table_size(block_size)
    count = draw(st.integers(1, 6))
    next_block = draw(st.integers(10, 1 << 31))
    tables: list[list[int]] = []
    for i in range(count):
        size = n if i + 1 < count else draw(st.integers(0, n))
        style = draw(st.sampled_from(["run", "run", "jump", "shuffle"]))
        data = list(range(next_block, next_block + size))
        if style == "jump" and size > 2:
            cut = draw(st.integers(1, size - 1))
            data = data[:cut] + [b + 1000 for b in data[cut:]]
        elif style == "shuffle" and size > 3:
            data[1], data[2] = data[2], data[1]
        tables.append(data)
        next_block = (data[-1] if data else next_block) + draw(st.sampled_from([1, 1, 5]))
    reserved = draw(st.sampled_from([bytes(188), bytes(187) + b"\x01", b"\xff" * 188]))
    step = draw(st.sampled_from([1, -1]))
    return block_size, step, tables, reserved


@settings(max_examples=60, deadline=None)
@given(ext_chains(), st.booleans())
def test_scan_ext_chain_matches_the_codec(chain_spec: tuple[int, int, list[list[int]], bytes], prior: bool) -> None:
    from amigafuse.fs.ffs.layout import scan_ext_chain

    block_size, step, tables, reserved = chain_spec
    first_ext = 50_000
    raw, lowest, chain = _ext_chain(block_size, first_ext, step, tables, reserved)
    want, want_count = _reference(raw, lowest, block_size, chain)
    found: list[tuple[int, int]] = [(1, 5)] if prior else []
    seen: set[int] = set()
    nxt, listed, last = scan_ext_chain(raw, lowest, block_size, first_ext, found, seen, 100, {})
    assert (nxt, listed, last) == (0, want_count, chain[-1])
    assert found == ([(1, 5)] if prior else []) + want
    assert seen == set(chain)


def test_scan_ext_chain_stops_at_cached_and_missing_blocks() -> None:
    from amigafuse.fs.ffs.layout import scan_ext_chain

    n = table_size(512)
    tables = [list(range(1000 + i * n, 1000 + (i + 1) * n)) for i in range(4)]
    raw, lowest, _chain = _ext_chain(512, 100, 1, tables, bytes(188))
    found: list[tuple[int, int]] = []
    assert scan_ext_chain(raw, lowest, 512, 100, found, set(), 100, {102}) == (102, 2 * n, 101)
    assert found == [(1000, 2 * n)]
    # only the first two blocks held: stops before the third
    found = []
    assert scan_ext_chain(raw[:1024], lowest, 512, 100, found, set(), 100, ()) == (102, 2 * n, 101)
    # a chain merges with the run found before it
    seen: set[int] = set()
    found = [(1000, 2 * n)]
    assert scan_ext_chain(raw, lowest, 512, 102, found, seen, 100, ()) == (0, 2 * n, 103)
    assert found == [(1000, 4 * n)]


def test_scan_ext_chain_rejects_damage() -> None:
    from amigafuse.errors import ChainLoopError, ChecksumError, CorruptError
    from amigafuse.fs.ffs.layout import scan_ext_chain

    n = table_size(512)
    tables = [list(range(1000 + i * n, 1000 + (i + 1) * n)) for i in range(3)]
    raw, lowest, _ = _ext_chain(512, 100, 1, tables, bytes(188))

    def scan(buf: bytes | bytearray, limit: int = 100) -> None:
        scan_ext_chain(bytes(buf), lowest, 512, 100, [], set(), limit, ())

    for pos in (0, 8, 30, 400, 511, 512 + 300):  # any flipped bit: checksum
        bad = bytearray(raw)
        bad[pos] ^= 0x10
        with pytest.raises(ChecksumError) as info:
            scan(bad)
        assert info.value.block == 100 + pos // 512
    # wrong own number, with a good checksum
    blk = FileExtBlock.unpack(raw[512:1024])
    bad = bytearray(raw)
    bad[512:1024] = replace(blk, header_key=55).packed_with_checksum()
    with pytest.raises(CorruptError) as info:
        scan(bad)
    assert info.value.block == 101 and not isinstance(info.value, ChecksumError)
    # high_seq past the table, with a good checksum
    bad = bytearray(raw)
    bad[512:1024] = replace(blk, high_seq=n + 1).packed_with_checksum()
    with pytest.raises(CorruptError):
        scan(bad)
    # not a T_LIST block
    bad = bytearray(raw)
    bad[512:1024] = replace(blk, type=8).packed_with_checksum()
    with pytest.raises(CorruptError):
        scan(bad)
    # a loop: the last block points back at the first
    last = FileExtBlock.unpack(raw[1024:1536])
    bad = bytearray(raw)
    bad[1024:1536] = replace(last, extension=100).packed_with_checksum()
    with pytest.raises(ChainLoopError):
        scan(bad)
    # too long a chain for the volume
    with pytest.raises(ChainLoopError):
        scan(raw, limit=1)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([512, 1024, 4096]), st.integers(1, 12), st.integers(-1, 11),
    st.sampled_from(["type", "owner", "bit"]), st.binary(min_size=1, max_size=40),
)  # fmt: skip
def test_first_bad_ofs_block_matches_the_codec(block_size: int, count: int, bad: int, how: str, seed: bytes) -> None:
    from amigafuse.fs.ffs.layout import T_DATA, first_bad_ofs_block

    owner = 4242
    raw = bytearray()
    for i in range(count):
        payload = (seed * (block_size // len(seed) + 1))[: block_size - 24]
        block = OfsDataBlock(T_DATA, owner, i + 1, block_size - 24, 0, 0, payload).packed_with_checksum()
        raw += block
    if 0 <= bad < count:
        at = bad * block_size
        if how == "type":
            raw[at : at + block_size] = replace(OfsDataBlock.unpack(bytes(raw[at : at + block_size])), type=16).packed_with_checksum()
        elif how == "owner":
            raw[at : at + block_size] = replace(OfsDataBlock.unpack(bytes(raw[at : at + block_size])), header_key=7).packed_with_checksum()
        else:
            raw[at + 100] ^= 0x20
    want = -1
    for i in range(count):
        piece = bytes(raw[i * block_size : (i + 1) * block_size])
        d = OfsDataBlock.unpack(piece)
        if d.type != T_DATA or d.header_key != owner or not verify_checksum(piece):
            want = i
            break
    assert first_bad_ofs_block(bytes(raw), block_size, owner) == want
    assert want == (bad if 0 <= bad < count else -1)
