"""The FFS engine on disks made by AmigaOS and other tools, and differential tests
against amitools (what we write it reads; what it writes we read)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from amitools.fs.ADFSVolume import ADFSVolume
from amitools.fs.blkdev.BlkDevFactory import BlkDevFactory
from amitools.fs.FSString import FSString

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.file import FileBlockDevice
from amigafuse.errors import CorruptError
from amigafuse.fs.api import Kind, SetAttrs
from amigafuse.fs.ffs import ENGINE, open_volume
from tests.conftest import shared_image
from tests.engine.test_ffs_common import content, partition_device, rdb_partitions, walk

A590 = "real/a590_WD93028XA_6parts.hdd.gz"
A590_TYPES = [0x444F5300, 0x444F5302, 0x444F5304, 0x444F5301, 0x444F5303, 0x444F5305]


def amitools_volume(path: Path, part: str | None = None, read_only: bool = True) -> ADFSVolume:
    options = {"part": part} if part is not None else None
    blkdev = BlkDevFactory().open(str(path), read_only=read_only, options=options)
    vol = ADFSVolume(blkdev)
    vol.open()
    return vol


def floppy_geometry(path: Path, dostype: int = 0x444F5300) -> VolumeGeometry:
    return VolumeGeometry(dostype=dostype, fs_block_count=path.stat().st_size // 512, reserved=2)


async def test_a590_partitions_read_exactly() -> None:
    path = shared_image(A590)
    parts = rdb_partitions(path)
    assert [p.geometry.dostype for p in parts] == A590_TYPES
    for i, part in enumerate(parts):
        vol = await open_volume(partition_device(path, part, True), part.geometry, True)
        found = await walk(vol)
        assert sorted(found) == ["/Trashcan", "/Trashcan.info"]
        assert found["/Trashcan"].kind == Kind.DIR
        info = found["/Trashcan.info"]
        assert info.kind == Kind.FILE and info.size == 1172
        ours = await vol.read(info.object_id, 0, 4096)
        theirs = amitools_volume(path, str(i)).read_file(FSString("Trashcan.info"))
        assert ours == theirs and ours[:2] == b"\xe3\x10"  # WB_DISKMAGIC of a .info file
        report = await ENGINE.check_volume(partition_device(path, part, True), part.geometry, False)
        assert report.errors == [] and report.warnings == []


async def test_a590_partitions_written_stay_clean_and_amitools_reads_them(tmp_path: Path) -> None:
    src = shared_image(A590)
    path = tmp_path / "a590.hdd"
    shutil.copyfile(src, path)
    parts = rdb_partitions(path)
    for i, part in enumerate(parts):
        vol = await open_volume(partition_device(path, part), part.geometry, False)
        d = await vol.mkdir(vol.root_id, "ours")
        for n, size in enumerate([0, 1, 487, 488, 512, 5000, 40000]):
            f = await vol.create(d.object_id, f"f{n}.bin")
            await vol.write(f.object_id, 0, content(f"{i}/{n}", size))
        trash = await vol.lookup(vol.root_id, "Trashcan.info")
        await vol.rename(vol.root_id, "Trashcan.info", d.object_id, "moved.info")
        await vol.setattr(trash.object_id, SetAttrs(comment="moved"))
        await vol.close()
        report = await ENGINE.check_volume(partition_device(path, part), part.geometry, False)
        assert report.errors == [] and report.warnings == [], (part.name, report)
        ami = amitools_volume(path, str(i))
        for n, size in enumerate([0, 1, 487, 488, 512, 5000, 40000]):
            assert ami.read_file(FSString(f"ours/f{n}.bin")) == content(f"{i}/{n}", size)
        assert len(ami.read_file(FSString("ours/moved.info"))) == 1172


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("links.adf", {"/file1": ("file", 2), "/linkfile2": ("file", 2), "/dir1/dir12/dir121/linkfile1": ("file", 2)}),
        ("ffs-file-link.adf", {"/file": ("file", 2), "/link": ("file", 2)}),
        ("ffs-dir-link.adf", {"/dir": ("dir", 2), "/link": ("dir", 2)}),
        ("testffs.adf", {"/slink_dir1": ("softlink", 1), "/hlink_dir1": ("dir", 2), "/hlink_blue": ("file", 2)}),
        ("testofs.adf", {"/MOON.GIF": ("file", 1), "/français": ("file", 1)}),
        ("dos1.adf", {"/test.txt": ("file", 1), "/testdir/test2.txt": ("file", 1)}),
        ("dos2.adf", {"/testdir": ("dir", 1)}),
        ("dos3.adf", {"/testdir": ("dir", 1)}),
        ("dos4.adf", {"/testdir/test2.txt": ("file", 1)}),
        ("dos5.adf", {"/testdir/test2.txt": ("file", 1)}),
        ("BlankWithoutRDB_OFS.hdf", {"/Trashcan": ("dir", 1), "/Trashcan.info": ("file", 1)}),
    ],
)
async def test_floppies_and_links(name: str, expected: dict[str, tuple[str, int]]) -> None:
    path = shared_image(f"real/{name}")
    dev = FileBlockDevice(str(path), read_only=True)
    geo = floppy_geometry(path)
    vol = await open_volume(dev, geo, True)
    found = await walk(vol)
    for p, (kind, nlink) in expected.items():
        assert (found[p].kind.value, found[p].nlink) == (kind, nlink), p
    # hard links are the same object as their target, and read the same
    by_id: dict[int, list[str]] = {}
    for p, s in found.items():
        by_id.setdefault(s.object_id, []).append(p)
    for paths in by_id.values():
        if len(paths) > 1 and found[paths[0]].kind == Kind.FILE:
            datas = {await vol.read(found[p].object_id, 0, 1 << 20) for p in paths}
            assert len(datas) == 1
    report = await ENGINE.check_volume(dev, geo, False)
    assert report.errors == []
    # where amitools can read (no links in the way), it reads what we read
    if name in ("testofs.adf", "dos1.adf", "dos3.adf", "dos5.adf"):
        ami = amitools_volume(path)
        for p, s in found.items():
            if s.kind == Kind.FILE:
                ours = await vol.read(s.object_id, 0, 1 << 20)
                assert ami.read_file(FSString(p[1:])) == ours


async def test_testffs_softlink_and_intl_name() -> None:
    path = shared_image("real/testffs.adf")
    vol = await open_volume(FileBlockDevice(str(path), read_only=True), floppy_geometry(path), True)
    st = await vol.lookup(vol.root_id, "SLINK_DIR1")
    assert st.kind == Kind.SOFTLINK and await vol.readlink(st.object_id) == "dir_1"
    fr = await vol.lookup(vol.root_id, "FRANÇAIS")  # INTL: ç and Ç are one letter
    assert fr.name == "français"


def _amitools_make(path: Path, dostype: int, files: dict[str, bytes], dirs: list[str]) -> None:
    blkdev = BlkDevFactory().create(str(path), force=True)
    vol = ADFSVolume(blkdev)
    vol.create(FSString("AmiTools"), dos_type=dostype)
    for d in dirs:
        vol.create_dir(FSString(d))
    for p, data in files.items():
        vol.write_file(data, FSString(p))
    vol.close()
    blkdev.close()


FILES = {
    "a.txt": b"hello",
    "empty": b"",
    "dir/big.bin": content("big", 150_000),
    "dir/sub/x": content("x", 488 * 3),
    "Mixed Case.dat": content("m", 20_000),
}


@pytest.mark.parametrize("dostype", [0x444F5300 + n for n in range(6)])
async def test_we_read_what_amitools_writes(tmp_path: Path, dostype: int) -> None:
    path = tmp_path / "ami.adf"
    _amitools_make(path, dostype, FILES, ["dir", "dir/sub"])
    dev = FileBlockDevice(str(path), read_only=True)
    geo = floppy_geometry(path)
    vol = await open_volume(dev, geo, True)
    assert vol.info.dostype == dostype and vol.info.label == "AmiTools"
    found = await walk(vol)
    for p, data in FILES.items():
        st = found["/" + p]
        assert st.size == len(data)
        assert await vol.read(st.object_id, 0, 1 << 20) == data
    report = await ENGINE.check_volume(dev, geo, False)
    if dostype in (0x444F5304, 0x444F5305):
        # amitools 0.8.1 writes dircache records that disagree with the headers
        # (BRIEF §7); repair rebuilds them and the volume is then clean
        rw = FileBlockDevice(str(path))
        fixed = await ENGINE.check_volume(rw, geo, True)
        assert fixed.errors == []
        assert (await ENGINE.check_volume(rw, geo, False)).clean
    else:
        assert report.errors == []


@pytest.mark.parametrize("dostype", [0x444F5300 + n for n in range(6)])
async def test_amitools_reads_what_we_write(tmp_path: Path, dostype: int) -> None:
    path = tmp_path / "ours.adf"
    path.write_bytes(bytes(901120))
    dev = FileBlockDevice(str(path))
    geo = floppy_geometry(path, dostype)
    await ENGINE.format_volume(dev, geo, "Ours")
    vol = await open_volume(dev, geo, False)
    d = await vol.mkdir(vol.root_id, "dir")
    sub = await vol.mkdir(d.object_id, "sub")
    parents = {"dir": d.object_id, "dir/sub": sub.object_id, "": vol.root_id}
    for p, data in FILES.items():
        parent, _, name = p.rpartition("/")
        f = await vol.create(parents[parent], name)
        # written in odd pieces, the way FUSE hands them over
        for off in range(0, len(data), 7001):
            await vol.write(f.object_id, off, data[off : off + 7001])
    await vol.close()
    await dev.aclose()
    ami = amitools_volume(path)
    assert ami.get_volume_name() == FSString("Ours")
    for p, data in FILES.items():
        assert ami.read_file(FSString(p)) == data
    names = sorted(n.name.get_name().get_unicode() for n in ami.get_root_dir().get_entries())
    assert names == ["Mixed Case.dat", "a.txt", "dir", "empty"]


@pytest.mark.parametrize("dostype", [0x444F5306, 0x444F5307])
async def test_lnfs_with_amitools_both_ways(tmp_path: Path, dostype: int) -> None:
    long_name = "l" * 60 + ".txt"
    # ours -> amitools
    path = tmp_path / "ours.adf"
    path.write_bytes(bytes(901120))
    dev = FileBlockDevice(str(path))
    geo = floppy_geometry(path, dostype)
    await ENGINE.format_volume(dev, geo, "Long")
    vol = await open_volume(dev, geo, False)
    for name, data in (("short.txt", b"hello"), (long_name, content("long", 3000))):
        f = await vol.create(vol.root_id, name)
        await vol.write(f.object_id, 0, data)
    await vol.close()
    await dev.aclose()
    ami = amitools_volume(path)
    assert ami.read_file(FSString(long_name)) == content("long", 3000)
    names = sorted(n.name.get_name().get_unicode() for n in ami.get_root_dir().get_entries())
    assert names == sorted([long_name, "short.txt"])
    # amitools -> ours: names read right; amitools 0.8.1 also stores each name as the
    # comment (BRIEF §7), which we report as the comment it is on the disk
    path2 = tmp_path / "ami.adf"
    _amitools_make(path2, dostype, {"short.txt": b"hi", long_name: b"long"}, [])
    vol = await open_volume(FileBlockDevice(str(path2), read_only=True), floppy_geometry(path2), True)
    found = await walk(vol)
    st = found["/" + long_name]
    assert st.size == 4 and st.comment and long_name.startswith(st.comment)  # cut to fit
    assert (await ENGINE.check_volume(FileBlockDevice(str(path2), read_only=True), floppy_geometry(path2), False)).clean


async def test_unformatted_partitions_are_refused_clearly() -> None:
    path = shared_image("real/a590_WD93028XA_6parts_not_formatted.hdd.gz")
    parts = rdb_partitions(path)
    assert len(parts) == 6
    for part in parts:
        with pytest.raises(CorruptError, match=r"not an FFS volume|no DOS"):
            await open_volume(partition_device(path, part, True), part.geometry, True)
        report = await ENGINE.check_volume(partition_device(path, part, True), part.geometry, False)
        assert not report.clean and "cannot open the volume" in report.errors[0]
