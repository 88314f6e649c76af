"""`amigafuse list vfio:BDF` in the guest, and the device taken away while in use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scripts.vm.guest import REPO, Controller, Disk, guest_modprobe
from tests.conftest import shared_image

pytestmark = pytest.mark.vm

BDF = "0000:00:04.0"
PY = "$AMIGAFUSE_GUEST_PYTHON"
# Fields that describe the medium and its RDB (not how it is reached).
DISK_KEYS = ("block_size", "block_count", "size_bytes", "layout", "partitions", "rdb")


def test_list_and_unbind_while_in_use(guest) -> None:  # type: ignore[no-untyped-def]
    ffs = shared_image("handler/ffs_dos3_v40.hdf.gz")
    sfs = shared_image("handler/sfs0_v1277.hdf.gz")
    script = guest_modprobe("vfio_pci", "vfio_iommu_type1") + f"""
{PY} -m amigafuse bind-vfio {BDF} >/dev/null || exit 90
echo "== list"; {PY} -m amigafuse list --json vfio:{BDF}; echo "rc=$?"
{PY} tests/vm/guest/hold_and_read.py {BDF} /run/hold.ready > /run/hold.json &
holder=$!
for i in $(seq 300); do [ -e /run/hold.ready ] && break; sleep 0.1; done
sleep 1
echo "== unbind"
timeout 60 sh -c 'echo {BDF} > /sys/bus/pci/drivers/vfio-pci/unbind'; echo "rc=$?"
echo "driver=$(readlink /sys/bus/pci/devices/{BDF}/driver)"
for i in $(seq 100); do [ -s /run/hold.json ] && break; sleep 0.1; done
cat /run/hold.json; kill -0 $holder && echo "holder-alive=1"
touch /run/hold.done
wait
cat /run/hold.json
echo "== reopen"; {PY} tests/vm/guest/driver_roundtrip.py {BDF}; echo "rc=$?"
"""
    res = guest(
        script,
        controllers=[Controller(disks=(Disk(ffs, readonly=True, target=0), Disk(sfs, readonly=True, target=3)))],
    )
    assert res.rc == 0, res.stderr[-3000:]
    steps = {p.split("\n", 1)[0]: p.split("\n", 1)[1].strip() for p in res.stdout.split("== ")[1:]}
    # list: both targets, the same medium description as the file backend on the host.
    listing, rc = steps["list"].rsplit("\n", 1)
    assert rc == "rc=0"
    disks = json.loads(listing)
    assert len(disks) == 2
    for disk, image in zip(disks, (ffs, sfs), strict=True):
        host = subprocess.run(
            [sys.executable, "-m", "amigafuse", "list", "--json", "--backend", "file", str(image)],
            cwd=REPO, capture_output=True, text=True, check=True,
        )
        expected = json.loads(host.stdout)[0]
        assert {k: disk[k] for k in DISK_KEYS} == {k: expected[k] for k in DISK_KEYS}
        assert disk["product"] == "QEMU HARDDISK"
    assert [d["partitions"][0]["dostype"] for d in disks] == ["DOS\\3", "SFS\\0"]
    # The kernel asks for the device back while a reader is busy: the reader gets
    # DeviceGone promptly, releases the device, and the unbind completes (no hang).
    lines = steps["unbind"].splitlines()
    context = f"guest stdout:\n{res.stdout[-3000:]}\nguest stderr:\n{res.stderr[-3000:]}"
    assert len(lines) >= 4, context
    assert lines[0] == "rc=0", context
    assert lines[1] == "driver=", context
    hold = json.loads(lines[2])
    assert hold["error"] == "DeviceGone"
    assert "asked for the device back" in hold["message"]
    # The unbind completed while the holder still had the controller open (idle).
    assert lines[3] == "holder-alive=1"
    final = json.loads(lines[-1])
    assert final["reads"] > 0 and "close_error" not in final
    # Unbound now: opening says how to bind it again.
    reopen = steps["reopen"].splitlines()
    assert reopen[-1] == "rc=3"
    assert json.loads(reopen[0])["error"] == "NotAvailable"
    assert "not bound to any driver" in json.loads(reopen[0])["message"]
