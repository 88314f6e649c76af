"""`amigafuse list` in a subprocess: file backend and the real QEMU driver."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, shared_image

RDBTOOL = str(Path(sys.executable).with_name("rdbtool"))


def amigafuse(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amigafuse", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def list_json(*args: str) -> list[dict[str, Any]]:
    out = amigafuse("list", "--json", *args)
    assert out.returncode == 0, out.stderr
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


def test_list_a590_matches_rdbtool() -> None:
    path = shared_image("real/a590_WD93028XA_6parts.hdd.gz")
    (unit,) = list_json("--backend", "file", str(path))
    ref = json.loads(subprocess.run([RDBTOOL, str(path), "json"], capture_output=True, text=True, check=True).stdout)
    assert unit["layout"] == "rdb" and unit["size_bytes"] == 21_620_736
    assert unit["rdb"]["cylinders"] == 782 and unit["rdb"]["heads"] == 2 and unit["rdb"]["sectors"] == 27
    parts = unit["partitions"]
    assert [p["dos_name"] for p in parts] == [p["name"] for p in ref["rdb"]["partitions"]]
    assert [p["dostype_hex"] for p in parts] == [f"{p['dos_env']['dos_type']:#010x}" for p in ref["rdb"]["partitions"]]
    assert [p["bootable"] for p in parts] == [p["bootable"] for p in ref["rdb"]["partitions"]]
    for ours, theirs in zip(parts, ref["rdb"]["partitions"], strict=True):
        env = theirs["dos_env"]
        cyl = env["surfaces"] * env["blk_per_trk"] * 512
        assert ours["size_bytes"] == (env["high_cyl"] - env["low_cyl"] + 1) * cyl
        assert ours["first_byte"] == env["low_cyl"] * cyl
        # The volume in each partition says the same DosType as the PART.
        assert ours["volume_dostype"] == ours["dostype"]
        assert ours["no_automount"] is False


def test_list_unformatted_a590_says_why_not_mountable() -> None:
    path = shared_image("real/a590_WD93028XA_6parts_not_formatted.hdd.gz")
    (unit,) = list_json("--backend", "file", str(path))
    assert len(unit["partitions"]) == 6
    # The first partition keeps a DOS\0 boot block (but no root block: the engine will
    # refuse it); the other five are all zeros.
    first, *rest = unit["partitions"]
    assert first["volume_dostype"] == "DOS\\0"
    data = path.read_bytes()
    assert data[first["first_byte"] : first["first_byte"] + 4] == b"DOS\0"
    for p in rest:
        assert data[p["first_byte"] : p["first_byte"] + 512] == bytes(512)
        assert not p["mountable"] and "no filesystem" in p["reason"]


def test_list_small_hdf_pfs_is_announced_not_mountable() -> None:
    (unit,) = list_json("--backend", "file", str(shared_image("real/small.hdf")))
    (p,) = unit["partitions"]
    assert p["dos_name"] == "DH0" and p["dostype"] == "PFS\\3"
    assert p["mountable"] is False and p["engine"] is None and "no engine" in p["reason"]
    assert any(pr["field"] == "rdb_FileSysHeaderList" for pr in unit["problems"])


def test_list_text_and_bare_volumes() -> None:
    out = amigafuse(
        "list", "--backend", "file",
        str(shared_image("real/BlankWithoutRDB_OFS.hdf")), str(shared_image("real/dos1.adf")),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "no RDB: one volume from block 0" in out.stdout
    lines = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("  D")]
    # Two bare units: DH0 (hardfile) and DF0 (floppy).
    assert [ln[0] for ln in lines if ln[0] != "DOS"] == ["DH0", "DF0"]


def test_list_errors_are_one_clear_line(tmp_path: Path) -> None:
    out = amigafuse("list", "--backend", "file", str(tmp_path / "missing.hdf"))
    assert out.returncode == 2
    assert "missing.hdf: no such image file" in out.stderr and "Traceback" not in out.stderr
    out = amigafuse("list", "--backend", "file", "qemu:/x")
    assert out.returncode == 2 and "qemu:SOCKET,SHM" in out.stderr


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed")
def test_list_through_the_qemu_driver_matches_file_backend() -> None:
    a590 = str(shared_image("real/a590_WD93028XA_6parts.hdd.gz"))
    small = str(shared_image("real/small.hdf"))
    via_qemu = list_json(a590, small)  # default backend: QEMU + amigafuse's driver
    via_file = list_json("--backend", "file", a590, small)
    assert [u["backend"] for u in via_qemu] == ["qemu", "qemu"]
    assert via_qemu[0]["vendor"] == "QEMU"
    for q, f in zip(via_qemu, via_file, strict=True):
        assert q["partitions"] == f["partitions"]
        assert q["block_count"] == f["block_count"] and q["problems"] == f["problems"]


@pytest.mark.qemu
def test_list_attaches_to_a_running_qemu(user_qemu) -> None:  # type: ignore[no-untyped-def]
    """`list qemu:SOCKET,SHM` drives the controller of a QEMU the user started."""
    qemu = user_qemu(shared_image("real/a590_WD93028XA_6parts.hdd.gz"), read_only=True)
    (unit,) = list_json(qemu.source)
    assert unit["name"].startswith("qemu:") and unit["vendor"] == "QEMU"
    assert [p["dos_name"] for p in unit["partitions"]] == [
        "OFS", "OFS INTL", "OFS DirCache", "FFS", "FFS INTL", "FFS DirCache"
    ]  # fmt: skip
    assert qemu.running()  # detaching leaves the user's QEMU running


def test_list_hostile_rdb_reports_and_exits_cleanly(tmp_path: Path) -> None:
    from dataclasses import replace

    from amigafuse.rdb.blocks import PartitionBlock
    from amigafuse.rdb.writer import PartitionSpec, plan_disk

    plan = plan_disk(4 << 20, [PartitionSpec("DH0", 0x444F5303, 1 << 20), PartitionSpec("DH1", 0x444F5303, None)])
    img = bytearray(4 << 20)
    for lba, data in plan.blocks:
        img[lba * 512 : lba * 512 + 512] = data
    part = PartitionBlock.unpack(bytes(img[1024:1536]))  # DH1's PART at block 2
    img[1024:1536] = replace(part, pb_Next=1).seal().pack()  # ... points back to DH0
    path = tmp_path / "loop.hdf"
    path.write_bytes(img)
    for backend in ("file", "qemu") if shutil.which("qemu-system-x86_64") else ("file",):
        out = amigafuse("list", "--backend", backend, str(path))
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert "error: pb_Next points back to block 1: the partition list loops" in out.stdout
        assert "no: no filesystem" in out.stdout  # unformatted partitions are not mountable
