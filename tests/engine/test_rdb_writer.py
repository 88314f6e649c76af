"""The RDB writer: plans read back by our scanner and by amitools' rdbtool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.errors import UsageError
from amigafuse.rdb.scan import scan_bytes, scan_device
from amigafuse.rdb.writer import (
    HandlerSpec,
    PartitionSpec,
    choose_geometry,
    plan_disk,
    version_from_code,
    write_rdb,
)

RDBTOOL = str(Path(sys.executable).with_name("rdbtool"))
DOS3, DOS5, SFS0, PFS3 = 0x444F5303, 0x444F5305, 0x53465300, 0x50465303
MiB = 1 << 20


def image_of(size: int, plan_blocks: tuple[tuple[int, bytes], ...]) -> bytearray:
    img = bytearray(size)
    for lba, data in plan_blocks:
        img[lba * 512 : lba * 512 + len(data)] = data
    return img


def test_geometry_choice() -> None:
    assert (choose_geometry(64 * MiB).heads, choose_geometry(64 * MiB).sectors) == (2, 32)
    g = choose_geometry(1 << 30)
    assert (g.heads, g.sectors, g.cylinders) == (16, 63, (1 << 30) // (16 * 63 * 512))


async def test_plan_reads_back_with_our_scanner_and_rdbtool(tmp_path: Path) -> None:
    code = b"\x00\x00\x03\xf3" + b"$VER: TestFS 47.11 (1.2.2024)\x00\x00\x00" + bytes(range(256)) * 9
    specs = [
        PartitionSpec("DH0", DOS3, 20 * MiB, boot_pri=5),
        PartitionSpec("DH1", SFS0, 10 * MiB, no_automount=True, sectors_per_block=2),
        PartitionSpec("Work", PFS3, None),
    ]
    plan = plan_disk(64 * MiB, specs, HandlerSpec(PFS3, code, version_from_code(code)))
    dev = MemoryBlockDevice(64 * MiB // 512)
    await write_rdb(dev, plan)
    layout = await scan_device(dev)
    assert layout.kind == "rdb" and not layout.problems
    names = [(p.drive_name, p.dostype, p.bootable, p.no_automount, p.boot_pri) for p in layout.partitions]
    assert names == [("DH0", DOS3, True, False, 5), ("DH1", SFS0, False, True, 0), ("Work", PFS3, False, False, 0)]
    # Sizes: whole cylinders, at least what was asked, contiguous, the last to the end.
    cyl = plan.geometry.cyl_bytes
    p0, p1, p2 = layout.partitions
    assert p0.size_bytes >= 20 * MiB and p0.size_bytes % cyl == 0 and p0.size_bytes - 20 * MiB < cyl
    assert p1.first_byte == p0.first_byte + p0.size_bytes
    assert p2.last_byte + 1 == plan.geometry.cylinders * cyl
    assert p0.first_byte == 2 * cyl  # RDB in cylinders 0..1
    assert p1.geometry.fs_block_size == 1024
    (fs,) = layout.filesystems
    assert fs.code == code and fs.version == "47.11" and fs.ver_string == "TestFS 47.11 (1.2.2024)"
    # amitools reads the same.
    img = tmp_path / "d.hdf"
    img.write_bytes(dev.data)
    ref = json.loads(subprocess.run([RDBTOOL, str(img), "json"], capture_output=True, text=True, check=True).stdout)
    rp = ref["rdb"]["partitions"]
    assert [p["name"] for p in rp] == ["DH0", "DH1", "Work"]
    assert [p["dos_env"]["dos_type"] for p in rp] == [DOS3, SFS0, PFS3]
    assert [p["automount"] for p in rp] == [True, False, True]
    assert [p["dos_env"]["boot_pri"] for p in rp] == [5, 0, 0]
    assert [(p["dos_env"]["low_cyl"], p["dos_env"]["high_cyl"]) for p in rp] == [
        (q.geometry.low_cyl, q.geometry.high_cyl) for q in layout.partitions
    ]
    (rfs,) = ref["rdb"]["filesystems"]
    assert rfs["dostype"] == PFS3 and rfs["version"] == "47.11" and rfs["size"] == len(code)
    # rdbtool fsget gives back the handler byte for byte.
    out = tmp_path / "fs.out"
    subprocess.run([RDBTOOL, str(img), "fsget", "0", str(out)], capture_output=True, check=True)
    assert out.read_bytes() == code


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40 * MiB), min_size=1, max_size=6),
    rest=st.booleans(),
    disk_mib=st.integers(min_value=2, max_value=300),
)
def test_random_plans_fit_or_fail_cleanly(sizes: list[int], rest: bool, disk_mib: int) -> None:
    specs = [PartitionSpec(f"DH{i}", DOS3, s) for i, s in enumerate(sizes)]
    if rest:
        specs.append(PartitionSpec("REST", DOS5, None))
    try:
        plan = plan_disk(disk_mib * MiB, specs)
    except UsageError as exc:
        assert "cylinder" in str(exc) or "too small" in str(exc)
        return
    layout = scan_bytes(image_of(disk_mib * MiB, plan.blocks))
    assert not layout.errors and len(layout.partitions) == len(specs)
    for spec, part in zip(specs, layout.partitions, strict=True):
        if spec.size_bytes is not None:
            assert part.size_bytes >= spec.size_bytes
        assert part.last_byte < disk_mib * MiB and not part.issues


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([PartitionSpec("A", DOS3, None), PartitionSpec("B", DOS3, MiB)], "only be the size of the last"),
        ([PartitionSpec("A", DOS3, MiB), PartitionSpec("a", DOS3, MiB)], "two partitions are called A"),
        ([PartitionSpec("A", DOS3, 100 * MiB)], "only 126 are left"),
        ([PartitionSpec("A:B", DOS3, MiB)], "may not contain"),
        ([PartitionSpec("X" * 32, DOS3, MiB)], "1..31 characters"),
        ([PartitionSpec("A", DOS3, MiB, boot_pri=300)], "-128..127"),
    ],
)
def test_bad_requests_say_what_is_wrong(specs: list[PartitionSpec], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        plan_disk(4 * MiB, specs)


def test_version_from_code() -> None:
    assert version_from_code(b"xx$VER: SmartFilesystem 1.277 (26.3.2006)\0") == (1 << 16) | 277
    assert version_from_code(b"no version here") == 0


async def test_4k_sector_disk_round_trip() -> None:
    """A disk with 4096-byte logical blocks: RDB blocks, pointers and DosEnvec sizes in
    4096-byte units; the scan gives 4096-byte filesystem blocks."""
    from amigafuse.rdb.writer import choose_geometry

    size = 64 * MiB
    geo = choose_geometry(size, block_size=4096)
    code = b"\x00\x00\x03\xf3" + bytes(9000)
    plan = plan_disk(size, [PartitionSpec("DH0", DOS3, 16 * MiB), PartitionSpec("DH1", SFS0, None)],
                     HandlerSpec(SFS0, code), geometry=geo)  # fmt: skip
    dev = MemoryBlockDevice(size // 4096, block_size=4096)
    await write_rdb(dev, plan)
    layout = await scan_device(dev)
    assert not layout.problems and layout.rdb_block_bytes == 4096
    p0, p1 = layout.partitions
    assert p0.geometry.fs_block_size == 4096 and p0.geometry.size_block_bytes == 4096
    assert p0.first_lba == 2 * geo.cyl_blocks and p0.size_bytes >= 16 * MiB
    assert p1.last_byte + 1 == geo.cylinders * geo.cyl_bytes
    assert layout.filesystems[0].code == code
