"""``amigafuse bind-vfio BDF`` / ``amigafuse unbind-vfio BDF``: hand a PCI device to
vfio-pci (so ``vfio:BDF`` sources can drive it) and give it back.

Binding uses ``driver_override``: unbind the current driver, set the override to
``vfio-pci``, ask the kernel to probe again.  Unbinding clears the override and probes
again, so the device's usual driver (virtio-pci) takes it back.  Both need root.
Refuses to take a controller whose disks are mounted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Any

from amigafuse.errors import Busy, NotAvailable, UsageError


def parse_bdf(text: str) -> str:
    """See :func:`amigafuse.driver.backends.vfio.parse_bdf` (imported lazily: the CLI
    lists this command without importing the driver)."""
    from amigafuse.driver.backends.vfio import parse_bdf as parse

    return parse(text)

SYSFS = Path("/sys")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bind-vfio",
        help="hand a PCI virtio-scsi controller to vfio-pci (for vfio:BDF sources; needs root)",
        description=(
            "Unbind the PCI device BDF from its driver and bind it to vfio-pci through "
            "driver_override, loading vfio-pci if needed, so amigafuse can drive it as "
            "vfio:BDF. Refuses when one of its disks is mounted. Needs root and an IOMMU."
        ),
    )
    p.add_argument("bdf", metavar="BDF", help="PCI address, e.g. 0000:00:04.0 (lspci -D)")
    p.add_argument(
        "--user",
        metavar="USER",
        help="also give USER the device's /dev/vfio/GROUP (to run amigafuse without root)",
    )
    p.set_defaults(handler=run_bind)
    q: argparse.ArgumentParser = sub.add_parser(
        "unbind-vfio",
        help="give a PCI device bound with bind-vfio back to its usual driver (needs root)",
        description=(
            "Unbind BDF from vfio-pci, clear its driver_override and let the kernel probe "
            "it again, so its usual driver (virtio-pci) takes it back."
        ),
    )
    q.add_argument("bdf", metavar="BDF", help="PCI address, e.g. 0000:00:04.0")
    q.set_defaults(handler=run_unbind)


# --------------------------------------------------------------------------- sysfs helpers


def device_dir(bdf: str, sysfs: Path = SYSFS) -> Path:
    """The sysfs directory of ``bdf``; UsageError if there is no such device."""
    path = sysfs / "bus" / "pci" / "devices" / bdf
    if not path.exists():
        raise UsageError(f"there is no PCI device {bdf} (list them with lspci -D)")
    return path


def current_driver(dev: Path) -> str | None:
    link = dev / "driver"
    return link.resolve().name if link.exists() else None


def iommu_group(dev: Path) -> str | None:
    link = dev / "iommu_group"
    return link.resolve().name if link.exists() else None


def group_members(dev: Path) -> list[str]:
    link = dev / "iommu_group"
    if not link.exists():
        return []
    return sorted(p.name for p in (link.resolve() / "devices").iterdir())


def block_devices_under(dev: Path) -> list[str]:
    """Names of the block devices (sda, sdb1...) the kernel created below ``dev``."""
    names: set[str] = set()
    for block_dir in dev.rglob("block"):
        if block_dir.is_dir():
            for disk in block_dir.iterdir():
                names.add(disk.name)
                names.update(p.name for p in disk.iterdir() if p.name.startswith(disk.name))
    return sorted(names)


def mounted_among(names: list[str], mounts_text: str) -> list[str]:
    """Which of the block device ``names`` appear as a mount source in /proc/mounts text."""
    wanted = {f"/dev/{n}" for n in names}
    found = []
    for line in mounts_text.splitlines():
        fields = line.split()
        if fields and fields[0] in wanted:
            found.append(f"{fields[0]} on {fields[1]}")
    return found


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except PermissionError:
        raise NotAvailable(f"no permission to write {path}: run this as root") from None
    except OSError as exc:
        raise NotAvailable(f"writing {text.strip()!r} to {path} failed: {exc.strerror}") from None


def ensure_vfio_pci_loaded(sysfs: Path = SYSFS) -> None:
    """Load vfio-pci with modprobe unless its sysfs driver directory exists."""
    if (sysfs / "bus" / "pci" / "drivers" / "vfio-pci").exists():
        return
    modprobe = shutil.which("modprobe") or "/sbin/modprobe"
    if not os.path.exists(modprobe):
        raise NotAvailable("vfio-pci is not loaded and modprobe is missing: load the vfio-pci module")
    proc = subprocess.run([modprobe, "vfio-pci"], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (sysfs / "bus" / "pci" / "drivers" / "vfio-pci").exists():
        raise NotAvailable(
            f"loading vfio-pci failed ({proc.stderr.strip() or 'modprobe vfio-pci'}): this kernel "
            "needs CONFIG_VFIO_PCI"
        )


# --------------------------------------------------------------------------- commands


def bind(bdf: str, *, sysfs: Path = SYSFS, mounts_text: str | None = None) -> str:
    """Bind ``bdf`` to vfio-pci; return the IOMMU group.  Raises UsageError, Busy,
    NotAvailable (each saying what to do)."""
    bdf = parse_bdf(bdf)
    dev = device_dir(bdf, sysfs)
    group = iommu_group(dev)
    if group is None:
        raise NotAvailable(
            f"{bdf} is in no IOMMU group: enable the IOMMU (boot with intel_iommu=on or "
            "amd_iommu=on; a QEMU guest also needs -device intel-iommu)"
        )
    driver = current_driver(dev)
    if driver != "vfio-pci":
        if mounts_text is None:
            mounts_text = Path("/proc/mounts").read_text()
        busy = mounted_among(block_devices_under(dev), mounts_text)
        if busy:
            raise Busy(
                f"{bdf} serves mounted disks ({'; '.join(busy)}): unmount them before "
                "handing the controller to vfio-pci"
            )
        ensure_vfio_pci_loaded(sysfs)
        _write(dev / "driver_override", "vfio-pci\n")
        if driver is not None:
            _write(dev / "driver" / "unbind", bdf + "\n")
        _write(sysfs / "bus" / "pci" / "drivers_probe", bdf + "\n")
        if current_driver(dev) != "vfio-pci":
            raise NotAvailable(
                f"{bdf} did not bind to vfio-pci (it is now bound to "
                f"{current_driver(dev) or 'nothing'}); see dmesg"
            )
    return group


def unbind(bdf: str, *, sysfs: Path = SYSFS) -> str | None:
    """Give ``bdf`` back to its usual driver; return the driver it has now (or None)."""
    bdf = parse_bdf(bdf)
    dev = device_dir(bdf, sysfs)
    if current_driver(dev) == "vfio-pci":
        _write(dev / "driver" / "unbind", bdf + "\n")
    with contextlib.suppress(FileNotFoundError):
        if (dev / "driver_override").read_text().strip() not in ("", "(null)"):
            _write(dev / "driver_override", "\n")
    if current_driver(dev) is None:
        _write(sysfs / "bus" / "pci" / "drivers_probe", bdf + "\n")
    return current_driver(dev)


def run_bind(args: argparse.Namespace) -> int:
    bdf = parse_bdf(args.bdf)
    group = bind(bdf)
    dev = device_dir(bdf)
    print(f"{bdf}: bound to vfio-pci, IOMMU group {group} (/dev/vfio/{group})")
    others = [m for m in group_members(dev) if m != bdf]
    not_ready = [m for m in others if current_driver(device_dir(m)) not in (None, "vfio-pci")]
    if not_ready:
        print(
            f"note: the group also holds {', '.join(not_ready)}, still bound to other drivers; "
            "the group is usable only once they are bound to vfio-pci too (or unbound)"
        )
    if args.user:
        try:
            pw = pwd.getpwnam(args.user)
        except KeyError:
            raise UsageError(f"no such user {args.user!r}") from None
        try:
            os.chown(f"/dev/vfio/{group}", pw.pw_uid, pw.pw_gid)
        except OSError as exc:
            raise NotAvailable(f"cannot give /dev/vfio/{group} to {args.user}: {exc.strerror}") from None
        print(f"/dev/vfio/{group} now belongs to {args.user} (mind its locked-memory limit: ulimit -l)")
    print(f"use it as: vfio:{bdf}")
    return 0


def run_unbind(args: argparse.Namespace) -> int:
    bdf = parse_bdf(args.bdf)
    driver = unbind(bdf)
    print(f"{bdf}: released from vfio-pci; now bound to {driver or 'no driver'}")
    return 0
