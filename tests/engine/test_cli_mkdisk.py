"""`amigafuse mkdisk`, `format` and `check` in a subprocess, read back by amitools."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from amigafuse.rdb.scan import scan_bytes
from tests.conftest import REPO

XDFTOOL = str(Path(sys.executable).with_name("xdftool"))
RDBTOOL = str(Path(sys.executable).with_name("rdbtool"))
HAS_QEMU = shutil.which("qemu-system-x86_64") is not None


def amigafuse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amigafuse", *args], capture_output=True, text=True, timeout=180, cwd=REPO
    )


def xdftool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([XDFTOOL, *args], capture_output=True, text=True, timeout=60)


def test_mkdisk_formats_every_partition_and_amitools_reads_them(tmp_path: Path) -> None:
    img = tmp_path / "disk.hdf"
    out = amigafuse(
        "mkdisk", str(img), "--size", "48M", "--backend", "file",
        "--partition", "DH0:FFS+INTL:16M:pri=1", "--partition", "DH1:SFS:16M:noautomount",
        "--partition", "WORK:FFS+DC:rest",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "formatting DH0 as DOS\\3" in out.stdout and out.stdout.rstrip().endswith("done")
    assert img.stat().st_size == 48 << 20
    layout = scan_bytes(img.read_bytes())
    assert [p.drive_name for p in layout.partitions] == ["DH0", "DH1", "WORK"]
    data = img.read_bytes()
    # Each partition now starts with its volume's DosType.
    assert [data[p.first_byte : p.first_byte + 4] for p in layout.partitions] == [b"DOS\x03", b"SFS\x00", b"DOS\x05"]
    # amitools opens the FFS volumes we formatted, with the label we gave.
    for name in ("DH0", "WORK"):
        r = xdftool(str(img), "open", f"part={name}", "+", "info")
        assert r.returncode == 0 and "free:" in r.stdout, r.stdout + r.stderr
    # check: clean, exit 0, for FFS and SFS (a partition named in lower case).
    for name in ("DH0", "dh1", "WORK"):
        r = amigafuse("check", str(img), "--partition", name, "--backend", "file")
        assert r.returncode == 0 and r.stdout.rstrip().endswith("clean"), r.stdout + r.stderr


def test_check_reports_damage_with_exit_1(tmp_path: Path) -> None:
    img = tmp_path / "one.hdf"
    assert amigafuse("mkdisk", str(img), "--size", "8M", "--backend", "file", "--partition", "DH0:FFS:rest").returncode == 0
    (p,) = scan_bytes(img.read_bytes()).partitions
    root = (p.geometry.reserved + p.geometry.fs_block_count - 1) // 2
    raw = bytearray(img.read_bytes())
    off = p.first_byte + root * 512 + 20  # FFS root block: chksum long
    raw[off : off + 4] = struct.pack(">I", struct.unpack(">I", raw[off : off + 4])[0] ^ 0x55)
    img.write_bytes(raw)
    r = amigafuse("check", str(img), "--backend", "file")  # one partition: --partition optional
    assert r.returncode == 1, r.stdout + r.stderr
    assert "NOT clean" in r.stdout or "root" in (r.stdout + r.stderr).lower()


def test_mkdisk_no_format_and_missing_engine(tmp_path: Path) -> None:
    img = tmp_path / "pfs.hdf"
    r = amigafuse("mkdisk", str(img), "--size", "8M", "--partition", "DH0:PFS3:rest")
    assert r.returncode == 2 and "no filesystem engine to format DH0 (PFS\\3" in r.stderr
    assert "--no-format" in r.stderr and not img.exists()
    r = amigafuse("mkdisk", str(img), "--size", "8M", "--partition", "DH0:PFS3:rest", "--no-format")
    assert r.returncode == 0, r.stderr
    ref = json.loads(subprocess.run([RDBTOOL, str(img), "json"], capture_output=True, text=True, check=True).stdout)
    assert ref["rdb"]["partitions"][0]["dos_env"]["dos_type"] == 0x50465303
    # Exists now: refused without --force.
    r = amigafuse("mkdisk", str(img), "--size", "8M", "--partition", "DH0:FFS:rest", "--no-format")
    assert r.returncode == 2 and "--force" in r.stderr


def test_mkdisk_with_handler_and_bad_specs(tmp_path: Path) -> None:
    handler = tmp_path / "L_FastFileSystem"
    handler.write_bytes(b"\x00\x00\x03\xf3" + b"$VER: FastFileSystem 47.4 (1.1.2020)\x00" + bytes(600))
    img = tmp_path / "h.hdf"
    r = amigafuse(
        "mkdisk", str(img), "--size", "16M", "--partition", "DH0:FFS:rest", "--no-format",
        "--handler", str(handler), "--handler-dostype", "DOS1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = amigafuse("list", "--backend", "file", str(img))
    assert "filesystem handler in the RDB: DOS\\1 (FFS) version 47.4" in r.stdout
    assert "$VER: FastFileSystem 47.4 (1.1.2020)" in r.stdout
    assert "handler in the RDB for it: DOS\\1 version 47.4 (FastFileSystem 47.4 (1.1.2020))" in r.stdout
    (unit,) = json.loads(amigafuse("list", "--json", "--backend", "file", str(img)).stdout)
    assert unit["partitions"][0]["rdb_handler"]["version"] == "47.4"
    for bad, msg in [
        ("DH0:FFS", "NAME:TYPE:SIZE"),
        ("DH0:XFS:1M", "unknown filesystem type"),
        ("DH0:FFS:lots", "not a size"),
        ("DH0:FFS:1M:wibble", "unknown option"),
    ]:
        r = amigafuse("mkdisk", str(tmp_path / "x.hdf"), "--size", "8M", "--partition", bad)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)


def test_format_changes_the_volume_and_part_type(tmp_path: Path) -> None:
    img = tmp_path / "f.hdf"
    assert amigafuse("mkdisk", str(img), "--size", "16M", "--backend", "file",
                     "--partition", "A:FFS:8M", "--partition", "B:FFS:rest").returncode == 0  # fmt: skip
    r = amigafuse("format", str(img), "--backend", "file", "--type", "SFS", "--label", "Data")
    assert r.returncode == 2 and "choose one with --partition" in r.stderr
    r = amigafuse("format", str(img), "--backend", "file", "--partition", "B", "--type", "SFS", "--label", "Data")
    assert r.returncode == 0, r.stderr
    layout = scan_bytes(img.read_bytes())
    b = layout.partitions[1]
    assert b.dostype == 0x53465300 and img.read_bytes()[b.first_byte : b.first_byte + 4] == b"SFS\x00"
    assert not layout.problems  # the PART block was re-checksummed
    r = amigafuse("check", str(img), "--backend", "file", "--partition", "B")
    assert r.returncode == 0, r.stdout


def test_write_protected_image_is_not_written_even_by_root(tmp_path: Path) -> None:
    img = tmp_path / "ro.hdf"
    assert amigafuse("mkdisk", str(img), "--size", "8M", "--backend", "file", "--partition", "DH0:FFS:rest").returncode == 0
    before = img.read_bytes()
    os.chmod(img, 0o444)
    r = amigafuse("format", str(img), "--backend", "file", "--type", "SFS", "--label", "x")
    assert r.returncode == 2 and "read-only" in r.stderr
    assert img.read_bytes() == before


@pytest.mark.qemu
@pytest.mark.skipif(not HAS_QEMU, reason="qemu-system-x86_64 not installed")
def test_mkdisk_format_check_through_the_qemu_driver(tmp_path: Path) -> None:
    img = tmp_path / "q.hdf"
    r = amigafuse("mkdisk", str(img), "--size", "16M", "--partition", "DH0:FFS+INTL:8M", "--partition", "DH1:SFS:rest")
    assert r.returncode == 0, r.stderr
    r = amigafuse("check", str(img), "--partition", "DH1")
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    r = xdftool(str(img), "open", "part=DH0", "+", "info")
    assert r.returncode == 0, r.stderr


def test_format_and_check_a_bare_floppy(tmp_path: Path) -> None:
    from tests.conftest import shared_image

    adf = tmp_path / "f.adf"
    adf.write_bytes(shared_image("real/dos1.adf").read_bytes())
    r = amigafuse("format", str(adf), "--backend", "file", "--type", "FFS+INTL", "--label", "Fresh")
    assert r.returncode == 0, r.stderr
    assert adf.read_bytes()[:4] == b"DOS\x03"
    r = xdftool(str(adf), "info")
    assert r.returncode == 0 and "1756" in r.stdout, r.stdout + r.stderr  # 1760 - boot, root, bitmap
    r = amigafuse("check", str(adf))  # through the QEMU driver when available
    if not HAS_QEMU:
        r = amigafuse("check", str(adf), "--backend", "file")
    assert r.returncode == 0 and "checking DF0: DOS\\3" in r.stdout, r.stdout + r.stderr
