"""The whole driver (PCI -> VirtIO -> SCSI -> disks) over VfioBackend, in the guest.

One controller with four targets: two writable 512-byte disks (one with a blkdebug read
error at LBA 100), a 4K-sector disk, a read-only disk.  What the guest wrote through
VFIO is checked afterwards in the image files on the host.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.vm.guest import Controller, Disk, guest_modprobe

pytestmark = pytest.mark.vm

BDF = "0000:00:04.0"
IMAGE_BYTES = 4 << 20


def _pattern(lba: int, target: int, nbytes: int) -> bytes:
    return bytes((lba * 7 + target * 31 + i) & 0xFF for i in range(nbytes))


def test_driver_round_trips_and_errors_through_vfio(guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images = {}
    for target in (0, 2, 3, 5):
        path = tmp_path / f"t{target}.img"
        path.write_bytes(f"DISK-{target}-MARKER..".encode() + bytes(IMAGE_BYTES - 16))
        images[target] = path
    blkdebug = tmp_path / "blkdebug.cfg"
    blkdebug.write_text(
        '[inject-error]\nevent = "read_aio"\nerrno = "5"\nsector = "100"\nonce = "off"\n\n'
        '[inject-error]\nevent = "write_aio"\nerrno = "5"\nsector = "200"\nonce = "off"\n'
    )
    script = guest_modprobe("vfio_pci", "vfio_iommu_type1") + f"""
$AMIGAFUSE_GUEST_PYTHON -m amigafuse bind-vfio {BDF} >/dev/null || exit 90
$AMIGAFUSE_GUEST_PYTHON tests/vm/guest/driver_roundtrip.py {BDF} --bad-lba 100 --bad-write-lba 200
"""
    res = guest(
        script,
        controllers=[
            Controller(
                disks=(
                    Disk(images[0], target=0, blkdebug=blkdebug),
                    Disk(images[2], target=2),
                    Disk(images[3], target=3, logical_block_size=4096),
                    Disk(images[5], target=5, readonly=True),
                )
            )
        ],
    )
    assert res.rc == 0, res.stdout + res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["transport"] == "vfio-modern"
    disks = {d["target"]: d for d in out["disks"]}
    assert sorted(disks) == [0, 2, 3, 5]
    for target, d in disks.items():
        assert d["product"] == "QEMU HARDDISK"
        assert d["block0"].startswith(f"DISK-{target}-MARKER")
        assert d["block_size"] * d["block_count"] == IMAGE_BYTES
    assert disks[3]["block_size"] == 4096 and disks[0]["block_size"] == 512
    # blkdebug's injected read error arrives as a medium error (EIO) on that disk only,
    # and the disk keeps working after it.
    assert disks[0]["bad_read"] == "MediumError: 5"
    assert disks[2]["bad_read"] == "ok" and disks[3]["bad_read"] == "ok"
    # An injected write error too (werror=report): EIO for that write only.
    assert disks[0]["bad_write"] == "MediumError: 5"
    assert disks[2]["bad_write"] == "ok" and disks[3]["bad_write"] == "ok"
    assert all(d["after_bad"] == d["block_size"] for d in disks.values())
    assert disks[5]["read_only"] is True and disks[5]["write"] == "WriteProtected"
    # Interrupt-driven: completions were harvested, and there was at most one interrupt
    # per request (coalescing may make it fewer).
    stats = out["stats"]
    assert stats["completions"] == stats["requests"] > 0
    assert 0 < stats["interrupts"] <= stats["requests"]
    # What the guest wrote through VFIO is in the image files, at the right places.
    for target in (0, 2, 3):
        d = disks[target]
        assert d["roundtrip"] is True
        bs = d["block_size"]
        data = images[target].read_bytes()
        for lba in d["lbas"]:
            assert data[lba * bs : (lba + 8) * bs] == _pattern(lba, target, bs * 8), (target, lba)
    assert images[5].read_bytes()[512:1024] == bytes(512)


def test_transitional_controller_through_physical_dma(guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """QEMU's transitional virtio-scsi-pci cannot have iommu_platform (QEMU 7.2), so its
    DMA bypasses the IOMMU: the backend gives it a huge-page arena at its physical
    address.  Both transports, and the error when no huge page is free."""
    images = {}
    for target in (0, 1):
        path = tmp_path / f"p{target}.img"
        path.write_bytes(f"DISK-{target}-MARKER..".encode() + bytes(IMAGE_BYTES - 16))
        images[target] = path
    bdf = "0000:00:05.0"
    script = guest_modprobe("vfio_pci", "vfio_iommu_type1") + f"""
$AMIGAFUSE_GUEST_PYTHON -m amigafuse bind-vfio {bdf} >/dev/null || exit 90
echo 0 > /proc/sys/vm/nr_hugepages
$AMIGAFUSE_GUEST_PYTHON tests/vm/guest/driver_roundtrip.py {bdf}
echo 4 > /proc/sys/vm/nr_hugepages
$AMIGAFUSE_GUEST_PYTHON tests/vm/guest/driver_roundtrip.py {bdf} --transport legacy
$AMIGAFUSE_GUEST_PYTHON tests/vm/guest/driver_roundtrip.py {bdf} --transport modern
"""
    res = guest(
        script,
        controllers=[
            Controller(
                disks=(Disk(images[0], target=0), Disk(images[1], target=1)),
                addr="05.0",
                modern=False,
            )
        ],
    )
    assert res.rc == 0, res.stdout + res.stderr
    nohuge, legacy, modern = (json.loads(line) for line in res.stdout.splitlines() if line.startswith("{"))
    assert nohuge["error"] == "NotAvailable"
    assert "huge page" in nohuge["message"] and "nr_hugepages" in nohuge["message"]
    assert legacy["transport"] == "vfio-legacy" and modern["transport"] == "vfio-modern"
    for run in (legacy, modern):
        assert [d["target"] for d in run["disks"]] == [0, 1]
        for d in run["disks"]:
            assert d["block0"].startswith(f"DISK-{d['target']}-MARKER")
            assert d["roundtrip"] is True
        assert run["stats"]["completions"] == run["stats"]["requests"] > 0
    for target in (0, 1):
        data = images[target].read_bytes()
        for lba in legacy["disks"][target]["lbas"]:
            assert data[lba * 512 : (lba + 8) * 512] == _pattern(lba, target, 512 * 8)
