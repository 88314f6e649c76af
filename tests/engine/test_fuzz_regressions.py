"""Regression tests for what the hostile-image fuzzers (fuzz/) found.

Each test rebuilds the damage by hand (a precise mutation of a volume our own ``format``
made, checksum fixed so only logic can see it) and asserts the clean outcome: an
AmigaFuseError subclass with its errno, never IndexError/ValueError/AssertionError.
The fuzz input that found each one is named in its docstring."""

from __future__ import annotations

import struct

import pytest

from amigafuse.amiga.dostype import SFS0
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.errors import ChainLoopError, CorruptError, NotFound
from amigafuse.fs.ffs import ENGINE as FFS
from amigafuse.fs.ffs import open_volume as ffs_open
from amigafuse.fs.ffs.layout import hash_name, with_checksum
from amigafuse.fs.sfs import check_volume as sfs_check
from amigafuse.fs.sfs import codec as sfs_codec
from amigafuse.fs.sfs import format_volume as sfs_format
from amigafuse.fs.sfs import open_volume as sfs_open

DOS3 = 0x444F5303
DOS5 = 0x444F5305
BLOCKS = 400
BS = 512
ROOT = (2 + BLOCKS - 1) // 2


def ffs_geometry(dostype: int) -> VolumeGeometry:
    return VolumeGeometry(dostype=dostype, fs_block_count=BLOCKS, reserved=2)


async def ffs_image(dostype: int, names: tuple[str, ...]) -> tuple[bytearray, dict[str, int]]:
    """A volume with one small file per name in the root; name -> header block."""
    dev = MemoryBlockDevice(BLOCKS)
    geo = ffs_geometry(dostype)
    await FFS.format_volume(dev, geo, "Regress")
    vol = await ffs_open(dev, geo, False)
    for name in names:
        st = await vol.create(vol.root_id, name)
        await vol.write(st.object_id, 0, name.encode() * 10)
    await vol.close()
    raw = bytearray(dev.data)
    keys = {}
    for block in range(2, BLOCKS):
        data = raw[block * BS : block * BS + BS]
        if struct.unpack_from(">L", data, 0)[0] == 2 and struct.unpack_from(">l", data, BS - 4)[0] == -3:
            keys[bytes(data[BS - 79 : BS - 79 + data[BS - 80]]).decode()] = block
    return raw, keys


def reseal(raw: bytearray, block: int, offset: int = 20) -> None:
    raw[block * BS : block * BS + BS] = with_checksum(raw[block * BS : block * BS + BS], offset)


def rename_header(raw: bytearray, block: int, new_name: bytes) -> None:
    """Give the header at ``block`` another name of the same length (checksum fixed),
    leaving it in the hash slot of its old name."""
    start = block * BS + BS - 80
    assert raw[start] == len(new_name)
    raw[start + 1 : start + 1 + len(new_name)] = new_name
    reseal(raw, block)


async def test_entry_in_the_wrong_hash_slot_is_not_found_by_name() -> None:
    """fuzz: ffs-3-512 ``block 347 +104: copy-long-from`` (random-11-294/706/1405): the
    name index found a header whose name hashes to another slot; rename then looked
    for it in its name's chain: ValueError ("469 is not in list") in the middle of
    rename's no-await section.  Now the index agrees with AmigaOS Lookup(): the entry
    is listed by readdir but not found by name."""
    raw, keys = await ffs_image(DOS3, ("alpha",))
    wrong = b"omega"
    assert hash_name(wrong, True, BS) != hash_name(b"alpha", True, BS)
    rename_header(raw, keys["alpha"], wrong)
    dev = MemoryBlockDevice(data=raw)
    vol = await ffs_open(dev, ffs_geometry(DOS3), False)
    assert [s.name for s in await vol.readdir(vol.root_id)] == ["omega"]
    with pytest.raises(NotFound):
        await vol.lookup(vol.root_id, "omega")
    with pytest.raises(NotFound):
        await vol.rename(vol.root_id, "omega", vol.root_id, "renamed")
    with pytest.raises(NotFound):
        await vol.unlink(vol.root_id, "omega")
    st = await vol.create(vol.root_id, "other")  # the rest of the volume still works
    await vol.write(st.object_id, 0, b"still fine")
    await vol.close()
    before = await FFS.check_volume(MemoryBlockDevice(data=raw), ffs_geometry(DOS3), False)
    after = await FFS.check_volume(dev, ffs_geometry(DOS3), False)
    assert len(after.errors) <= len(before.errors)
    vol = await ffs_open(dev, ffs_geometry(DOS3), True)
    assert await vol.read((await vol.lookup(vol.root_id, "other")).object_id, 0, 100) == b"still fine"


