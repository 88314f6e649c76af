"""VfioBackend and bind-vfio/unbind-vfio for real, in the Linux guest (vIOMMU + vfio-pci).

tests/vm/guest/backend_probe.py drives the controller through VfioBackend alone (config
space, BARs, a hand-made request queue: INQUIRY and READ(10) by DMA through the IOMMU at
the arena's IOVA, INTx through the eventfd with unmask), independent of the VirtIO layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.vm.guest import Controller, Disk, guest_modprobe

pytestmark = pytest.mark.vm

BDF = "0000:00:04.0"
PY = "$AMIGAFUSE_GUEST_PYTHON"


def _prep() -> str:
    return guest_modprobe("vfio_pci", "vfio_iommu_type1") + "\n"


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_backend_probe_bind_and_unbind(guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = tmp_path / "disk.img"
    img.write_bytes(b"AMIGAFUSE-VFIO-0" + bytes((1 << 20) - 16))
    script = _prep() + f"""
{PY} tests/vm/guest/backend_probe.py {BDF}; echo "probe-unbound rc=$?"
{PY} -m amigafuse bind-vfio {BDF}; echo "bind rc=$?"
readlink /sys/bus/pci/devices/{BDF}/driver
{PY} tests/vm/guest/backend_probe.py {BDF}; echo "probe rc=$?"
{PY} tests/vm/guest/backend_probe.py {BDF} --no-mmap; echo "probe rc=$?"
{PY} -m amigafuse bind-vfio {BDF}; echo "bind-again rc=$?"
{PY} -m amigafuse unbind-vfio {BDF}; echo "unbind rc=$?"
readlink /sys/bus/pci/devices/{BDF}/driver
cat /sys/bus/pci/devices/{BDF}/driver_override
"""
    res = guest(script, controllers=[Controller(disks=(Disk(img),))])
    assert res.rc == 0, res.stderr
    out = res.stdout
    unbound, mapped, syscalls = _json_lines(out)
    # Not bound to vfio-pci: a clear error that prints the bind commands.
    assert unbound["error"] == "NotAvailable"
    assert "bound to virtio-pci, not vfio-pci" in str(unbound["message"])
    assert f"amigafuse bind-vfio {BDF}" in str(unbound["message"])
    assert "probe-unbound rc=3" in out
    assert "bind rc=0" in out and "bind-again rc=0" in out and "unbind rc=0" in out
    assert f"{BDF}: bound to vfio-pci, IOMMU group" in out
    lines = out.splitlines()
    drivers = [line.rsplit("/", 1)[-1] for line in lines if "/drivers/" in line]
    assert drivers == ["vfio-pci", "virtio-pci"]
    assert lines[-1] == "(null)"  # driver_override cleared
    # The probe itself, with BARs mmap'ed and with pread/pwrite.
    assert out.count("probe rc=0") == 2
    assert mapped["bars"] == {"1": ["memory", 4096, "_MappedBar"], "4": ["memory", 16384, "_MappedBar"]}
    assert syscalls["bars"] == {"1": ["memory", 4096, "_VfioBar"], "4": ["memory", 16384, "_VfioBar"]}
    for probe in (mapped, syscalls):
        _check_probe(probe)


def _check_probe(probe: dict[str, object]) -> None:
    assert probe["vendor"] == 0x1AF4 and probe["device"] == 0x1048
    assert probe["other_devfn_vendor"] == 0xFFFF
    assert probe["config_block_matches"] is True
    assert int(probe["command"]) & 0b111 == 0b111  # type: ignore[call-overload]  # IO, memory, bus master
    assert probe["access_platform"] is True
    assert probe["status_after_reset"] == 0 and probe["status_ack"] == 1
    assert probe["arena"] == [1 << 20, 0x1000_0000, "abcd"]
    # MSI-X on, then the fallback to INTx (the path taken when the device refuses the
    # vector): the backend says why, and every command below raised INTx.
    assert probe["msix_enabled"] is True and probe["mode_msix"] == "msix"
    assert probe["mode_after_fallback"] == "intx"
    assert probe["msix_note"] == "the device refused MSI-X vector 0 for its queue"
    assert probe["spurious_interrupt"] is False
    assert probe["features_ok"] is True
    assert probe["inquiry"] == [0, 0, "QEMU"]
    assert probe["read0"] == [0, 0, "AMIGAFUSE-VFIO-0"]
    # One interrupt per command (the first READ meets UNIT ATTENTION and is retried).
    assert probe["interrupts"] == probe["commands"] and int(probe["commands"]) >= 2  # type: ignore[call-overload]
    assert all(int(b) & 1 for b in probe["isr_bits"])  # type: ignore[attr-defined]
    assert probe["dead_while_open"] is False
    assert probe["dead_after_close"] is True
    assert probe["after_close_error"] == "DeviceGone"

def test_open_errors_say_what_to_do(guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    opener = (
        f"{PY} -c 'import sys, trio; from amigafuse.driver.backends.vfio import open_vfio_backend as o\n"
        "async def m(b):\n"
        "    async with o(b, arena_bytes=1 << 20): pass\n"
        "try:\n"
        "    trio.run(m, sys.argv[1]); print(\"opened\")\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, \"|\", str(e).replace(chr(10), \" \"))' "
    )
    holder = (
        f"{PY} -c 'import sys, trio, pathlib; from amigafuse.driver.backends.vfio import open_vfio_backend as o\n"
        "async def m(b):\n"
        "    async with o(b, arena_bytes=1 << 20):\n"
        "        pathlib.Path(\"/run/held\").touch()\n"
        "        with trio.move_on_after(120):\n"
        "            while not pathlib.Path(\"/run/done\").exists(): await trio.sleep(0.05)\n"
        "trio.run(m, sys.argv[1])' "
    )
    checker = (
        f"{PY} -c 'import sys, trio; from amigafuse.driver.backends import vfio\n"
        "async def m(b, t):\n"
        "    async with vfio.open_vfio_backend(b, arena_bytes=1 << 20, dma=\"iommu\") as be:\n"
        "        await vfio.check_access_platform(be, t)\n"
        "try:\n"
        "    trio.run(m, *sys.argv[1:]); print(\"ok\")\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, \"|\", str(e).replace(chr(10), \" \"))' "
    )
    script = _prep() + guest_modprobe("ahci") + f"""
