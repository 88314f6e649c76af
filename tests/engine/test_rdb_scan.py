"""The RDB scanner on real disks and on disks made by amitools' rdbtool, cross-checked
against rdbtool's own JSON reading of the same blocks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amigafuse.blockdev import FileBlockDevice, MemoryBlockDevice
from amigafuse.errors import MediumError
from amigafuse.rdb.scan import DiskLayout, scan_bytes, scan_device
from tests.conftest import shared_image

RDBTOOL = str(Path(sys.executable).with_name("rdbtool"))


def rdbtool(*args: str) -> str:
    out = subprocess.run([RDBTOOL, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def rdbtool_json(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(rdbtool(str(path), "json"))  # type: ignore[no-any-return]


def assert_matches_rdbtool(layout: DiskLayout, ref: dict) -> None:  # type: ignore[type-arg]
    rdb = ref["rdb"]
    assert layout.kind == "rdb"
    assert layout.rdsk is not None
    pd = rdb["physical_drive"]
    assert layout.rdsk.rdb_Cylinders == pd["cyls"]
    assert layout.rdsk.rdb_Heads == pd["heads"]
    assert layout.rdsk.rdb_Sectors == pd["secs"]
    assert layout.rdsk.rdb_Park == pd["parking_zone"]
    ld = rdb["logical_drive"]
    assert layout.rdsk.rdb_LoCylinder == ld["lo_cyl"] and layout.rdsk.rdb_HiCylinder == ld["hi_cyl"]
    assert layout.rdsk.rdb_RDBBlocksHi == ld["rdb_blk_hi"]
    assert len(layout.partitions) == len(rdb["partitions"])
    for ours, theirs in zip(layout.partitions, rdb["partitions"], strict=True):
        env = theirs["dos_env"]
        assert ours.drive_name == theirs["name"]
        assert ours.dostype == env["dos_type"]
        assert ours.bootable == theirs["bootable"]
        assert ours.no_automount == (not theirs["automount"])
        assert ours.boot_pri == env["boot_pri"]
        g = ours.geometry
        assert (g.low_cyl, g.high_cyl, g.surfaces, g.blocks_per_track) == (
            env["low_cyl"], env["high_cyl"], env["surfaces"], env["blk_per_trk"]
        )
        assert (g.reserved, g.prealloc, g.max_transfer, g.mask) == (
            env["reserved"], env["pre_alloc"], env["max_transfer"], env["mask"]
        )
        assert g.size_block_bytes == env["block_size"] * 4
        assert g.fs_block_size == env["block_size"] * 4 * env["sec_per_blk"]
        cyl = env["surfaces"] * env["blk_per_trk"] * env["block_size"] * 4
        assert ours.first_byte == env["low_cyl"] * cyl
        assert ours.size_bytes == (env["high_cyl"] - env["low_cyl"] + 1) * cyl
        assert not ours.issues
    assert len(layout.filesystems) == len(rdb["filesystems"])
    for ours_fs, theirs_fs in zip(layout.filesystems, rdb["filesystems"], strict=True):
        assert ours_fs.dostype == theirs_fs["dostype"]
        assert ours_fs.version == theirs_fs["version"]
        assert ours_fs.complete


def test_a590_six_partitions_match_rdbtool() -> None:
    path = shared_image("real/a590_WD93028XA_6parts.hdd.gz")
    layout = scan_bytes(path.read_bytes())
    assert_matches_rdbtool(layout, rdbtool_json(path))
    assert not layout.problems
    names = [p.drive_name for p in layout.partitions]
    assert names == ["OFS", "OFS INTL", "OFS DirCache", "FFS", "FFS INTL", "FFS DirCache"]
    assert [p.dostype & 0xFF for p in layout.partitions] == [0, 2, 4, 1, 3, 5]
    # The bootable flag only on the first, as the README says.
    assert [p.bootable for p in layout.partitions] == [True] + [False] * 5
    # Each partition's first block is the volume's boot block with the same DosType.
    data = path.read_bytes()
    for p in layout.partitions:
        assert int.from_bytes(data[p.first_byte : p.first_byte + 4], "big") == p.dostype


def test_unformatted_a590_has_the_same_table() -> None:
    path = shared_image("real/a590_WD93028XA_6parts_not_formatted.hdd.gz")
    layout = scan_bytes(path.read_bytes())
    assert_matches_rdbtool(layout, rdbtool_json(path))


@pytest.mark.skipif(shutil.which(RDBTOOL) is None and not Path(RDBTOOL).exists(), reason="rdbtool missing")
def test_rdbtool_made_disk_with_handler(tmp_path: Path) -> None:
    img = tmp_path / "t.hdf"
    rdbtool(
        str(img), "create", "size=20Mi", "+", "init", "+",
        "add", "size=5MiB", "name=DH0", "dostype=ffs", "bootable=1", "pri=3", "+",
        "add", "size=5MiB", "name=DH1", "automount=0", "+",
        "add", "size=3MiB", "name=BIG", "dostype=DOS3", "bs=1024", "+", "fill", "name=WORK",
    )  # fmt: skip
    handler = tmp_path / "fs.bin"
    code = b"\x00\x00\x03\xf3" + bytes(100) + b"$VER: testfs 45.2 (1.1.2020)\0\0\0\0" + bytes(range(256)) * 12
    assert len(code) % 4 == 0  # handler binaries are whole longs
    handler.write_bytes(code)
    rdbtool(str(img), "fsadd", str(handler), "dostype=0x50465303", "version=45.2")
    layout = scan_bytes(img.read_bytes())
    assert_matches_rdbtool(layout, rdbtool_json(img))
    assert not layout.errors
    (fs,) = layout.filesystems
    assert fs.ver_string == "testfs 45.2 (1.1.2020)"
    # LSEG payload is the file, padded to whole longs.
    assert fs.code[: len(code)] == code and not fs.code[len(code) :].strip(b"\0")
    assert fs.code == code
    big = layout.partitions[2]
    assert big.geometry.fs_block_size == 1024
    assert big.geometry.fs_block_count * 1024 == big.size_bytes


def test_small_hdf_nonconformant_rdb_lists_its_pfs_partition() -> None:
    layout = scan_bytes(shared_image("real/small.hdf").read_bytes())
    assert layout.kind == "rdb" and not layout.errors
    (p,) = layout.partitions
    assert p.drive_name == "DH0" and p.dostype == 0x50465303
    # C/H/S from the PART: cylinders 2..9 of 2 x 32 blocks.
    assert (p.first_lba, p.block_count) == (128, 512)
    fields = {pr.field for pr in layout.problems if pr.severity == "note"}
    assert {"rdb_FileSysHeaderList", "rdb_CylBlocks"} <= fields


@pytest.mark.parametrize(
    ("name", "dostype", "blocks", "drive"),
    [
        ("real/BlankWithoutRDB_OFS.hdf", 0x444F5300, 2048, "DH0"),
        ("real/dos1.adf", 0x444F5301, 1760, "DF0"),
        ("real/dos5.adf", 0x444F5305, 1760, "DF0"),
        ("real/testofs.adf", 0x444F5302, 1760, "DF0"),
    ],
)
def test_bare_volumes_are_one_partition(name: str, dostype: int, blocks: int, drive: str) -> None:
    layout = scan_bytes(shared_image(name).read_bytes())
    assert layout.kind == "bare"
    (p,) = layout.partitions
    assert (p.drive_name, p.dostype, p.first_lba, p.block_count) == (drive, dostype, 0, blocks)
    g = p.geometry
    assert g.reserved == 2 and g.fs_block_count == blocks and g.fs_block_size == 512
    # FFS's root block lies at (reserved + blocks - 1) // 2: block 880 on a DD floppy.
    assert (g.reserved + g.fs_block_count - 1) // 2 == blocks // 2


def test_blank_device_has_nothing() -> None:
    layout = scan_bytes(bytes(512 * 64))
    assert layout.kind == "none" and not layout.partitions
    assert layout.problems and "no RDB" in layout.problems[0].message


async def test_scan_device_equals_scan_bytes() -> None:
    path = shared_image("real/a590_WD93028XA_6parts.hdd.gz")
    dev = FileBlockDevice(str(path), read_only=True)
    try:
        layout = await scan_device(dev)
    finally:
        await dev.aclose()
    assert layout == scan_bytes(path.read_bytes())


class FailingDevice(MemoryBlockDevice):
    """Reads touching ``bad_lba`` fail (with ``single_only``: only reads of it alone, as a
    sector that went bad between the first 16-block read and the chain walk)."""

    def __init__(self, data: bytes, bad_lba: int, *, single_only: bool = False) -> None:
        super().__init__(data=data)
        self.bad_lba = bad_lba
        self.single_only = single_only

    async def read(self, lba: int, count: int) -> bytes:
        if self.single_only and count != 1:
            return await super().read(lba, count)
        if lba <= self.bad_lba < lba + count:
            raise MediumError(f"medium error at block {self.bad_lba}")
        return await super().read(lba, count)


async def test_unreadable_part_block_is_a_problem_not_a_crash() -> None:
    data = shared_image("real/a590_WD93028XA_6parts.hdd.gz").read_bytes()
    part_blocks = [p.part_block for p in scan_bytes(data).partitions]
    victim = part_blocks[2]
    assert victim is not None
    layout = await scan_device(FailingDevice(data, victim, single_only=True))
    assert [p.drive_name for p in layout.partitions] == ["OFS", "OFS INTL"]
    assert any(pr.block == victim and "cannot read" in pr.message for pr in layout.errors)


async def test_unreadable_first_blocks_raise() -> None:
    data = shared_image("real/a590_WD93028XA_6parts.hdd.gz").read_bytes()
    with pytest.raises(MediumError):
        await scan_device(FailingDevice(data, 3))


def test_amitools_short_last_lseg_is_tolerated(tmp_path: Path) -> None:
    """amitools 0.8.1 fsadd of a file that is not whole longs writes a last LSEG whose
    lsb_SummedLongs is rounded down and whose checksum covers the whole block."""
    img = tmp_path / "t.hdf"
    rdbtool(str(img), "create", "size=4Mi", "+", "init", "+", "fill", "name=DH0")
    handler = tmp_path / "fs.bin"
    handler.write_bytes(b"\x00\x00\x03\xf3" + bytes(range(251)) * 3)  # 757 bytes
    rdbtool(str(img), "fsadd", str(handler), "dostype=0x50465303")
    layout = scan_bytes(img.read_bytes())
    (fs,) = layout.filesystems
    assert fs.complete and not layout.errors
    assert any(p.field == "lsb_SummedLongs" for p in layout.problems)
    assert fs.code == handler.read_bytes()[: len(fs.code)] and len(fs.code) == 756
