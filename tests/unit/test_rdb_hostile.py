"""Hostile and broken RDBs: every one ends in a layout with problems, never a hang, a
traceback or a read outside the disk.  The number of blocks a scan reads is bounded
(asserted by counting the scanner's read requests, not by timing)."""

from __future__ import annotations

import struct
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from amigafuse.rdb.blocks import (
    FileSysHeaderBlock,
    LoadSegBlock,
    PartitionBlock,
    RigidDiskBlock,
    compute_checksum,
)
from amigafuse.rdb.mounter import Mounter
from amigafuse.rdb.scan import (
    MAX_FILESYSTEMS,
    MAX_LSEG_BLOCKS,
    MAX_PARTITIONS,
    DiskLayout,
    scan_disk,
)
from amigafuse.rdb.writer import HandlerSpec, PartitionSpec, plan_disk

MiB = 1 << 20
DOS3 = 0x444F5303
READ_BOUND = 1 + MAX_PARTITIONS + MAX_FILESYSTEMS * (1 + MAX_LSEG_BLOCKS) + 1024 + 1


def scan(image: bytes | bytearray) -> tuple[DiskLayout, int]:
    """scan_bytes, counting read requests and checking each lies inside the image."""
    count = len(image) // 512
    gen = scan_disk(512, count)
    reads = 0
    try:
        req = next(gen)
        while True:
            reads += 1
            assert req.lba >= 0 and req.lba + req.count <= count, req
            assert reads <= READ_BOUND
            req = gen.send(bytes(image[req.lba * 512 : (req.lba + req.count) * 512]))
    except StopIteration as stop:
        return stop.value, reads


def base_disk(size: int = 8 * MiB, nparts: int = 3, handler: bool = True) -> bytearray:
    specs = [PartitionSpec(f"DH{i}", DOS3, MiB) for i in range(nparts)]
    code = b"\x00\x00\x03\xf3" + bytes(2000)
    plan = plan_disk(size, specs, HandlerSpec(0x50465303, code) if handler else None)
    img = bytearray(size)
    for lba, data in plan.blocks:
        img[lba * 512 : lba * 512 + 512] = data
    for p in plan.partitions:  # a volume in each, so the mounter sees DOS\3
        img[p.first_lba * 512 : p.first_lba * 512 + 4] = b"DOS\x03"
    return img


def put(img: bytearray, lba: int, block: bytes) -> None:
    img[lba * 512 : lba * 512 + 512] = block


def get(img: bytearray, lba: int) -> bytes:
    return bytes(img[lba * 512 : lba * 512 + 512])


def test_part_chain_pointing_to_itself() -> None:
    img = base_disk()
    part = PartitionBlock.unpack(get(img, 2))
    put(img, 2, replace(part, pb_Next=2).seal().pack())
    layout, _ = scan(img)
    assert [p.drive_name for p in layout.partitions] == ["DH0", "DH1"]
    assert any("loops" in e.message and e.field == "pb_Next" for e in layout.errors)


def test_part_chain_two_cycle_and_fshd_loop_and_lseg_loop() -> None:
    img = base_disk()
    p2 = PartitionBlock.unpack(get(img, 3))
    put(img, 3, replace(p2, pb_Next=1).seal().pack())
    fshd = FileSysHeaderBlock.unpack(get(img, 4))
    put(img, 4, replace(fshd, fhb_Next=4).seal().pack())
    lseg = LoadSegBlock.unpack(get(img, 6))
    put(img, 6, replace(lseg, lsb_Next=5).seal().pack())
    layout, _ = scan(img)
    assert len(layout.partitions) == 3  # the loop is cut; nothing hides a partition
    fields = {e.field for e in layout.errors}
    assert {"pb_Next", "fhb_Next", "lsb_Next"} <= fields
    assert layout.filesystems and not layout.filesystems[0].complete


def test_pointers_past_the_disk() -> None:
    img = base_disk()
    rdsk = RigidDiskBlock.unpack(get(img, 0))
    put(img, 0, replace(rdsk, rdb_FileSysHeaderList=0x7FFFFFFF, rdb_BadBlockList=99999).seal().pack())
    part = PartitionBlock.unpack(get(img, 1))
    put(img, 1, replace(part, pb_Next=0xFFFFFFF0).seal().pack())
    layout, _ = scan(img)
    assert [p.drive_name for p in layout.partitions] == ["DH0"]
    msgs = " ".join(str(e) for e in layout.errors)
    assert "past the end of the disk" in msgs and "rdb_FileSysHeaderList" in msgs and "pb_Next" in msgs


def test_absurd_geometry_and_overlap_and_rdb_overlap() -> None:
    img = base_disk()
    p0 = PartitionBlock.unpack(get(img, 1))
    env = p0.pb_Environment
    put(img, 1, replace(p0, pb_Environment=replace(env, de_Surfaces=0xFFFFFFFF, de_HighCyl=0xFFFFFFFF)).seal().pack())
    p1 = PartitionBlock.unpack(get(img, 2))
    p2 = PartitionBlock.unpack(get(img, 3))
    # DH2 overlaps DH1; DH1 then starts at cylinder 0 (over the RDB).
    put(img, 3, replace(p2, pb_Environment=p1.pb_Environment).seal().pack())
    put(img, 2, replace(p1, pb_Environment=replace(p1.pb_Environment, de_LowCyl=0)).seal().pack())
    layout, _ = scan(img)
    names = {p.drive_name: p for p in layout.partitions}
    assert "DH0" not in names  # absurd DosEnvec: skipped, reported
    assert any(e.field == "de_Surfaces" for e in layout.errors)
    assert any("RDB block" in i for i in names["DH1"].issues)
    assert any("overlaps" in i for i in names["DH2"].issues)
    anns = Mounter(lambda d: "ffs").add_unit("u", layout, {1: DOS3, 2: DOS3})
    assert not any(a.mountable for a in anns)