echo "== missing"; {opener} 0000:00:09.0
{PY} -m amigafuse bind-vfio {BDF} >/dev/null
echo "== open"; {opener} {BDF}
{holder} {BDF} &
while [ ! -e /run/held ]; do sleep 0.1; done
echo "== twice"; {opener} {BDF}
touch /run/done
wait
{PY} -m amigafuse bind-vfio 0000:00:1f.3 >/dev/null
echo "== viable"; {opener} 0000:00:1f.3
chmod 600 /dev/vfio/vfio
echo "== perm"; setpriv --reuid=65534 --regid=65534 --clear-groups {opener} {BDF}
echo "== bdf"; {PY} -m amigafuse bind-vfio 1f.9; echo "rc=$?"
{PY} -m amigafuse bind-vfio 0000:00:05.0 >/dev/null
echo "== transitional"; {checker} 0000:00:05.0 auto
echo "== legacy"; {checker} {BDF} legacy
echo "== modern"; {checker} {BDF} auto
echo 4 > /proc/sys/vm/nr_hugepages
echo "== iobar"; {PY} tests/vm/guest/io_bar_probe.py 0000:00:05.0
chmod 666 /dev/vfio/vfio
echo "== user"; {PY} -m amigafuse bind-vfio --user nobody {BDF}; stat -c %U /dev/vfio/$(basename $(readlink /sys/bus/pci/devices/{BDF}/iommu_group))
echo "== memlock"; (ulimit -l 64; setpriv --reuid=65534 --regid=65534 --clear-groups {opener} {BDF})
echo "== nonroot"; (ulimit -l unlimited; setpriv --reuid=65534 --regid=65534 --clear-groups {opener} {BDF})
"""
    res = guest(
        script,
        controllers=[
            Controller(disks=(Disk(img),)),
            Controller(disks=(Disk(img, readonly=True),), addr="05.0", modern=False),
        ],
    )
    assert res.rc == 0, res.stderr
    steps = {
        part.split("\n", 1)[0]: part.split("\n", 1)[1].strip()
        for part in res.stdout.split("== ")[1:]
    }
    assert steps["missing"] == "UsageError | no PCI device 0000:00:09.0 (see lspci -D)"
    assert steps["open"] == "opened"
    # A second process while the first holds the device: the group is exclusive.
    assert steps["twice"].startswith("NotAvailable | /dev/vfio/")
    assert "in use by another process" in steps["twice"]
    assert steps["viable"].startswith("NotAvailable | IOMMU group")
    assert "not viable" in steps["viable"] and "0000:00:1f.2" in steps["viable"]
    assert steps["perm"].startswith("NotAvailable | no permission to open /dev/vfio/vfio: run as root")
    assert steps["bdf"] == "rc=2"
    assert "is not a PCI address" in res.stderr
    # Devices that would bypass the IOMMU are refused before any DMA is set up.
    assert steps["transitional"].startswith("NotAvailable | PCI device 0000:00:05.0 does not offer VIRTIO_F_ACCESS_PLATFORM")
    assert "iommu_platform=on" in steps["transitional"]
    assert steps["legacy"].startswith("NotAvailable | the legacy VirtIO transport cannot be used through VFIO")
    assert steps["modern"] == "ok"
    # I/O-port BARs work through the region (pread/pwrite): the legacy register block.
    iobar = json.loads(steps["iobar"])
    assert iobar["kind"] == "io" and iobar["region"] == "_VfioBar" and iobar["size"] >= 0x14
    assert iobar["queue_sizes"][:3] == [256, 256, 256] and iobar["queue_sizes"][3] == 0  # QEMU 7.2 virtqueue_size
    assert iobar["status_ack"] == 1
    assert iobar["features"] & (1 << 28)  # VIRTIO_RING_F_INDIRECT_DESC offered
    # --user hands the group to a user, who can then drive the device without root,
    # given a locked-memory limit that covers the DMA arena.
    assert steps["user"].splitlines()[-1] == "nobody"
    assert steps["memlock"].startswith("NotAvailable | cannot map the 1048576-byte DMA arena")
    assert "ulimit -l" in steps["memlock"]
    assert steps["nonroot"] == "opened"
