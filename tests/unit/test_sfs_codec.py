"""SFS block codecs: pack(unpack(b)) == b for every record, checksums, hashing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.errors import ChecksumError, CorruptError
from amigafuse.fs.sfs import codec

SIZES = st.sampled_from([512, 1024, 2048, 4096])


@st.composite
def blocks(draw: st.DrawFn) -> bytes:
    size = draw(SIZES)
    return draw(st.binary(min_size=size, max_size=size))


@given(blocks())
def test_root_roundtrip(b: bytes) -> None:
    assert codec.RootBlock.unpack(b).pack() == b


@given(blocks())
def test_simple_roundtrips(b: bytes) -> None:
    assert codec.HashTable.unpack(b).pack() == b
    assert codec.NodeContainer.unpack(b).pack() == b
    assert codec.Bitmap.unpack(b).pack() == b
    assert codec.AdminSpaceContainer.unpack(b).pack() == b
    assert codec.SoftLink.unpack(b).pack() == b
    assert codec.TransactionFailure.unpack(b).pack() == b
    assert codec.TransactionStorage.unpack(b).pack() == b
    assert codec.RootInfo.unpack(b[-36:]).pack() == b[-36:]


@given(blocks(), st.booleans())
def test_leaf_node_container_roundtrip(b: bytes, sfs2: bool) -> None:
    leaf = bytearray(b)
    struct.pack_into(">I", leaf, 16, 1)
    nc = codec.NodeContainer.unpack(bytes(leaf))
    assert nc.nodes == 1 and len(nc.objectnodes) == codec.leaf_node_count(len(b))
    assert nc.pack() == bytes(leaf)


@given(blocks(), st.sampled_from([(8, 0), (14, 1), (16, 1), (14, 0), (8, 1)]), st.integers(0, 40))
def test_bnode_container_roundtrip(b: bytes, shape: tuple[int, int], count: int) -> None:
    nodesize, isleaf = shape
    raw = bytearray(b)
    if (nodesize == 8) == bool(isleaf):
        struct.pack_into(">HBB", raw, 12, count, isleaf, nodesize)
        with pytest.raises(CorruptError):
            codec.BNodeContainer.unpack(bytes(raw))
        return
    if 16 + count * nodesize > len(raw):
        struct.pack_into(">HBB", raw, 12, count * 100, isleaf, nodesize)
        with pytest.raises(CorruptError):
            codec.BNodeContainer.unpack(bytes(raw))
        count = (len(raw) - 16) // nodesize
    struct.pack_into(">HBB", raw, 12, count, isleaf, nodesize)
    bc = codec.BNodeContainer.unpack(bytes(raw))
    assert bc.pack() == bytes(raw)


names = st.binary(min_size=1, max_size=107).map(lambda x: x.replace(b"\0", b"a"))
comments = st.binary(max_size=79).map(lambda x: x.replace(b"\0", b"c"))


@st.composite
def objects(draw: st.DrawFn, sfs2: bool) -> codec.SfsObject:
    return codec.SfsObject(
        owneruid=draw(st.integers(0, 0xFFFF)),
        ownergid=draw(st.integers(0, 0xFFFF)),
        objectnode=draw(st.integers(1, 0xFFFFFFFF)),
        protection=draw(st.integers(0, 0xFFFFFFFF)),
        data=draw(st.integers(0, 0xFFFFFFFF)),
        size=draw(st.integers(0, (1 << 48) - 1 if sfs2 else 0xFFFFFFFF)),
        datemodified=draw(st.integers(0, 0xFFFFFFFF)),
        bits=draw(st.integers(0, 255)),
        name=draw(names),
        comment=draw(comments),
        sfs2=sfs2,
    )


@given(st.data(), st.booleans(), st.sampled_from([512, 1024]))
def test_object_container_roundtrip(data: st.DataObject, sfs2: bool, size: int) -> None:
    objs = []
    used = codec.OBJECTCONTAINER_HEADER
    for _ in range(data.draw(st.integers(0, 6))):
        o = data.draw(objects(sfs2))
        if used + o.packed_size > size - 40:
            break
        objs.append(o)
        used += o.packed_size
    raw = codec.build_object_container(size, 77, 5, 0, 0, objs, sfs2=sfs2)
    oc = codec.ObjectContainer.unpack(bytes(raw), sfs2)
    assert list(oc.objects) == objs
    assert oc.pack() == bytes(raw)
    codec.check_block(bytes(raw), 77, codec.OBJECTCONTAINER_ID, sfs2)


@given(blocks(), st.booleans())
def test_checksum_rules(b: bytes, sfs2: bool) -> None:
    raw = bytearray(b)
    codec.finish_block(raw, codec.HASHTABLE_ID, 9, sfs2)
    assert codec.checksum_ok(raw, sfs2)
    assert not codec.checksum_ok(raw, not sfs2)
    codec.check_block(bytes(raw), 9, codec.HASHTABLE_ID, sfs2)
    with pytest.raises(CorruptError):
        codec.check_block(bytes(raw), 10, codec.HASHTABLE_ID, sfs2)
    with pytest.raises(CorruptError):
        codec.check_block(bytes(raw), 9, codec.OBJECTCONTAINER_ID, sfs2)
    raw[100] ^= 1
    with pytest.raises(ChecksumError):
        codec.check_block(bytes(raw), 9, codec.HASHTABLE_ID, sfs2)


def test_hash_matches_handler() -> None:
    # .recycled (hash chain 58 of 124 in sfs0_v1277's root HTAB at block 4) and
    # case folding of Latin-1 letters as the handler's upperchar().
    assert codec.name_hash(b".recycled", False) % 124 == 58
    assert codec.name_hash(b"abc\xe4", False) == codec.name_hash(b"ABC\xc4", False)
    assert codec.name_hash(b"abc", True) != codec.name_hash(b"ABC", True)
    assert codec.names_equal(b"\xff", b"\xff", False)
    assert not codec.names_equal(b"\xf7", b"\xd7", False)


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=61))
def test_journal_roundtrip(pairs: list[tuple[int, int]]) -> None:
    head = codec.JournalHeader(codec.JOURNAL_HEADER_ID, 0, 5, 3, len(pairs), 0, tuple(pairs), b"")
    raw = head.pack()
    raw += bytes(512 - len(raw))
    back = codec.JournalHeader.unpack(raw)
    assert back.pairs == tuple(pairs)
    assert back.pack() == raw


@given(st.booleans(), st.binary(min_size=1, max_size=30), st.binary(max_size=20), st.integers(0, 2**32 - 1))
def test_evolve_equals_replace(sfs2: bool, name: bytes, comment: bytes, size: int) -> None:
    import dataclasses

    obj = codec.SfsObject(1, 2, 3, 4, 5, 6, 7, 0, b"x", b"", sfs2)
    changes = {"name": name, "comment": comment, "size": size}
    a, b = obj.evolve(**changes), dataclasses.replace(obj, **changes)
    assert a == b and a.packed_size == b.packed_size
    with pytest.raises(TypeError):
        obj.evolve(nosuchfield=1)
    nc = codec.NodeContainer.unpack(bytes(512))
    assert codec.fast_replace(nc, nodes=7) == dataclasses.replace(nc, nodes=7)
    with pytest.raises(TypeError):
        codec.fast_replace(obj, size=1)  # SfsObject derives packed_size