async def test_dircache_records_overrunning_their_block_are_eio_for_writers() -> None:
    """fuzz: ffs-5-512 random-12-1038 (``block 351 +13: byte 0xf3 +checksum``): a
    dircache block whose record count overruns the block (checksum valid) reached the
    writer's cache; create() then raised ValueError ("dircache record overruns its
    block") from the dircache codec.  Now loading the block refuses it: CorruptError."""
    raw, _ = await ffs_image(DOS5, ("alpha", "beta"))
    dircache = struct.unpack_from(">L", raw, ROOT * BS + BS - 8)[0]  # root's extension
    assert 2 <= dircache < BLOCKS
    assert struct.unpack_from(">L", raw, dircache * BS)[0] == 33  # T_DIRCACHE
    struct.pack_into(">L", raw, dircache * BS + 12, 0xF3)  # records_nb far too large
    reseal(raw, dircache)
    vol = await ffs_open(MemoryBlockDevice(data=raw), ffs_geometry(DOS5), False)
    assert sorted(s.name for s in await vol.readdir(vol.root_id)) == ["alpha", "beta"]
    with pytest.raises(CorruptError) as info:
        await vol.create(vol.root_id, "gamma")
    assert info.value.block == dircache
    assert info.value.errno == 5
    await vol.close()


