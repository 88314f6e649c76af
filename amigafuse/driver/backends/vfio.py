"""The VFIO backend: drive a real (or virtual) virtio-scsi PCI function from user space.

The device must be bound to ``vfio-pci`` (``amigafuse bind-vfio BDF``).  Then:

* container (``/dev/vfio/vfio``) + group (``/dev/vfio/<group>``) + device fds, type1 IOMMU
  (``VFIO_TYPE1v2_IOMMU`` when offered, else ``VFIO_TYPE1_IOMMU``);
* PCI config space is VFIO region 7, BARs are regions 0..5, all accessed with
  ``pread``/``pwrite`` on the device fd at the region's offset (vfio-pci performs each
  1/2/4-byte access with the same width on the device; 8-byte accesses are split into
  two 4-byte ones, low half first);
* the DMA arena is anonymous memory mapped with ``VFIO_IOMMU_MAP_DMA`` at an IOVA chosen
  inside the IOMMU's usable ranges: the arena's ``bus_address`` is that IOVA.  This only
  reaches the device's DMA if the device goes through the IOMMU, i.e. offers
  ``VIRTIO_F_ACCESS_PLATFORM`` (QEMU: ``iommu_platform=on``, modern devices only), which
  the transport accepts (:attr:`VfioBackend.requires_access_platform`).  A device that
  bypasses the IOMMU (QEMU's transitional virtio-scsi-pci) DMAs to physical addresses:
  it gets one 2 MiB huge page, pinned at IOVA = its physical address (from
  /proc/self/pagemap), as its arena (``dma="physical"``, chosen by "auto");
* interrupts are signalled on an eventfd (``VFIO_DEVICE_SET_IRQS``, ACTION_TRIGGER) that
  trio waits on without polling (:func:`trio.lowlevel.wait_readable`): MSI-X vector 0
  where the function has MSI-X (:meth:`VfioBackend.enable_msix`; one message per event,
  no ISR read, nothing to unmask), else INTx, which the kernel masks on each interrupt
  and :meth:`VfioBackend.ack_interrupt` unmasks.  ``interrupts="intx"`` forces INTx;
* the device's REQ interrupt (the kernel asking for the device back, e.g. on unbind) is
  an eventfd too: when it fires the backend is declared dead (DeviceGone);
* closing resets the device (``VFIO_DEVICE_RESET``), unmaps the arena and closes the fds.

The pure parts (ioctl numbers, struct layouts, IOVA choice, BDF parsing, error
advice) are plain functions tested without a kernel; the rest needs VFIO and is tested
in a Linux guest (tests/vm).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import logging
import mmap
import os
import re
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import trio

from amigafuse.driver.backends.base import Backend, BarInfo, BarKind, BarRegion, DmaArena
from amigafuse.errors import DeviceError, DeviceGone, HardwareError, NotAvailable, UsageError

if TYPE_CHECKING:
    from amigafuse.driver.controller import Controller

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- ABI (linux/vfio.h)

VFIO_TYPE = ord(";")  # 0x3B
VFIO_BASE = 100


def _io(nr: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + nr)``: every VFIO ioctl passes its size in argsz."""
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


VFIO_GET_API_VERSION = _io(0)  # 0x3B64
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_UNSET_CONTAINER = _io(5)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_DEVICE_RESET = _io(11)
VFIO_IOMMU_GET_INFO = _io(12)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2

VFIO_IRQ_INFO_EVENTFD = 1 << 0

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1

# vfio-pci region and IRQ indices
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_REQ_IRQ_INDEX = 4

PCI_COMMAND = 0x04
PCI_COMMAND_IO = 1 << 0
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_SPACE_IO = 1

# Struct layouts (native = little-endian x86_64, naturally aligned like the C structs).
GROUP_STATUS = struct.Struct("<II")  # argsz, flags
DEVICE_INFO = struct.Struct("<IIIIII")  # argsz, flags, num_regions, num_irqs, cap_offset, pad
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_SET_HEADER = struct.Struct("<IIIII")  # argsz, flags, index, start, count (+ data)
DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, vaddr, iova, size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, iova, size
IOMMU_INFO = struct.Struct("<IIQII")  # argsz, flags, iova_pgsizes, cap_offset, pad
CAP_HEADER = struct.Struct("<HHI")  # id, version, next
IOVA_RANGE_HEADER = struct.Struct("<II")  # nr_iovas, reserved (after the cap header)
IOVA_RANGE = struct.Struct("<QQ")  # start, end (inclusive)

DEFAULT_ARENA_BYTES = 32 << 20
#: A device without VIRTIO_F_ACCESS_PLATFORM DMAs to physical addresses: its arena is one
#: 2 MiB huge page (physically contiguous) whose physical address is its bus address.
HUGE_PAGE_BYTES = 2 << 20
MAP_HUGETLB = 0x40000
PHYSICAL_MAX_TRANSFER = 64 << 10
PAGEMAP_PFN_MASK = (1 << 55) - 1
PAGEMAP_PRESENT = 1 << 63
DmaMode = Literal["auto", "iommu", "physical"]
#: "auto": MSI-X where the function has it, else INTx; "msix": MSI-X or an error;
#: "intx": INTx even where MSI-X is offered.
InterruptMode = Literal["auto", "msix", "intx"]
PREFERRED_IOVA = 0x1000_0000  # 256 MiB: below 4 GiB, clear of the x86 MSI window


# --------------------------------------------------------------------------- pure helpers

_BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")


def parse_bdf(text: str) -> str:
    """Normalise a PCI address (``0000:00:04.0`` or ``00:04.0``) to ``dddd:bb:dd.f``.

    Raises UsageError naming the expected syntax.
    """
    m = _BDF_RE.match(text.strip())
    if not m or int(m.group(3), 16) > 0x1F:
        raise UsageError(
            f"{text!r} is not a PCI address: write it as DOMAIN:BUS:DEVICE.FUNCTION, "
            "e.g. 0000:00:04.0 (see lspci -D)"
        )
    domain = m.group(1) or "0000"
    return f"{domain.lower()}:{m.group(2).lower()}:{m.group(3).lower()}.{m.group(4)}"


def devfn_of(bdf: str) -> int:
    """The devfn byte (device << 3 | function) of a normalised BDF."""
    dev, fn = bdf.split(":")[2].split(".")
    return (int(dev, 16) << 3) | int(fn)


