"""``amigafuse list`` names a disk that does not come up and lists the others (real QEMU).

* through the CLI (a subprocess, the default QEMU backend): an empty image between two
  RDB disks is shown FAILED with the reason, the two others with their partitions, and
  the exit status is 1;
* on a controller whose targets fail in QEMU itself (an empty removable drive answering
  NOT READY for ever; a blkdebug image whose block 0 cannot be read): the listing names
  them, in target order, and lists the good disk.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amigafuse.commands.list import FailedUnit, Listing, engine_name, list_controller, print_failed
from amigafuse.driver.backends.qtest import QemuDisk, launch_qemu
from amigafuse.driver.controller import open_controller
from amigafuse.rdb.mounter import Mounter
from tests.conftest import REPO, shared_image

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]

RDB_IMAGE = "handler/ffs_dos3_v40.hdf.gz"


def amigafuse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amigafuse", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def test_cli_list_names_the_empty_image_and_lists_the_others(tmp_path: Path) -> None:
    rdb = shared_image(RDB_IMAGE)
    first = _copy(rdb, tmp_path / "first.hdf")
    empty = tmp_path / "empty.hdf"
    empty.touch()
    third = _copy(rdb, tmp_path / "third.hdf")

    out = amigafuse("list", "--json", str(first), str(empty), str(third))
    assert out.returncode == 1, out.stderr
    units = json.loads(out.stdout)
    assert [u["name"] for u in units] == [str(first), str(empty), str(third)]
    assert units[1]["failed"] is True and units[1]["target"] == 1
    assert "smaller than one block" in units[1]["error"]
    for unit in (units[0], units[2]):
        assert "failed" not in unit and unit["layout"] == "rdb" and unit["partitions"]
    assert f"{empty}:" in out.stderr and "smaller than one block" in out.stderr

    text = amigafuse("list", str(first), str(empty), str(third))
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert any(line.startswith(f"{empty}: FAILED [qemu] (SCSI target 1):") for line in lines)
    assert sum(line.startswith((f"{first}:", f"{third}:")) for line in lines) == 2
    # The good disks' partitions are there, as for a listing without the empty image.
    alone = amigafuse("list", "--json", str(first))
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)[0]["partitions"] == units[0]["partitions"]


@pytest.mark.parametrize("transport", ["legacy", "modern"])
async def test_listing_names_targets_that_fail_in_qemu(tmp_path: Path, transport: str) -> None:
    rdb = shared_image(RDB_IMAGE)
    good = _copy(rdb, tmp_path / "good.hdf")
    unreadable = _copy(rdb, tmp_path / "unreadable.hdf")
    disks = [
        QemuDisk("-", no_medium=True),  # target 0: NOT READY 3A/00 for ever
        QemuDisk(good, read_only=True),  # target 1
        QemuDisk(unreadable, read_only=True, blkdebug_errors=[("read_aio", 0, errno.EIO)]),
    ]
    device = "modern" if transport == "modern" else "transitional"
    async with (
        launch_qemu(disks, device=device) as backend,  # type: ignore[arg-type]
        open_controller(backend, transport=transport) as controller,  # type: ignore[arg-type]
    ):
        listing = Listing()
        await list_controller(listing, Mounter(engine_name), controller, "qemu:test", "qemu")
    names = [e.name if isinstance(e, FailedUnit) else e[0].name for e in listing.order]
    assert names == ["qemu:test#0", "qemu:test#1", "qemu:test#2"]
    assert [f.target for f in listing.failed] == [0, 2]
    no_medium, unreadable_block0 = listing.failed
    assert no_medium.error.errno == errno.ENOMEDIUM
    assert "medium not present" in no_medium.error.message
    assert unreadable_block0.error.errno == errno.EIO
    assert "SCSI target 2" in unreadable_block0.error.message
    ((unit, layout, anns),) = listing.units
    assert unit.name == "qemu:test#1" and layout.kind == "rdb" and anns


def test_print_failed_says_what_and_where(capsys: pytest.CaptureFixture[str]) -> None:
    from amigafuse.errors import NoMedium

    print_failed(FailedUnit("qemu:s,m#2", "qemu:s,m", "qemu", 2, NoMedium("no medium")))
    assert capsys.readouterr().out == "qemu:s,m#2: FAILED [qemu] (SCSI target 2): no medium\n"