def test_partition_past_the_end_of_a_truncated_image() -> None:
    img = base_disk()[: 3 * MiB]  # partitions 1 and 2 lie (partly) beyond
    layout, _ = scan(img)
    issues = {p.drive_name: p.issues for p in layout.partitions}
    assert issues["DH0"] == ()
    assert issues["DH2"] and "past the end of the disk" in issues["DH2"][0]
    assert layout.filesystems  # handler still found


def test_tiny_and_empty_images() -> None:
    for size in (0, 512, 512 * 3):
        layout, _ = scan(bytes(size))
        assert layout.kind == "none" and not layout.partitions
    img = base_disk()[:1024]  # RDSK + one PART block only
    layout, _ = scan(img)
    assert layout.kind == "rdb"
    (dh0,) = layout.partitions  # listed, with the reason it cannot be mounted
    assert dh0.issues and "past the end of the disk" in dh0.issues[0]
    assert any("past the end" in e.message and e.field == "pb_Next" for e in layout.errors)


def test_bad_part_checksum_is_skipped_and_chain_continues() -> None:
    img = base_disk()
    raw = bytearray(get(img, 2))
    raw[100] ^= 0xFF
    put(img, 2, bytes(raw))
    layout, _ = scan(img)
    assert [p.drive_name for p in layout.partitions] == ["DH0", "DH2"]
    assert any(e.block == 2 and e.field == "pb_ChkSum" for e in layout.errors)


def test_bad_fshd_hides_no_partition() -> None:
    img = base_disk()
    raw = bytearray(get(img, 4))
    raw[40] ^= 1
    put(img, 4, bytes(raw))
    layout, _ = scan(img)
    assert len(layout.partitions) == 3 and not layout.filesystems
    assert any(e.field == "fhb_ChkSum" for e in layout.errors)


def test_rdsk_with_bad_checksum_falls_back_to_bare_or_none() -> None:
    img = base_disk()
    img[8] ^= 1
    layout, _ = scan(img)
    assert layout.kind == "none"
    assert any(p.field == "rdb_ChkSum" for p in layout.problems)


def seal_raw(block: bytes) -> bytes:
    raw = bytearray(block)
    summed = struct.unpack_from(">I", raw, 4)[0]
    if 3 <= summed <= 128:
        raw[8:12] = struct.pack(">I", compute_checksum(bytes(raw), summed))
    return bytes(raw)


LONG = st.one_of(
    st.sampled_from([0, 1, 2, 3, 5, 16, 64, 127, 128, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)


@given(
    rdsk_longs=st.lists(LONG, min_size=64, max_size=64),
    blocks=st.lists(
        st.tuples(st.sampled_from([b"PART", b"FSHD", b"LSEG", b"BADB", b"RDSK"]), st.lists(LONG, min_size=127, max_size=127)),
        min_size=1,
        max_size=15,
    ),
    total_blocks=st.integers(16, 4096),
)
def test_garbage_in_every_field_never_crashes(
    rdsk_longs: list[int], blocks: list[tuple[bytes, list[int]]], total_blocks: int
) -> None:
    img = bytearray(total_blocks * 512)
    rdsk = bytearray(struct.pack(">64I", *rdsk_longs)) + bytes(256)
    rdsk[0:4] = b"RDSK"
    rdsk[4:8] = struct.pack(">I", 64)
    rdsk[16:20] = struct.pack(">I", 512)
    # Chains start inside the garbage blocks most of the time.
    for off, val in ((24, rdsk_longs[6] % 17), (28, rdsk_longs[7] % 17), (32, rdsk_longs[8] % 17)):
        rdsk[off : off + 4] = struct.pack(">I", val)
    put(img, 0, seal_raw(bytes(rdsk)))
    for i, (ident, longs) in enumerate(blocks):
        raw = bytearray(ident + struct.pack(">127I", *longs))
        if longs[0] % 3:
            raw[4:8] = struct.pack(">I", 64 if ident != b"LSEG" else 128)
        if ident != b"RDSK":
            raw[16:20] = struct.pack(">I", longs[3] % 18)  # next: nearby block, loops likely
        put(img, 1 + i, seal_raw(bytes(raw)))
    layout, _reads = scan(img)
    assert layout.kind in ("rdb", "none", "bare")
    for p in layout.partitions:
        if not p.issues:
            assert p.first_byte >= 0 and p.last_byte < len(img)
            assert p.geometry.fs_block_count > p.geometry.reserved
    # Announcing never fails either.
    Mounter(lambda d: None).add_unit("u", layout, {p.index: 0 for p in layout.partitions})