def bind_commands(bdf: str) -> str:
    """Shell commands that hand ``bdf`` to vfio-pci (what ``amigafuse bind-vfio`` does)."""
    dev = f"/sys/bus/pci/devices/{bdf}"
    return (
        "modprobe vfio-pci\n"
        f"[ -e {dev}/driver ] && echo {bdf} > {dev}/driver/unbind\n"
        f"echo vfio-pci > {dev}/driver_override\n"
        f"echo {bdf} > /sys/bus/pci/drivers_probe\n"
        f"(or simply: amigafuse bind-vfio {bdf})"
    )


def parse_iova_ranges(info: bytes) -> list[tuple[int, int]]:
    """The usable IOVA ranges ``[(start, end_inclusive)]`` from a VFIO_IOMMU_GET_INFO
    reply (its capability chain); ``[]`` when the kernel gives none.

    Distrusts the reply: capability offsets must lie inside it and advance; raises
    DeviceError otherwise.
    """
    argsz, flags, _pgsizes, cap_offset, _pad = IOMMU_INFO.unpack_from(info, 0)
    if not flags & VFIO_IOMMU_INFO_CAPS or cap_offset == 0:
        return []
    ranges: list[tuple[int, int]] = []
    seen: set[int] = set()
    offset = cap_offset
    limit = min(argsz, len(info))
    while offset:
        if offset in seen or offset < IOMMU_INFO.size or offset + CAP_HEADER.size > limit:
            raise DeviceError(f"VFIO_IOMMU_GET_INFO: bad capability offset {offset:#x}")
        seen.add(offset)
        cap_id, _version, next_offset = CAP_HEADER.unpack_from(info, offset)
        if cap_id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            base = offset + CAP_HEADER.size
            nr_iovas, _reserved = IOVA_RANGE_HEADER.unpack_from(info, base)
            first = base + IOVA_RANGE_HEADER.size
            if first + nr_iovas * IOVA_RANGE.size > limit:
                raise DeviceError(f"VFIO_IOMMU_GET_INFO: {nr_iovas} IOVA ranges overrun the reply")
            for i in range(nr_iovas):
                start, end = IOVA_RANGE.unpack_from(info, first + i * IOVA_RANGE.size)
                if end >= start:
                    ranges.append((start, end))
        offset = next_offset
    return ranges


def choose_iova(ranges: Sequence[tuple[int, int]], size_bytes: int, page_bytes: int = 4096) -> int:
    """An IOVA for a ``size_bytes`` mapping inside one of ``ranges`` (inclusive ends).

    Prefers :data:`PREFERRED_IOVA`, then the lowest page-aligned address at or above
    1 MiB in a range that fits, never 0.  With no ranges known, the preferred IOVA.
    Raises NotAvailable when nothing fits.
    """
    if not ranges:
        return PREFERRED_IOVA
    candidates = []
    for start, end in ranges:
        if start <= PREFERRED_IOVA and PREFERRED_IOVA + size_bytes - 1 <= end:
            return PREFERRED_IOVA
        lo = max(start, 1 << 20)
        lo = (lo + page_bytes - 1) // page_bytes * page_bytes
        if lo + size_bytes - 1 <= end:
            candidates.append(lo)
    if not candidates:
        raise NotAvailable(
            f"the IOMMU has no free IOVA range for a {size_bytes}-byte DMA arena "
            f"(ranges: {', '.join(f'{s:#x}-{e:#x}' for s, e in ranges)})"
        )
    return min(candidates)


def irq_set(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytearray:
    """A ``struct vfio_irq_set`` with ``data`` appended."""
    buf = bytearray(IRQ_SET_HEADER.size + len(data))
    IRQ_SET_HEADER.pack_into(buf, 0, len(buf), flags, index, start, count)
    buf[IRQ_SET_HEADER.size :] = data
    return buf


# --------------------------------------------------------------------------- syscalls

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: bytearray | int | None = None, what: str = "") -> int:
    """ioctl with a pointer to ``arg`` (a bytearray updated in place) or an integer
    argument.  Raises OSError with the errno."""
    if isinstance(arg, bytearray):
        cbuf = (ctypes.c_char * len(arg)).from_buffer(arg)
        rc = _libc.ioctl(fd, request, ctypes.addressof(cbuf))
        del cbuf
    else:
        rc = _libc.ioctl(fd, request, arg if arg is not None else 0)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what or hex(request)}: {os.strerror(err)}")
    return int(rc)


# --------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size_bytes: int
    offset: int  # file offset of the region in the device fd


class _VfioBar(BarRegion):
    """A BAR as a VFIO region, accessed with pread/pwrite at the region offset."""

    def __init__(self, backend: VfioBackend, region: RegionInfo, kind: BarKind) -> None:
        self._backend = backend
        self._region = region
        self.kind = kind
        self.size_bytes = region.size_bytes

    async def read(self, offset: int, size: int) -> int:
        self._check(offset, size)
        return self._backend._region_read(self._region, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size)
        self._backend._region_write(self._region, offset, size, value)


_CTYPE_BY_SIZE: dict[int, type[ctypes.c_uint8] | type[ctypes.c_uint16] | type[ctypes.c_uint32]] = {
    1: ctypes.c_uint8,
    2: ctypes.c_uint16,
    4: ctypes.c_uint32,
}