async def test_sfs_hash_chain_repeating_the_removed_node_is_refused() -> None:
    """fuzz: sfs-0-512 (``block 4 +116: interesting 0x7 +checksum``, a node's ``next``
    naming a node already in the chain).  hash_remove unlinked the first copy of the
    node and left the loop in place (here: a chain whose only node points to itself,
    so the directory's hash table kept naming the removed object).  Now the whole
    chain is walked first and a repeat is a ChainLoopError; nothing is written."""
    geo = VolumeGeometry(dostype=SFS0, fs_block_size=512)
    dev = MemoryBlockDevice((1 << 20) // 512)
    await sfs_format(dev, geo, "Regress")
    vol = await sfs_open(dev, geo, False)
    st = await vol.create(vol.root_id, "a")
    await vol.write(st.object_id, 0, b"a" * 100)
    await vol.close()
    vol = await sfs_open(MemoryBlockDevice(data=bytes(dev.data)), geo, True)
    node = (await vol.lookup(vol.root_id, "a")).object_id
    ref = (await vol.r.node_path(node))[-1]  # type: ignore[attr-defined]
    raw = bytearray(dev.data)
    start = ref.block * 512
    offset = start + sfs_codec.NODECONTAINER_HEADER + (node - ref.nodenumber) * sfs_codec.OBJECTNODE_SIZE
    on = sfs_codec.ObjectNode(*struct.unpack_from(sfs_codec.ObjectNode.FORMAT, raw, offset))
    assert on.next == 0  # the only entry of its chain
    struct.pack_into(">I", raw, offset + 4, node)  # next: itself
    blk = bytearray(raw[start : start + 512])
    sfs_codec.set_checksum(blk)
    raw[start : start + 512] = blk
    damaged = bytes(raw)
    rw = MemoryBlockDevice(data=damaged)
    vol = await sfs_open(rw, geo, False)
    with pytest.raises(ChainLoopError):
        await vol.rename(vol.root_id, "a", vol.root_id, "b")
    await vol.close()
    before = await sfs_check(MemoryBlockDevice(data=damaged), geo, False)
    after = await sfs_check(rw, geo, False)
    assert not before.clean
    assert after.errors == before.errors


async def test_bitmap_that_is_another_blocks_copy_is_rebuilt_not_believed() -> None:
    """fuzz: ffs-0-512 ``block 351 +0: copy-block-from 0x191`` (no checksum fix
    needed: any header's longs sum to zero, so it passes as a bitmap block too).  The
    copy marked the root block free; create() allocated the root for the new header
    and the next step died on ``assert isinstance(root, RootBlock)``, with the root
    about to be overwritten.  Now a bitmap that calls the root or a bitmap block free
    is damaged: a read-write open validates the volume and rebuilds it."""
    raw, _ = await ffs_image(DOS3, ("alpha", "beta"))
    bitmap_block = struct.unpack_from(">L", raw, ROOT * BS + BS - 196)[0]  # bm_pages[0]
    assert 2 <= bitmap_block < BLOCKS
    # every block free, checksum valid (the fuzzer's copy did this for the root's bit)
    raw[bitmap_block * BS + 4 : bitmap_block * BS + BS] = b"\xff" * (BS - 4)
    reseal(raw, bitmap_block, 0)
    dev = MemoryBlockDevice(data=raw)
    vol = await ffs_open(dev, ffs_geometry(DOS3), False)
    assert any("bitmap damaged" in n for n in vol.info.notes)
    for i in range(5):
        st = await vol.create(vol.root_id, f"new{i}")
        await vol.write(st.object_id, 0, b"n" * 2000)
    await vol.close()
    assert struct.unpack_from(">L", dev.data, ROOT * BS)[0] == 2  # still T_HEADER
    assert struct.unpack_from(">l", dev.data, ROOT * BS + BS - 4)[0] == 1  # ST_ROOT
    report = await FFS.check_volume(dev, ffs_geometry(DOS3), False)
    assert report.clean, report.errors
    vol = await ffs_open(dev, ffs_geometry(DOS3), True)
    names = sorted(s.name for s in await vol.readdir(vol.root_id))
    assert names == ["alpha", "beta", "new0", "new1", "new2", "new3", "new4"]
    assert await vol.read((await vol.lookup(vol.root_id, "alpha")).object_id, 0, 100) == b"alpha" * 10


async def test_dircache_volume_without_dircache_blocks_refuses_directory_changes() -> None:
    """fuzz: ffs-1-512 ``block 0 +3: bitflip 0x4`` (the boot block says DOS\\5 on a
    volume written as DOS\\1, so no directory has a dircache).  create() started a
    dircache holding only the new entry (the checker then found every other entry
    missing from it: 5 -> 7 errors).  Now a change to a directory that has entries but
    no dircache is refused (CorruptError, pointing to check --repair), which rebuilds
    them; afterwards the same change works."""
    raw, _ = await ffs_image(0x444F5301, ("alpha", "beta"))
    raw[3] = 5  # DOS\1 -> DOS\5
    dev = MemoryBlockDevice(data=raw)
    geo = ffs_geometry(0x444F5301)  # what the RDB says
    before = await FFS.check_volume(MemoryBlockDevice(data=raw), geo, False)
    assert any("no dircache block" in e for e in before.errors)
    vol = await ffs_open(dev, geo, False)
    with pytest.raises(CorruptError, match="check --repair") as info:
        await vol.create(vol.root_id, "gamma")
    assert info.value.block == ROOT
    with pytest.raises(CorruptError):
        await vol.unlink(vol.root_id, "alpha")
    await vol.close()
    after = await FFS.check_volume(dev, geo, False)
    assert after.errors == before.errors
    repaired = await FFS.check_volume(dev, geo, True)
    assert repaired.repaired
    vol = await ffs_open(dev, geo, False)
    await vol.create(vol.root_id, "gamma")
    await vol.unlink(vol.root_id, "alpha")
    await vol.close()
    final = await FFS.check_volume(dev, geo, False)
    assert final.clean, final.errors


async def test_header_without_parent_on_a_dircache_volume_is_eio() -> None:
    """fuzz: ffs-5-512 ``block 360 +500: u32 0x0 +checksum`` (a file header's parent
    field zeroed).  truncate() refreshed the file's dircache record in "directory 0":
    KeyError from the block cache.  Now loading what the refresh needs refuses a
    header that names no parent: CorruptError."""
    raw, keys = await ffs_image(DOS5, ("alpha", "beta"))
    header = keys["alpha"]
    struct.pack_into(">L", raw, header * BS + BS - 12, 0)  # parent
    reseal(raw, header)
    dev = MemoryBlockDevice(data=raw)
    vol = await ffs_open(dev, ffs_geometry(DOS5), False)
    alpha = await vol.lookup(vol.root_id, "alpha")
    assert await vol.read(alpha.object_id, 0, 100) == b"alpha" * 10
    with pytest.raises(CorruptError, match="no parent") as info:
        await vol.truncate(alpha.object_id, 10)
    assert info.value.block == header
    beta = await vol.lookup(vol.root_id, "beta")
    await vol.truncate(beta.object_id, 4)  # the rest of the volume still works
    await vol.close()
    vol = await ffs_open(dev, ffs_geometry(DOS5), True)
    assert await vol.read((await vol.lookup(vol.root_id, "beta")).object_id, 0, 100) == b"beta"
    assert await vol.read(alpha.object_id, 0, 100) == b"alpha" * 10


def test_fuzz_harnesses_run_a_fixed_sample_without_findings() -> None:
    """The fuzz harnesses (fuzz/, normally run under atheris) over a fixed sample of
    inputs: none may raise a finding (a non-AmigaFuseError exception, a hang, damage
    outside the partition or to a volume the checker found sound), and most inputs
    must get as far as a read-only mount and a walk, so the harnesses keep testing."""
    import random

    from fuzz import ffs_read, rdb_scan, sfs_read
    from fuzz._common import BytesProvider, run_one

    rng = random.Random(20261124)
    mounted = 0
    for i in range(30):
        for harness in (ffs_read, sfs_read):
            base = harness.BASES[i % len(harness.BASES)]
            result = run_one(base, BytesProvider(rng.randbytes(40)))
            mounted += bool(result["opened_ro"] and result.get("walked", 0) > 0)
        rdb_scan.one_input(BytesProvider(rng.randbytes(40)))
    assert mounted >= 40


async def test_sfs_recycled_counters_at_their_maximum_do_not_overflow() -> None:
    """fuzz: sfs-0-1024 ``block 3 +992: u32 0xffffffff +checksum`` (the root info's
    deletedfiles at its maximum).  unlink() moved the file into .recycled and counted
    it: 0xFFFFFFFF + 1 raised struct.error when the root info was packed.  Now the
    counters are clamped to 32 bits."""
    geo = VolumeGeometry(dostype=SFS0, fs_block_size=512)
    dev = MemoryBlockDevice((1 << 20) // 512)
    await sfs_format(dev, geo, "Regress")
    vol = await sfs_open(dev, geo, False)
    st = await vol.create(vol.root_id, "a")
    await vol.write(st.object_id, 0, b"a" * 1000)
    await vol.close()
    vol = await sfs_open(MemoryBlockDevice(data=bytes(dev.data)), geo, True)
    container = vol.r.root.rootobjectcontainer  # type: ignore[attr-defined]
    raw = bytearray(dev.data)
    start = container * 512
    info = start + 512 - sfs_codec.ROOTINFO_SIZE
    struct.pack_into(">II", raw, info, 0xFFFFFFFF, 0xFFFFFFFF)  # deletedblocks, deletedfiles
    blk = bytearray(raw[start : start + 512])
    sfs_codec.set_checksum(blk)
    raw[start : start + 512] = blk
    rw = MemoryBlockDevice(data=bytes(raw))
    vol = await sfs_open(rw, geo, False)
    await vol.unlink(vol.root_id, "a")
    await vol.close()
    # counted (clamped), then .recycled over its limit purged the oldest entries
    deleted_blocks, deleted_files = struct.unpack_from(">II", rw.data, info)
    assert deleted_files >= 0xFFFFFFF0 and deleted_blocks >= 0xFFFFFFF0
    vol = await sfs_open(rw, geo, True)
    assert [s.name for s in await vol.readdir(vol.root_id)] == []


async def test_sfs_node_container_numbering_past_32_bits_is_eio() -> None:
    """fuzz: sfs-0-512 ``block 19 +12: u32 0xffffffff +checksum`` (a node container's
    nodenumber near 2^32).  create() took a free node there and its number did not
    fit the object's 32-bit field: struct.error.  Now such a container is refused when
    it is read: CorruptError.  (Built here as a copy of the root node container in a
    free block, read through the reader, so the volume itself still opens.)"""
    geo = VolumeGeometry(dostype=SFS0, fs_block_size=512)
    dev = MemoryBlockDevice((1 << 20) // 512)
    await sfs_format(dev, geo, "Regress")
    vol = await sfs_open(dev, geo, False)
    await vol.create(vol.root_id, "a")
    await vol.close()
    vol = await sfs_open(MemoryBlockDevice(data=bytes(dev.data)), geo, True)
    root_nodes = vol.r.root.objectnoderoot  # type: ignore[attr-defined]
    raw = bytearray(dev.data)
    spare = 1500  # free on this 2048-block volume
    assert raw[spare * 512 : spare * 512 + 512] == bytes(512)
    blk = bytearray(raw[root_nodes * 512 : root_nodes * 512 + 512])
    assert struct.unpack_from(">I", blk, 0)[0] == sfs_codec.NODECONTAINER_ID
    struct.pack_into(">II", blk, 8, spare, 0xFFFFFFF0)  # ownblock, nodenumber
    sfs_codec.set_checksum(blk)
    raw[spare * 512 : spare * 512 + 512] = blk
    vol = await sfs_open(MemoryBlockDevice(data=bytes(raw)), geo, False)
    with pytest.raises(CorruptError, match="2\\^32") as info:
        await vol.r.ncontainer(spare)  # type: ignore[attr-defined]
    assert info.value.block == spare
    await vol.close()
