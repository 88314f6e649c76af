"""The guest harness itself: outputs, exit status, the vIOMMU and vfio-pci binding."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.vm.guest import (
    Controller,
    Disk,
    _cpio_entry,
    _modinfo,
    extract_vmlinux,
    guest_modprobe,
    resolve_modules,
)

pytestmark = pytest.mark.vm


def test_cpio_newc_record_layout() -> None:
    rec = _cpio_entry("init", 0o100755, b"abc", ino=7)
    assert rec.startswith(b"070701")
    assert len(rec) % 4 == 0
    assert int(rec[6:14], 16) == 7
    assert int(rec[14:22], 16) == 0o100755
    assert int(rec[54:62], 16) == 3  # filesize
    assert int(rec[94:102], 16) == len("init") + 1  # namesize
    assert b"init\0" in rec and rec.rstrip(b"\0").endswith(b"abc")


def test_extract_vmlinux_finds_payload_after_junk() -> None:
    import lzma

    elf = b"\x7fELF" + bytes(range(256)) * 8
    blob = b"MZ junk \x1f\x8b\x08 not gzip" + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"tail"
    assert extract_vmlinux(blob) == elf
    with pytest.raises(Exception, match="no xz/gzip/lzma payload"):
        extract_vmlinux(b"MZ nothing here")


def test_module_dependencies_come_first() -> None:
    order = resolve_modules(["vfio_pci"])
    assert order[-1] == "vfio_pci"
    assert order.index("vfio") < order.index("vfio_pci_core") < order.index("vfio_pci")
    assert "irqbypass" in order
    assert "vfio" in _modinfo(_ko("vfio_pci"))["depends"].split(",")


def _ko(name: str) -> bytes:
    from scripts.vm.guest import _module_index

    return _module_index()[name].read_bytes()


def test_guest_reports_stdout_stderr_and_status(guest) -> None:  # type: ignore[no-untyped-def]
    res = guest("echo out-line; echo err-line >&2; uname -r; exit 7")
    assert res.rc == 7
    assert res.stdout.splitlines()[0] == "out-line"
    assert "amd64" in res.stdout.splitlines()[1]
    assert res.stderr.strip() == "err-line"


def test_guest_python_imports_the_repo(guest) -> None:  # type: ignore[no-untyped-def]
    res = guest(
        "/usr/bin/python3 -c 'import sys, trio, amigafuse; print(sys.executable, trio.__version__)'; "
        "test -w /work/main && echo overlay-writable; "
        "grep -c '^overlay / overlay' /proc/mounts"
    )
    assert res.rc == 0, res.stderr
    lines = res.stdout.split()
    assert lines[0] == "/usr/bin/python3"
    assert "overlay-writable" in res.stdout
    assert lines[-1] == "1"


def test_controllers_bind_to_vfio_pci_behind_the_iommu(guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * (1 << 20))
    script = guest_modprobe("vfio_pci", "vfio_iommu_type1") + r"""
for bdf in 0000:00:04.0 0000:00:05.0; do
  d=/sys/bus/pci/devices/$bdf
  echo "$bdf $(cat $d/device) $(basename $(readlink $d/driver))"
  echo $bdf > $d/driver/unbind
  echo vfio-pci > $d/driver_override
  echo $bdf > /sys/bus/pci/drivers_probe
  echo "$bdf $(basename $(readlink $d/driver)) group=$(basename $(readlink $d/iommu_group))"
done
ls /dev/vfio
"""
    res = guest(
        script,
        controllers=[
            Controller(disks=(Disk(img),), addr="04.0", modern=True),
            Controller(disks=(Disk(img, readonly=True),), addr="05.0", modern=False),
        ],
    )
    assert res.rc == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "0000:00:04.0 0x1048 virtio-pci"
    assert lines[1].startswith("0000:00:04.0 vfio-pci group=")
    assert lines[2] == "0000:00:05.0 0x1004 virtio-pci"
    assert lines[3].startswith("0000:00:05.0 vfio-pci group=")
    groups = {lines[1].split("group=")[1], lines[3].split("group=")[1]}
    assert len(groups) == 2  # each controller has its own IOMMU group
    assert set(res.stdout.split()[-3:]) >= {"vfio", *groups}


def test_guest_timeout_kills_qemu_and_says_so(guest) -> None:  # type: ignore[no-untyped-def]
    import os

    from scripts.vm.guest import GuestError

    with pytest.raises(GuestError, match="did not finish within 8 s") as info:
        guest("echo started; sleep 600", timeout=8)
    pid = info.value.qemu_pid
    assert pid is not None
    with pytest.raises(ProcessLookupError):  # killed and reaped: no QEMU left behind
        os.kill(pid, 0)