class _MappedBar(BarRegion):
    """A memory BAR mmap'ed from the device fd: loads and stores of the access width,
    no system call.  The backend unmaps it on close; every access first checks that
    the backend is still open (an access after unmapping would fault)."""

    def __init__(self, backend: VfioBackend, region: RegionInfo, mapping: mmap.mmap) -> None:
        self._backend = backend
        self._region = region
        self._mapping = mapping
        cbuf = (ctypes.c_char * region.size_bytes).from_buffer(mapping)
        self._address = ctypes.addressof(cbuf)
        del cbuf
        self.kind = BarKind.MEMORY
        self.size_bytes = region.size_bytes

    def _load(self, offset: int, size: int) -> int:
        if size == 8:
            return self._load(offset, 4) | (self._load(offset + 4, 4) << 32)
        return int(_CTYPE_BY_SIZE[size].from_address(self._address + offset).value)

    def _store(self, offset: int, size: int, value: int) -> None:
        if size == 8:
            self._store(offset, 4, value & 0xFFFFFFFF)
            self._store(offset + 4, 4, value >> 32)
            return
        _CTYPE_BY_SIZE[size].from_address(self._address + offset).value = value

    async def read(self, offset: int, size: int) -> int:
        self._check(offset, size)
        self._backend._check_open()
        return self._load(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._check(offset, size)
        self._backend._check_open()
        self._store(offset, size, value)


# --------------------------------------------------------------------------- the backend


class VfioBackend(Backend):
    """One PCI function bound to vfio-pci.  Create with :func:`open_vfio_backend`."""

    assigns_bars = False
    #: The device's DMA goes through the IOMMU, so it must negotiate
    #: VIRTIO_F_ACCESS_PLATFORM (bit 33); without it the arena's bus address is wrong.
    requires_access_platform = True

    def __init__(
        self,
        bdf: str,
        *,
        mmap_bars: bool = True,
        dma: DmaMode = "auto",
        interrupts: InterruptMode = "auto",
    ) -> None:
        if dma not in ("auto", "iommu", "physical"):
            raise UsageError(f"unknown DMA mode {dma!r}: use auto, iommu or physical")
        if interrupts not in ("auto", "msix", "intx"):
            raise UsageError(f"unknown interrupt mode {interrupts!r}: use auto, msix or intx")
        self._irq_request: InterruptMode = interrupts
        #: Why MSI-X is not in use (None while it is, or before interrupts are enabled).
        self.msix_note: str | None = None
        self.bdf = parse_bdf(bdf)
        self.mmap_bars = mmap_bars
        self._dma_request: DmaMode = dma
        #: "iommu" (the arena's bus address is an IOVA) or "physical" (a device that
        #: bypasses the IOMMU: the bus address is the huge page's physical address).
        self.dma_mode = "iommu"
        self._bar_maps: dict[int, mmap.mmap] = {}
        self.devfn = devfn_of(self.bdf)
        self._container_fd = -1
        self._group_fd = -1
        self._device_fd = -1
        self._irq_fd = -1
        self._req_fd = -1
        self._device_flags = 0
        self._regions: dict[int, RegionInfo] = {}
        self._arena_map: mmap.mmap | None = None
        self._arena: DmaArena | None = None
        self._arena_iova = 0
        self._dma_mapped = False
        self._gone: DeviceGone | None = None
        self._closed = False
        self._interrupts = 0
        self._irq_pending = False
        #: VFIO_PCI_INTX_IRQ_INDEX or VFIO_PCI_MSIX_IRQ_INDEX once interrupts are on.
        self._irq_index: int | None = None
        self._unmask = irq_set(
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1
        )

    # ------------------------------------------------------------ opening

    def _open(self, arena_bytes: int) -> None:
        """Open container, group and device; map the arena.  Synchronous; on error the
        caller closes (``_release``)."""
        sysdev = Path("/sys/bus/pci/devices") / self.bdf
        if not sysdev.exists():
            raise UsageError(f"no PCI device {self.bdf} (see lspci -D)")
        driver = sysdev / "driver"
        drv_name = driver.resolve().name if driver.exists() else None
        if drv_name != "vfio-pci":
            now = f"bound to {drv_name}" if drv_name else "not bound to any driver"
            raise NotAvailable(
                f"PCI device {self.bdf} is {now}, not vfio-pci. Hand it to vfio-pci first "
                f"(as root):\n{bind_commands(self.bdf)}"
            )
        group_link = sysdev / "iommu_group"
        if not group_link.exists():
            raise NotAvailable(
                f"PCI device {self.bdf} has no IOMMU group: the kernel has no IOMMU enabled "
                "(boot with intel_iommu=on or amd_iommu=on; in a QEMU guest add "
                "-device intel-iommu,intremap=on,caching-mode=on)"
            )
        group = group_link.resolve().name
        try:
            self._container_fd = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotAvailable(
                "/dev/vfio/vfio is missing: load the vfio module (modprobe vfio-pci)"
            ) from None
        except PermissionError:
            raise NotAvailable("no permission to open /dev/vfio/vfio: run as root") from None
        version = _ioctl(self._container_fd, VFIO_GET_API_VERSION, None, "VFIO_GET_API_VERSION")
        if version != VFIO_API_VERSION:
            raise NotAvailable(f"unknown VFIO API version {version} (expected {VFIO_API_VERSION})")
        if _ioctl(self._container_fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU, "CHECK_EXTENSION"):
            iommu_type = VFIO_TYPE1v2_IOMMU
        elif _ioctl(self._container_fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU, "CHECK_EXTENSION"):
            iommu_type = VFIO_TYPE1_IOMMU
        else:
            raise NotAvailable(
                "the kernel's VFIO offers no type1 IOMMU: load vfio_iommu_type1 "
                "(modprobe vfio_iommu_type1) and enable the IOMMU (intel_iommu=on)"
            )
        group_path = f"/dev/vfio/{group}"
        try:
            self._group_fd = os.open(group_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotAvailable(
                f"{group_path} is missing although {self.bdf} is in IOMMU group {group}"
            ) from None
        except PermissionError:
            raise NotAvailable(
                f"no permission to open {group_path}: run as root or chown it to your user"
            ) from None
        except OSError as exc:
            if exc.errno == _errno.EBUSY:
                raise NotAvailable(
                    f"{group_path} is in use by another process (another amigafuse or a VM?)"
                ) from None
            raise
        status = bytearray(GROUP_STATUS.size)
        GROUP_STATUS.pack_into(status, 0, GROUP_STATUS.size, 0)
        _ioctl(self._group_fd, VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
        _argsz, gflags = GROUP_STATUS.unpack(status)
        if not gflags & VFIO_GROUP_FLAGS_VIABLE:
            members = sorted(p.name for p in (group_link.resolve() / "devices").iterdir())
            others = [m for m in members if m != self.bdf]
            raise NotAvailable(
                f"IOMMU group {group} is not viable: every device in it must be bound to "
                f"vfio-pci (or no driver). Also in the group: {', '.join(others) or '?'}; "
                "run amigafuse bind-vfio for each"
            )
        fd_arg = bytearray(struct.pack("<i", self._container_fd))
        _ioctl(self._group_fd, VFIO_GROUP_SET_CONTAINER, fd_arg, "VFIO_GROUP_SET_CONTAINER")
        _ioctl(self._container_fd, VFIO_SET_IOMMU, iommu_type, "VFIO_SET_IOMMU")
        name = bytearray(self.bdf.encode() + b"\0")
        self._device_fd = _ioctl(
            self._group_fd, VFIO_GROUP_GET_DEVICE_FD, name, "VFIO_GROUP_GET_DEVICE_FD"
        )
        info = bytearray(DEVICE_INFO.size)
        DEVICE_INFO.pack_into(info, 0, DEVICE_INFO.size, 0, 0, 0, 0, 0)
        _ioctl(self._device_fd, VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO")
        _argsz, self._device_flags, num_regions, _num_irqs, _cap, _pad = DEVICE_INFO.unpack(info)
        if not self._device_flags & VFIO_DEVICE_FLAGS_PCI:
            raise NotAvailable(f"VFIO device {self.bdf} is not a PCI device")
        for index in range(min(num_regions, VFIO_PCI_CONFIG_REGION_INDEX + 1)):
            buf = bytearray(REGION_INFO.size)
            REGION_INFO.pack_into(buf, 0, REGION_INFO.size, 0, index, 0, 0, 0)
            _ioctl(self._device_fd, VFIO_DEVICE_GET_REGION_INFO, buf, "VFIO_DEVICE_GET_REGION_INFO")
            _a, flags, _i, _c, size, offset = REGION_INFO.unpack(buf)
            self._regions[index] = RegionInfo(index, flags, size, offset)
        if VFIO_PCI_CONFIG_REGION_INDEX not in self._regions:
            raise NotAvailable(f"VFIO device {self.bdf} has no config-space region")
        translated = self._offers_access_platform()
        mode = self._dma_request
        if mode == "auto":
            mode = "iommu" if translated else "physical"
        if mode == "iommu" and not translated:
            raise NotAvailable(
                f"PCI device {self.bdf} does not offer VIRTIO_F_ACCESS_PLATFORM, so its DMA "
                "bypasses the IOMMU: use DMA mode physical (root, one free 2 MiB huge page), "
                "or attach it in QEMU as -device virtio-scsi-pci-non-transitional,iommu_platform=on"
            )
        if mode == "iommu":
            self._map_arena(arena_bytes)
        else:
            self._map_physical_arena()
        self.dma_mode = mode
        self.requires_access_platform = mode == "iommu"
        # Decode I/O and memory, and let the device master the bus (DMA).
        cmd = self._region_read(self._config, PCI_COMMAND, 2)
        self._region_write(
            self._config,
            PCI_COMMAND,
            2,
            cmd | PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER,
        )
        self._setup_req_irq()

    def _map_arena(self, arena_bytes: int) -> None:
        page = mmap.PAGESIZE
        arena_bytes = (arena_bytes + page - 1) // page * page
        info = bytearray(4096)
        IOMMU_INFO.pack_into(info, 0, len(info), 0, 0, 0, 0)
        ranges: list[tuple[int, int]] = []
        try:
            _ioctl(self._container_fd, VFIO_IOMMU_GET_INFO, info, "VFIO_IOMMU_GET_INFO")
            ranges = parse_iova_ranges(bytes(info))
        except OSError:
            ranges = []
        iova = choose_iova(ranges, arena_bytes, page)
        self._arena_map = mmap.mmap(
            -1,
            arena_bytes,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        cbuf = (ctypes.c_char * arena_bytes).from_buffer(self._arena_map)
        vaddr = ctypes.addressof(cbuf)
        del cbuf
        self._dma_map(vaddr, iova, arena_bytes)
        self._arena = DmaArena(view=memoryview(self._arena_map), bus_address=iova)

    def _offers_access_platform(self) -> bool:
        """Whether the function's DMA goes through the IOMMU: for a VirtIO device, whether
        it offers VIRTIO_F_ACCESS_PLATFORM (False for legacy-only ones); any other PCI
        device is assumed to (as real hardware does)."""
        config = os.pread(self._device_fd, 256, self._config.offset)
        if len(config) < 256 or int.from_bytes(config[0:2], "little") != VIRTIO_PCI_VENDOR:
            return True
        common = find_common_cfg(config)
        if common is None:
            return False
        region = self._regions.get(VFIO_PCI_BAR0_REGION_INDEX + common[0])
        if region is None or common[1] + COMMON_DEVICE_FEATURE + 4 > region.size_bytes:
            raise DeviceError(f"virtio COMMON_CFG at BAR{common[0]}+{common[1]:#x} lies outside the BAR")
        self._region_write(region, common[1] + COMMON_DEVICE_FEATURE_SELECT, 4, 1)
        high = self._region_read(region, common[1] + COMMON_DEVICE_FEATURE, 4)
        return bool(high >> (VIRTIO_F_ACCESS_PLATFORM - 32) & 1)

    def _map_physical_arena(self) -> None:
        """The arena for a device that bypasses the IOMMU: one huge page, pinned by
        mapping it at IOVA = its physical address (so it is right either way)."""
        size = HUGE_PAGE_BYTES
        try:
            self._arena_map = mmap.mmap(
                -1,
                size,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError:
            raise NotAvailable(
                f"PCI device {self.bdf} bypasses the IOMMU, so its DMA arena must be one "
                "physically contiguous 2 MiB huge page, and none is free: reserve one "
                "(as root: echo 4 > /proc/sys/vm/nr_hugepages)"
            ) from None
        self._arena_map[0:1] = b"\0"  # fault the page in
        cbuf = (ctypes.c_char * size).from_buffer(self._arena_map)
        vaddr = ctypes.addressof(cbuf)
        del cbuf
        physical = self._physical_address(vaddr)
        if physical % HUGE_PAGE_BYTES:
            raise HardwareError(f"huge page at physical {physical:#x} is not 2 MiB aligned")
        self._dma_map(vaddr, physical, size)
        if self._physical_address(vaddr) != physical:  # moved before it was pinned
            raise NotAvailable("the DMA huge page moved while being pinned; try again")
        self._arena = DmaArena(view=memoryview(self._arena_map), bus_address=physical)

    def _physical_address(self, vaddr: int) -> int:
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NotAvailable(f"cannot read /proc/self/pagemap: {exc.strerror}") from None
        try:
            entry = int.from_bytes(os.pread(fd, 8, vaddr // mmap.PAGESIZE * 8), "little")
        finally:
            os.close(fd)
        pfn = entry & PAGEMAP_PFN_MASK
        if not entry & PAGEMAP_PRESENT or pfn == 0:
            raise NotAvailable(
                f"PCI device {self.bdf} bypasses the IOMMU: finding the DMA arena's physical "
                "address needs root (CAP_SYS_ADMIN reads /proc/self/pagemap)"
            )
        return pfn * mmap.PAGESIZE + vaddr % mmap.PAGESIZE

    def _dma_map(self, vaddr: int, iova: int, size: int) -> None:
        dma = bytearray(DMA_MAP.size)
        DMA_MAP.pack_into(
            dma, 0, DMA_MAP.size, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE, vaddr, iova, size
        )
        try:
            _ioctl(self._container_fd, VFIO_IOMMU_MAP_DMA, dma, "VFIO_IOMMU_MAP_DMA")
        except OSError as exc:
            hint = " (raise the locked-memory limit: ulimit -l)" if exc.errno == _errno.ENOMEM else ""
            raise NotAvailable(
                f"cannot map the {size}-byte DMA arena at IOVA {iova:#x}: {exc.strerror}{hint}"
            ) from None
        self._dma_mapped = True
        self._arena_iova = iova

    def _setup_req_irq(self) -> None:
        """Ask for the REQ eventfd (the kernel wants the device back) when offered."""
        try:
            info = bytearray(IRQ_INFO.size)
            IRQ_INFO.pack_into(info, 0, IRQ_INFO.size, 0, VFIO_PCI_REQ_IRQ_INDEX, 0)
            _ioctl(self._device_fd, VFIO_DEVICE_GET_IRQ_INFO, info, "GET_IRQ_INFO(REQ)")
        except OSError:
            return
        _a, flags, _index, count = IRQ_INFO.unpack(info)
        if count < 1 or not flags & VFIO_IRQ_INFO_EVENTFD:
            return
        self._req_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        _ioctl(
            self._device_fd,
            VFIO_DEVICE_SET_IRQS,
            irq_set(
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                VFIO_PCI_REQ_IRQ_INDEX,
                0,
                1,
                struct.pack("<i", self._req_fd),
            ),
            "SET_IRQS(REQ)",
        )

    # ------------------------------------------------------------ region access

    @property
    def _config(self) -> RegionInfo:
        return self._regions[VFIO_PCI_CONFIG_REGION_INDEX]

    def _fail(self, what: str, exc: OSError) -> DeviceGone:
        if self._gone is None:
            self._gone = DeviceGone(
                f"VFIO device {self.bdf}: {what} failed ({exc.strerror}); the device was "
                "reset, unbound or removed"
            )
        return self._gone

    def _check_open(self) -> None:
        """Raise DeviceGone once closed or dead (cheap: no system call)."""
        if self._gone is not None:
            raise self._gone
        if self._closed:
            raise self.gone_error()

    def _region_read(self, region: RegionInfo, offset: int, size: int) -> int:
        if self._gone is not None:
            raise self._gone
        if size == 8:
            lo = self._region_read(region, offset, 4)
            return lo | (self._region_read(region, offset + 4, 4) << 32)
        try:
            data = os.pread(self._device_fd, size, region.offset + offset)
        except OSError as exc:
            raise self._fail(f"read of region {region.index} at {offset:#x}", exc) from None
        if len(data) != size:
            raise self._fail(
                f"short read of region {region.index} at {offset:#x}",
                OSError(_errno.EIO, "short read"),
            )
        return int.from_bytes(data, "little")

    def _region_write(self, region: RegionInfo, offset: int, size: int, value: int) -> None:
        if self._gone is not None:
            raise self._gone
        if size == 8:
            self._region_write(region, offset, 4, value & 0xFFFFFFFF)
            self._region_write(region, offset + 4, 4, value >> 32)
            return
        try:
            n = os.pwrite(self._device_fd, value.to_bytes(size, "little"), region.offset + offset)
        except OSError as exc:
            raise self._fail(f"write of region {region.index} at {offset:#x}", exc) from None
        if n != size:
            raise self._fail(
                f"short write of region {region.index} at {offset:#x}",
                OSError(_errno.EIO, "short write"),
            )

    # ------------------------------------------------------------ Backend API

    @property
    def arena(self) -> DmaArena:
        if self._arena is None:
            raise self.gone_error()
        return self._arena

    @property
    def dead(self) -> bool:
        self._check_req()
        return self._gone is not None or self._closed

    def gone_error(self) -> Exception:
        if self._gone is not None:
            return self._gone
        return DeviceGone(f"VFIO device {self.bdf} is closed")

    def _check_req(self) -> None:
        if self._req_fd >= 0 and self._gone is None:
            try:
                os.eventfd_read(self._req_fd)
            except BlockingIOError:
                return
            self._gone = DeviceGone(
                f"VFIO device {self.bdf}: the kernel asked for the device back (unbind or removal)"
            )
            # Give it back at once (reset, unmap, close), even if our owner keeps the
            # backend open (an idle mount): the kernel's unbind waits for that.  Every
            # later operation raises the DeviceGone above.  The arena memory stays
            # mapped in our process until the backend is closed: a request completed
            # just before may still be copied out of it by its woken caller.
            self._release(keep_arena=True)

    def _check_devfn(self, devfn: int) -> bool:
        return devfn == self.devfn

    async def config_read(self, devfn: int, offset: int, size: int) -> int:
        if size not in (1, 2, 4):
            raise ValueError(f"config access size {size} is not 1, 2 or 4")
        if not self._check_devfn(devfn):
            return (1 << (8 * size)) - 1  # no such function: all ones, as on a PCI bus
        if self.dead:
            raise self.gone_error()
        return self._region_read(self._config, offset, size)

    def config_write(self, devfn: int, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            raise ValueError(f"config access size {size} is not 1, 2 or 4")
        if not self._check_devfn(devfn):
            return
        if self.dead:
            raise self.gone_error()
        self._region_write(self._config, offset, size, value)

    async def config_read_block(self, devfn: int, offset: int, length: int) -> bytes:
        if offset % 4 or length % 4:
            raise ValueError("config_read_block needs dword-aligned offset and length")
        if not self._check_devfn(devfn):
            return b"\xff" * length
        if self.dead:
            raise self.gone_error()
        try:
            data = os.pread(self._device_fd, length, self._config.offset + offset)
        except OSError as exc:
            raise self._fail("config space read", exc) from None
        return data.ljust(length, b"\xff")

    def bar_info(self, bar_index: int) -> BarInfo:
        """What VFIO says about BAR ``bar_index``: kind from the BAR register, size from
        the region.  Raises DeviceError if the BAR is not implemented."""
        if not 0 <= bar_index <= 5:
            raise ValueError(f"BAR index {bar_index} is not 0..5")
        self._check_open()
        region = self._regions.get(VFIO_PCI_BAR0_REGION_INDEX + bar_index)
        if region is None or region.size_bytes == 0:
            raise DeviceError(f"PCI device {self.bdf} does not implement BAR{bar_index}")
        raw = self._region_read(self._config, PCI_BASE_ADDRESS_0 + 4 * bar_index, 4)
        if raw & PCI_BASE_ADDRESS_SPACE_IO:
            return BarInfo(bar_index, BarKind.IO, raw & ~0x3, region.size_bytes)
        return BarInfo(
            bar_index,
            BarKind.MEMORY,
            raw & ~0xF,
            region.size_bytes,
            is_64bit=(raw >> 1) & 3 == 2,
            prefetchable=bool(raw & 8),
        )

    def map_bar(self, devfn: int, bar: BarInfo) -> BarRegion:
        """The VFIO region of ``bar.index`` (the kind is taken from ``bar``).  Memory BARs
        are mmap'ed when VFIO allows it (``mmap_bars``), otherwise accessed with
        pread/pwrite.  Raises DeviceError for an unknown devfn or unimplemented BAR."""
        if not self._check_devfn(devfn):
            raise DeviceError(f"VFIO backend for {self.bdf} has no device at devfn {devfn:#x}")
        if not 0 <= bar.index <= 5:
            raise ValueError(f"BAR index {bar.index} is not 0..5")
        self._check_open()
        region = self._regions.get(VFIO_PCI_BAR0_REGION_INDEX + bar.index)
        if region is None or region.size_bytes == 0:
            raise DeviceError(f"PCI device {self.bdf} does not implement BAR{bar.index}")
        kind = bar.kind
        if kind is BarKind.MEMORY and self.mmap_bars and region.flags & VFIO_REGION_INFO_FLAG_MMAP:
            mapping = self._bar_maps.get(region.index)
            if mapping is None:
                try:
                    mapping = mmap.mmap(
                        self._device_fd,
                        region.size_bytes,
                        flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=region.offset,
                    )
                except OSError:
                    mapping = None  # e.g. a BAR holding the MSI-X table: pread/pwrite
                else:
                    self._bar_maps[region.index] = mapping
            if mapping is not None:
                return _MappedBar(self, region, mapping)
        return _VfioBar(self, region, kind)

    async def sync(self) -> None:
        # pread/pwrite are synchronous: every issued access is already performed.
        if self.dead:
            raise self.gone_error()
        await trio.lowlevel.checkpoint()

    @property
    def interrupt_mode(self) -> str:
        return "msix" if self._irq_index == VFIO_PCI_MSIX_IRQ_INDEX else "intx"

    def _irq_info(self, index: int, what: str) -> tuple[int, int]:
        """``(count, flags)`` of VFIO IRQ ``index``.  Raises OSError."""
        info = bytearray(IRQ_INFO.size)
        IRQ_INFO.pack_into(info, 0, IRQ_INFO.size, 0, index, 0)
        _ioctl(self._device_fd, VFIO_DEVICE_GET_IRQ_INFO, info, f"GET_IRQ_INFO({what})")
        _a, flags, _index, count = IRQ_INFO.unpack(info)
        return count, flags

    def _no_msix(self, note: str) -> bool:
        """Record why MSI-X is not used; raise NotAvailable if it was demanded
        (``interrupts="msix"``), else log a debug note and return False."""
        self.msix_note = note
        if self._irq_request == "msix":
            raise NotAvailable(f"PCI device {self.bdf}: no MSI-X ({note}); use interrupts=auto")
        log.debug("VFIO device %s: INTx, not MSI-X: %s", self.bdf, note)
        return False

    async def enable_msix(self, devfn: int) -> bool:
        """Route MSI-X vector 0 to :meth:`wait_interrupt` (one eventfd), unless INTx was
        asked for (``interrupts="intx"``), the function has no MSI-X, or VFIO refuses
        it: then False (with ``interrupts="msix"``: NotAvailable) and the reason in
        :attr:`msix_note`.  Raises DeviceGone once the backend is dead."""
        if not self._check_devfn(devfn):
            raise DeviceError(f"VFIO backend for {self.bdf} has no device at devfn {devfn:#x}")
        if self.dead:
            raise self.gone_error()
        if self._irq_index is not None:
            return self._irq_index == VFIO_PCI_MSIX_IRQ_INDEX
        if self._irq_request == "intx":
            self.msix_note = "INTx asked for (interrupts=intx)"
            return False
        try:
            count, flags = self._irq_info(VFIO_PCI_MSIX_IRQ_INDEX, "MSI-X")
        except OSError as exc:
            return self._no_msix(f"GET_IRQ_INFO failed: {exc.strerror}")
        if count < 1 or not flags & VFIO_IRQ_INFO_EVENTFD:
            return self._no_msix("the function has no MSI-X capability")
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            _ioctl(
                self._device_fd,
                VFIO_DEVICE_SET_IRQS,
                irq_set(
                    VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                    VFIO_PCI_MSIX_IRQ_INDEX,
                    0,
                    1,
                    struct.pack("<i", fd),
                ),
                "SET_IRQS(MSI-X)",
            )
        except OSError as exc:
            os.close(fd)
            return self._no_msix(f"VFIO refused to enable it: {exc.strerror}")
        self._irq_fd = fd
        self._irq_index = VFIO_PCI_MSIX_IRQ_INDEX
        self.msix_note = None
        await trio.lowlevel.checkpoint()
        return True

    def _disable_irq(self) -> None:
        """Switch the enabled interrupt off and close its eventfd.  Called while the
        device is brought up, before any task waits on the eventfd."""
        if self._irq_index is None:
            return
        with contextlib.suppress(OSError):
            _ioctl(
                self._device_fd,
                VFIO_DEVICE_SET_IRQS,
                irq_set(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, self._irq_index, 0, 0),
            )
        if self._irq_fd >= 0:
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self._irq_fd)
            os.close(self._irq_fd)
            self._irq_fd = -1
        self._irq_index = None
        self._irq_pending = False

    async def enable_interrupts(self, devfn: int) -> None:
        """Route INTx to :meth:`wait_interrupt`.  After :meth:`enable_msix` (the device
        refused the vector) MSI-X is switched off first; with ``interrupts="msix"`` that
        is an error (NotAvailable).  Raises NotAvailable when the function has no INTx
        VFIO can signal, DeviceGone when the backend is dead."""
        if not self._check_devfn(devfn):
            raise DeviceError(f"VFIO backend for {self.bdf} has no device at devfn {devfn:#x}")
        if self.dead:
            raise self.gone_error()
        if self._irq_index == VFIO_PCI_INTX_IRQ_INDEX:
            return
        if self._irq_index == VFIO_PCI_MSIX_IRQ_INDEX:
            self._disable_irq()
            self._no_msix("the device refused MSI-X vector 0 for its queue")
        try:
            count, flags = self._irq_info(VFIO_PCI_INTX_IRQ_INDEX, "INTx")
        except OSError as exc:
            raise self._fail("GET_IRQ_INFO(INTx)", exc) from None
        if count < 1 or not flags & VFIO_IRQ_INFO_EVENTFD:
            raise NotAvailable(
                f"PCI device {self.bdf} has no INTx interrupt VFIO can signal (interrupt pin "
                "unset, or the line is shared with a device that does not support masking)"
            )
        self._irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            _ioctl(
                self._device_fd,
                VFIO_DEVICE_SET_IRQS,
                irq_set(
                    VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                    VFIO_PCI_INTX_IRQ_INDEX,
                    0,
                    1,
                    struct.pack("<i", self._irq_fd),
                ),
                "SET_IRQS(INTx)",
            )
        except OSError as exc:
            raise self._fail("enabling INTx", exc) from None
        self._irq_index = VFIO_PCI_INTX_IRQ_INDEX
        await trio.lowlevel.checkpoint()

    async def wait_interrupt(self) -> None:
        """Sleep (no polling) until the interrupt (INTx or MSI-X vector 0) fired since
        the previous call returned.

        The eventfd counter is consumed into ``_irq_pending`` before the checkpoint that
        may deliver a cancellation, and cleared only after it: a cancelled wait leaves
        the interrupt pending for the next call.  Raises DeviceGone once the backend is
        dead (REQ from the kernel, closed, failed access).
        """
        if self._irq_index is None:
            raise DeviceError("wait_interrupt before enable_interrupts or enable_msix")
        while True:
            if not self._irq_pending:
                if self.dead:
                    raise self.gone_error()
                try:
                    os.eventfd_read(self._irq_fd)
                except BlockingIOError:
                    await self._wait_event()
                    continue
                self._irq_pending = True
                self._interrupts += 1
            await trio.lowlevel.checkpoint()  # Cancelled here: still pending
            self._irq_pending = False
            return

    async def _wait_event(self) -> None:
        """Sleep until the interrupt or the REQ eventfd is readable (no polling), or until the
        backend closes them (then the caller sees ``dead``)."""
        irq_fd, req_fd = self._irq_fd, self._req_fd
        if irq_fd < 0:
            await trio.lowlevel.checkpoint()
            return
        try:
            if req_fd < 0:
                await trio.lowlevel.wait_readable(irq_fd)
                return
            async with trio.open_nursery() as nursery:

                async def watch(fd: int) -> None:
                    await trio.lowlevel.wait_readable(fd)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch, irq_fd)
                nursery.start_soon(watch, req_fd)
        except trio.ClosedResourceError:
            return  # _release closed the fds under us: the loop reports DeviceGone
        except BaseExceptionGroup as group:
            _rest = group.split(trio.ClosedResourceError)[1]
            if _rest is not None:
                raise _rest from None

    def ack_interrupt(self) -> None:
        if (
            self._gone is not None
            or self._device_fd < 0
            or self._irq_index != VFIO_PCI_INTX_IRQ_INDEX
        ):
            return  # MSI-X needs no unmask
        try:
            _ioctl(
                self._device_fd, VFIO_DEVICE_SET_IRQS, bytearray(self._unmask), "SET_IRQS(unmask)"
            )
        except OSError as exc:
            self._fail("unmasking INTx", exc)

    @property
    def interrupt_count(self) -> int:
        return self._interrupts

    async def aclose(self) -> None:
        self._release()
        await trio.lowlevel.checkpoint()

    def _release(self, keep_arena: bool = False) -> None:
        """Reset the device, unmap DMA, close every fd, and (unless ``keep_arena``) free
        the arena's memory.  Idempotent, never raises."""
        if self._closed:
            if not keep_arena:
                self._free_arena()
            return
        self._closed = True
        if self._device_fd >= 0:
            with contextlib.suppress(OSError):
                # Stop DMA before the memory goes away: clear bus master, then reset.
                cmd = int.from_bytes(
                    os.pread(self._device_fd, 2, self._config.offset + PCI_COMMAND), "little"
                )
                os.pwrite(
                    self._device_fd,
                    (cmd & ~PCI_COMMAND_MASTER).to_bytes(2, "little"),
                    self._config.offset + PCI_COMMAND,
                )
            irq_indexes = [VFIO_PCI_REQ_IRQ_INDEX]
            if self._irq_index is not None:
                irq_indexes.insert(0, self._irq_index)
            for index in irq_indexes:
                with contextlib.suppress(OSError):
                    _ioctl(
                        self._device_fd,
                        VFIO_DEVICE_SET_IRQS,
                        irq_set(VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, index, 0, 0),
                    )
            if self._device_flags & VFIO_DEVICE_FLAGS_RESET:
                with contextlib.suppress(OSError):
                    _ioctl(self._device_fd, VFIO_DEVICE_RESET, None, "VFIO_DEVICE_RESET")
        for mapping in self._bar_maps.values():
            with contextlib.suppress(BufferError, OSError):
                mapping.close()
        self._bar_maps.clear()
        if self._dma_mapped:
            unmap = bytearray(DMA_UNMAP.size)
            DMA_UNMAP.pack_into(
                unmap, 0, DMA_UNMAP.size, 0, self._arena_iova, len(self._arena_map or b"")
            )
            with contextlib.suppress(OSError):
                _ioctl(self._container_fd, VFIO_IOMMU_UNMAP_DMA, unmap, "VFIO_IOMMU_UNMAP_DMA")
            self._dma_mapped = False
        for name in ("_irq_fd", "_req_fd", "_device_fd", "_group_fd", "_container_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                if name in ("_irq_fd", "_req_fd"):
                    # A task may be sleeping on it in wait_interrupt: wake it first.
                    with contextlib.suppress(RuntimeError):
                        trio.lowlevel.notify_closing(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
        if not keep_arena:
            self._free_arena()
        if self._gone is None:
            self._gone = DeviceGone(f"VFIO device {self.bdf} is closed")

    def _free_arena(self) -> None:
        """Drop our mapping of the arena (the device no longer has it: DMA unmapped)."""
        if self._arena is not None:
            self._arena.view.release()
            self._arena = None
        if self._arena_map is not None:
            with contextlib.suppress(BufferError):
                self._arena_map.close()
            self._arena_map = None


@asynccontextmanager
async def open_vfio_backend(
    bdf: str,
    *,
    arena_bytes: int = DEFAULT_ARENA_BYTES,
    mmap_bars: bool = True,
    dma: DmaMode = "auto",
    interrupts: InterruptMode = "auto",
) -> AsyncIterator[VfioBackend]:
    """Open ``bdf`` (bound to vfio-pci) as a :class:`VfioBackend`; close it on exit.

    ``dma``: "iommu" maps an ``arena_bytes`` arena at an IOVA (the device must offer
    VIRTIO_F_ACCESS_PLATFORM); "physical" uses one 2 MiB huge page at its physical
    address (for devices that bypass the IOMMU: transitional/legacy virtio; needs root
    and a free huge page); "auto" picks iommu when the device offers the feature.
    ``interrupts``: "auto" uses MSI-X where the function has it (INTx otherwise, with a
    debug note), "msix" insists on it, "intx" forces INTx.

    Raises UsageError (bad or unknown address) and NotAvailable with what to do (not bound
    to vfio-pci — the message lists the bind commands —, no IOMMU, group not viable,
    no permission on /dev/vfio, DMA mapping refused, no huge page).  Opening is
    synchronous work done in this task (a few ioctls).
    """
    backend = VfioBackend(bdf, mmap_bars=mmap_bars, dma=dma, interrupts=interrupts)
    try:
        backend._open(arena_bytes)
    except OSError as exc:
        backend._release()
        raise NotAvailable(f"VFIO device {backend.bdf}: {exc.strerror or exc}") from None
    except BaseException:
        backend._release()
        raise
    try:
        yield backend
    finally:
        backend._release()


VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_CAP_VENDOR = 0x09
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_F_ACCESS_PLATFORM = 33
COMMON_DEVICE_FEATURE_SELECT = 0x00
COMMON_DEVICE_FEATURE = 0x04
MAX_CAPABILITIES = 48


def find_common_cfg(config: bytes) -> tuple[int, int] | None:
    """``(bar, offset)`` of the virtio COMMON_CFG structure from 256 bytes of config
    space, or None (legacy-only device).  The capability walk is bounded and each
    pointer range-checked; a malformed list raises DeviceError."""
    if len(config) < 256:
        raise ValueError("need the first 256 bytes of config space")
    status = int.from_bytes(config[6:8], "little")
    if not status & 0x10:  # no capability list
        return None
    ptr = config[0x34] & 0xFC
    for _ in range(MAX_CAPABILITIES):
        if ptr == 0:
            return None
        if ptr < 0x40 or ptr + 16 > 256:
            raise DeviceError(f"PCI capability pointer {ptr:#x} out of range")
        if config[ptr] == VIRTIO_PCI_CAP_VENDOR and config[ptr + 3] == VIRTIO_PCI_CAP_COMMON_CFG:
            bar = config[ptr + 4]
            if bar > 5:
                raise DeviceError(f"virtio COMMON_CFG capability names BAR {bar}")
            return bar, int.from_bytes(config[ptr + 8 : ptr + 12], "little")
        ptr = config[ptr + 1] & 0xFC
    raise DeviceError("PCI capability list loops or is longer than 48 entries")


async def check_access_platform(backend: VfioBackend, transport: str = "auto") -> None:
    """Refuse a VirtIO device that would bypass the IOMMU.

    Behind VFIO the device must translate its DMA through the IOMMU, i.e. offer
    VIRTIO_F_ACCESS_PLATFORM: otherwise it would take the arena's IOVAs for physical
    addresses and write into unrelated memory.  Raises NotAvailable saying what to change
    (legacy transport asked for, legacy-only device, or the feature not offered).
    """
    if transport == "legacy":
        raise NotAvailable(
            "the legacy VirtIO transport cannot be used through VFIO: it has no "
            "VIRTIO_F_ACCESS_PLATFORM, so the device would bypass the IOMMU; use "
            "transport=modern (or auto)"
        )
    config = await backend.config_read_block(backend.devfn, 0, 256)
    vendor = int.from_bytes(config[0:2], "little")
    if vendor != VIRTIO_PCI_VENDOR:
        raise NotAvailable(
            f"PCI device {backend.bdf} is not a VirtIO device (vendor {vendor:#06x})"
        )
    common = find_common_cfg(config)
    advice = (
        "in QEMU attach the controller as "
        "-device virtio-scsi-pci-non-transitional,iommu_platform=on"
    )
    if common is None:
        raise NotAvailable(
            f"PCI device {backend.bdf} is a legacy-only VirtIO device: it cannot use the "
            f"IOMMU, so VFIO cannot drive it safely; {advice}"
        )
    bar = backend.map_bar(backend.devfn, backend.bar_info(common[0]))
    bar.write(common[1] + COMMON_DEVICE_FEATURE_SELECT, 4, 1)
    high = await bar.read(common[1] + COMMON_DEVICE_FEATURE, 4)
    if not high >> (VIRTIO_F_ACCESS_PLATFORM - 32) & 1:
        raise NotAvailable(
            f"PCI device {backend.bdf} does not offer VIRTIO_F_ACCESS_PLATFORM: its DMA "
            f"would bypass the IOMMU, so VFIO cannot drive it safely; {advice} "
            "(QEMU 7.2 refuses iommu_platform on the transitional virtio-scsi-pci)"
        )


@asynccontextmanager
async def open_vfio(
    bdf: str,
    *,
    transport: Literal["auto", "legacy", "modern"] = "auto",
    queue_depth: int = 16,
    arena_bytes: int = DEFAULT_ARENA_BYTES,
    mmap_bars: bool = True,
    dma: DmaMode = "auto",
    interrupts: InterruptMode = "auto",
) -> AsyncIterator[Controller]:
    """The virtio-scsi controller at ``bdf`` (bound to vfio-pci) with its disks: the VFIO
    twin of :func:`amigafuse.driver.controller.open_qemu` (same Controller shape).

    A device offering VIRTIO_F_ACCESS_PLATFORM (QEMU ``iommu_platform=on``) gets an IOVA
    arena; one that bypasses the IOMMU (transitional ``virtio-scsi-pci``) gets a huge-page
    arena at its physical address and requests of at most 64 KiB (see ``dma``).
    Interrupts: MSI-X vector 0 where the function has it, else INTx (``interrupts``, see
    :func:`open_vfio_backend`).
    Raises what :func:`open_vfio_backend` raises, plus DeviceError subclasses when the
    controller or a disk does not come up.
    """
    import importlib

    from amigafuse.driver.controller import open_transport

    async with open_vfio_backend(
        bdf, arena_bytes=arena_bytes, mmap_bars=mmap_bars, dma=dma, interrupts=interrupts
    ) as backend:
        kwargs: dict[str, int] = {}
        if backend.dma_mode == "iommu":
            await check_access_platform(backend, transport)
        else:
            kwargs["max_transfer_bytes"] = PHYSICAL_MAX_TRANSFER
        # Imported by name: the VirtIO layer is another module's, imported only when used.
        open_virtio_scsi = importlib.import_module("amigafuse.driver.virtio.scsi").open_virtio_scsi
        async with (
            open_virtio_scsi(backend, transport=transport, queue_depth=queue_depth, **kwargs) as scsi,
            open_transport(
                scsi, name=f"vfio-{getattr(scsi, 'transport_kind', transport)}"
            ) as controller,
        ):
            yield controller
