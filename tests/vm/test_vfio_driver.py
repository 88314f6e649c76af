"""The whole driver (PCI -> VirtIO -> SCSI -> disks) over VfioBackend, in the guest.

One controller with four targets: two writable 512-byte disks (one with a blkdebug read
error at LBA 100), a 4K-sector disk, a read-only disk.  What the guest wrote through
VFIO is checked afterwards in the image files on the host.

Interrupts: MSI-X (vector 0, no ISR read) wherever the function has it, on both
transports; INTx when forced (``--interrupts intx``) or when the controller has no MSI-X
capability (QEMU ``vectors=0``).  Each run reports the mode it used.
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
$AMIGAFUSE_GUEST_PYTHON tests/vm/guest/driver_roundtrip.py {BDF} --interrupts intx
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
    out, intx = (json.loads(line) for line in res.stdout.splitlines() if line.startswith("{"))
    assert out["transport"] == "vfio-modern"
    assert out["interrupt_mode"] == "msix" and out["msix_note"] is None
    assert out["config_stable"] is True
    # Forced INTx: the same controller, the same round trips, the ISR read per interrupt.
    assert intx["interrupt_mode"] == "intx" and "interrupts=intx" in intx["msix_note"]
    assert intx["config_stable"] is True
    assert all(d["roundtrip"] for d in intx["disks"] if not d["read_only"])
    assert 0 < intx["stats"]["interrupts"] <= intx["stats"]["requests"]
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
    address.  Both transports with MSI-X (legacy: the device config moves to 0x18), the
    legacy one with forced INTx, and the error when no huge page is free."""
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
$AMIGAFUSE_GUEST_PYTHON tests/vm/guest/driver_roundtrip.py {bdf} --transport legacy --interrupts intx
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
    nohuge, legacy, modern, legacy_intx = (
        json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")
    )
    assert nohuge["error"] == "NotAvailable"
    assert "huge page" in nohuge["message"] and "nr_hugepages" in nohuge["message"]
    assert legacy["transport"] == "vfio-legacy" and modern["transport"] == "vfio-modern"
    assert legacy_intx["transport"] == "vfio-legacy"
    assert legacy["interrupt_mode"] == modern["interrupt_mode"] == "msix"
    assert legacy_intx["interrupt_mode"] == "intx"
    for run in (legacy, modern, legacy_intx):
        assert run["config_stable"] is True
        assert [d["target"] for d in run["disks"]] == [0, 1]
        for d in run["disks"]:
            assert d["block0"].startswith(f"DISK-{d['target']}-MARKER")
            assert d["roundtrip"] is True
        assert run["stats"]["completions"] == run["stats"]["requests"] > 0
    for target in (0, 1):
        data = images[target].read_bytes()
        for lba in legacy["disks"][target]["lbas"]:
            assert data[lba * 512 : (lba + 8) * 512] == _pattern(lba, target, 512 * 8)


def test_controller_without_msix_falls_back_to_intx(guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A controller without an MSI-X capability (QEMU ``vectors=0``): "auto" uses INTx
    and says why; "msix" demanded is a clear error."""
    image = tmp_path / "n.img"
    image.write_bytes(b"DISK-0-MARKER..." + bytes(IMAGE_BYTES - 16))
    script = guest_modprobe("vfio_pci", "vfio_iommu_type1") + f"""
$AMIGAFUSE_GUEST_PYTHON -m amigafuse bind-vfio {BDF} >/dev/null || exit 90
$AMIGAFUSE_GUEST_PYTHON tests/vm/guest/driver_roundtrip.py {BDF}
$AMIGAFUSE_GUEST_PYTHON tests/vm/guest/driver_roundtrip.py {BDF} --interrupts msix
"""
    res = guest(script, controllers=[Controller(disks=(Disk(image),), msix_vectors=0)])
    auto, demanded = (json.loads(line) for line in res.stdout.splitlines() if line.startswith("{"))
    assert auto["interrupt_mode"] == "intx"
    assert auto["msix_note"] == "the function has no MSI-X capability"
    assert auto["disks"][0]["roundtrip"] is True
    assert auto["stats"]["completions"] == auto["stats"]["requests"] > 0
    assert demanded["error"] == "NotAvailable"
    assert "no MSI-X" in demanded["message"] and "interrupts=auto" in demanded["message"]
    data = image.read_bytes()
    for lba in auto["disks"][0]["lbas"]:
        assert data[lba * 512 : (lba + 8) * 512] == _pattern(lba, 0, 512 * 8)
