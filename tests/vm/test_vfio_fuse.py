"""amigafuse mount through VFIO and FUSE inside the guest, compared with Linux affs
reading the same handler-written FFS partition there (through the kernel's own
virtio_scsi driver on a second controller holding the same image)."""

from __future__ import annotations

import json
import posixpath

import pytest

from scripts.vm.guest import Controller, Disk, guest_modprobe
from tests.conftest import shared_image

pytestmark = [pytest.mark.vm, pytest.mark.slow]

BDF = "0000:00:04.0"
PY = "$AMIGAFUSE_GUEST_PYTHON"


def _resolved(tree: dict[str, list[object]]) -> dict[str, list[object]]:
    """Soft-link targets as normalised paths from the volume root: Linux affs shows
    ``/x`` for the volume root, amigafuse a path relative to the link."""
    out = {}
    for rel, (kind, size, extra) in tree.items():
        if kind == "link":
            target = str(extra)
            if target.startswith("/"):
                extra = posixpath.normpath(target.lstrip("/"))
            else:
                extra = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
        out[rel] = [kind, size, extra]
    return out


def test_vfio_fuse_mount_matches_linux_affs(guest) -> None:  # type: ignore[no-untyped-def]
    image = shared_image("handler/ffs_dos3_v40.hdf.gz")
    script = guest_modprobe("vfio_pci", "vfio_iommu_type1") + f"""
{PY} -m amigafuse bind-vfio {BDF} >/dev/null || exit 90
""" + guest_modprobe("fuse", "virtio_scsi", "sd_mod", "affs") + f"""
mkdir -p /mnt/af /mnt/li
{PY} -m amigafuse mount -o ro,partition=DH0 vfio:{BDF} /mnt/af || exit 91
for i in $(seq 150); do
  part=$(ls -d /sys/bus/pci/devices/0000:00:05.0/virtio*/host*/target*/*/block/*/*1 2>/dev/null)
  [ -n "$part" ] && break; sleep 0.2
done
mount -t affs -o ro /dev/${{part##*/}} /mnt/li || exit 92
grep -c ' /mnt/af fuse' /proc/mounts
grep -c -F 'vfio-msix[0]({BDF})' /proc/interrupts
{PY} tests/vm/guest/tree_digest.py /mnt/af
{PY} tests/vm/guest/tree_digest.py /mnt/li
umount /mnt/li
{PY} -m amigafuse umount /mnt/af || exit 93
grep -c ' /mnt/af ' /proc/mounts
true
"""
    res = guest(
        script,
        controllers=[
            Controller(disks=(Disk(image, readonly=True),)),
            Controller(disks=(Disk(image, readonly=True),), addr="05.0", modern=False),
        ],
        timeout=600,
    )
    assert res.rc == 0, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "1"  # the FUSE mount was live
    assert lines[1] == "1"  # serving requests on MSI-X vector 0 through VFIO
    assert lines[-1] == "0"  # and is gone after amigafuse umount
    ours, linux = (json.loads(line) for line in lines if line.startswith("{"))
    assert len(ours) > 300  # the handler images hold ~390 objects
    assert _resolved(ours) == _resolved(linux)


def test_vfio_fuse_writes_are_read_back_by_linux_affs(guest, image_copy) -> None:  # type: ignore[no-untyped-def]
    image = image_copy("handler/ffs_dos3_v40.hdf.gz")
    script = guest_modprobe("vfio_pci", "vfio_iommu_type1") + f"""
{PY} -m amigafuse bind-vfio {BDF} >/dev/null || exit 90
""" + guest_modprobe("fuse", "virtio_scsi", "sd_mod", "affs") + f"""
mkdir -p /mnt/af /mnt/li
{PY} -m amigafuse mount -o rw,partition=DH0 vfio:{BDF} /mnt/af || exit 91
head -c 1000003 /dev/urandom > /run/big.bin
mkdir /mnt/af/written && cp /run/big.bin /mnt/af/written/big.bin || exit 92
echo "hello through VFIO" > /mnt/af/written/note.txt
rm /mnt/af/README.txt || exit 93
{PY} -m amigafuse umount /mnt/af || exit 94
for i in $(seq 150); do
  part=$(ls -d /sys/bus/pci/devices/0000:00:05.0/virtio*/host*/target*/*/block/*/*1 2>/dev/null)
  [ -n "$part" ] && break; sleep 0.2
done
mount -t affs -o ro /dev/${{part##*/}} /mnt/li || exit 95
md5sum /run/big.bin /mnt/li/written/big.bin | cut -d' ' -f1
cat /mnt/li/written/note.txt
ls /mnt/li/README.txt 2>&1 | grep -c 'No such file'
umount /mnt/li
"""
    res = guest(
        script,
        controllers=[
            Controller(disks=(Disk(image),)),
            Controller(disks=(Disk(image, readonly=True),), addr="05.0", modern=False),
        ],
        timeout=600,
    )
    assert res.rc == 0, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == lines[1]  # the 1,000,003-byte file reads back identically via affs
    assert lines[2] == "hello through VFIO"
    assert lines[3] == "1"  # the deleted file is gone for affs too


def test_unbinding_under_an_idle_mount_gives_eio_not_a_hang(guest) -> None:  # type: ignore[no-untyped-def]
    image = shared_image("handler/ffs_dos3_v40.hdf.gz")
    script = guest_modprobe("vfio_pci", "vfio_iommu_type1", "fuse") + f"""
{PY} -m amigafuse bind-vfio {BDF} >/dev/null || exit 90
mkdir -p /mnt/af
{PY} -m amigafuse mount -o ro,partition=DH0 vfio:{BDF} /mnt/af || exit 91
head -c 100 /mnt/af/README.txt | wc -c
sleep 1
timeout 60 sh -c 'echo {BDF} > /sys/bus/pci/drivers/vfio-pci/unbind'; echo "unbind rc=$?"
grep -c 'vfio-msix' /proc/interrupts
timeout 60 cat /mnt/af/sizes/size_1000000.bin > /dev/null 2>/run/cat.err; echo "cat rc=$?"
grep -c 'Input/output error' /run/cat.err
timeout 60 {PY} -m amigafuse umount /mnt/af >/dev/null 2>&1; echo "umount rc=$?"
grep -c ' /mnt/af ' /proc/mounts
true
"""
    res = guest(script, controllers=[Controller(disks=(Disk(image, readonly=True),))], timeout=600)
    assert res.rc == 0, res.stdout[-2000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "100"  # the mount worked before
    assert lines[1] == "unbind rc=0"  # the kernel got the device back from a live mount
    assert lines[2] == "0"  # its MSI-X vector released with it
    assert lines[3] == "cat rc=1"  # reading then fails...
    assert lines[4] == "1"  # ...with EIO, promptly (no timeout: rc would be 124)
    assert lines[5] == "umount rc=0"  # umount finishes cleanly (read-only: nothing to flush)
    assert lines[6] == "0"  # and the mount is gone
