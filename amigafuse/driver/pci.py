"""PCI on bus 0: enumeration, BAR sizing and placement, capability lists.

Pure parts (no I/O): :func:`parse_header`, :func:`parse_capabilities`,
:func:`bar_size`, :class:`BarAllocator`.  The async parts run on a
:class:`~amigafuse.driver.backends.base.Backend`.

When the backend ``assigns_bars`` (qtest: a fresh machine nobody configured) we act as
firmware: I/O BARs are placed from 0xC000 upward, memory BARs from 0xE0000000 upward,
each naturally aligned to its size.  Otherwise (VFIO) BARs keep the addresses the host
gave them and are only sized.

Distrust the device: the capability walk is bounded (at most 48 entries, pointers inside
0x40..0xFC, no revisits) and a malformed list raises HardwareError naming the pointer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from amigafuse.driver.backends.base import Backend, BarInfo, BarKind
from amigafuse.errors import HardwareError

# Config space offsets (PCI Local Bus 3.0, type 0 header)
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
COMMAND_BUS_MASTER = 0x4
COMMAND_INTX_DISABLE = 0x400
STATUS_CAPABILITIES = 0x10

CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11

IO_BASE = 0xC000
IO_LIMIT = 0x10000
MMIO_BASE = 0xE0000000
MMIO_LIMIT = 0xFEC00000  # the IOAPIC lives here

_MAX_CAPABILITIES = 48


@dataclass(frozen=True)
class PciHeader:
    """The fields of a type-0 config header the driver uses."""

    vendor_id: int
    device_id: int
    command: int
    status: int
    revision_id: int
    class_code: int  # 24 bits: base class, subclass, prog-if
    header_type: int
    subsystem_vendor_id: int
    subsystem_id: int
    capabilities_pointer: int
    interrupt_line: int
    interrupt_pin: int

    @property
    def multifunction(self) -> bool:
        return bool(self.header_type & 0x80)


@dataclass(frozen=True)
class Capability:
    """One entry of the capability list: ``offset`` in config space, ``cap_id``, and the
    raw bytes from ``offset`` to the end of the 256-byte config space (``body[0]`` is
    the id, ``body[1]`` the next pointer)."""

    offset: int
    cap_id: int
    body: bytes


def parse_header(config: bytes) -> PciHeader:
    """Decode the first 64 bytes of config space."""
    if len(config) < 64:
        raise ValueError(f"need 64 bytes of config space, got {len(config)}")
    vendor, device, command, status = struct.unpack_from("<HHHH", config, 0)
    class_word = struct.unpack_from("<I", config, 8)[0]
    subsys_vendor, subsys = struct.unpack_from("<HH", config, SUBSYSTEM_VENDOR_ID)
    return PciHeader(
        vendor_id=vendor,
        device_id=device,
        command=command,
        status=status,
        revision_id=class_word & 0xFF,
        class_code=class_word >> 8,
        header_type=config[HEADER_TYPE],
        subsystem_vendor_id=subsys_vendor,
        subsystem_id=subsys,
        capabilities_pointer=config[CAPABILITIES_POINTER] & 0xFC,
        interrupt_line=config[INTERRUPT_LINE],
        interrupt_pin=config[INTERRUPT_PIN],
    )


def parse_capabilities(config: bytes) -> list[Capability]:
    """Walk the capability list of a 256-byte config space (bounded; see module doc).

    Returns [] when the status register says there is no list.  Raises HardwareError on
    a pointer outside 0x40..0xFC, a loop, or more than 48 entries.
    """
    if len(config) < 256:
        raise ValueError(f"need 256 bytes of config space, got {len(config)}")
    status = struct.unpack_from("<H", config, STATUS)[0]
    if not status & STATUS_CAPABILITIES:
        return []
    caps: list[Capability] = []
    seen: set[int] = set()
    pointer = config[CAPABILITIES_POINTER] & 0xFC
    while pointer:
        if pointer < 0x40 or pointer > 0xFC:
            raise HardwareError(f"PCI capability pointer {pointer:#x} outside 0x40..0xfc")
        if pointer in seen:
            raise HardwareError(f"PCI capability list loops at {pointer:#x}")
        if len(caps) >= _MAX_CAPABILITIES:
            raise HardwareError(f"PCI capability list longer than {_MAX_CAPABILITIES} entries")
        seen.add(pointer)
        caps.append(Capability(pointer, config[pointer], bytes(config[pointer:256])))
        pointer = config[pointer + 1] & 0xFC
    return caps


def bar_size(readback: int, kind: BarKind, is_64bit: bool = False) -> int:
    """Size in bytes of a BAR from the value read back after writing all ones.

    ``readback`` is 32 bits (64 for a 64-bit BAR, upper dword in the high half).
    Returns 0 for an unimplemented BAR.
    """
    if kind is BarKind.IO:
        mask = readback & 0xFFFFFFFC
        width = 0xFFFFFFFF
        if mask and not mask & 0xFFFF0000:
            mask |= 0xFFFF0000  # a device decoding only 16 address bits
    else:
        mask = readback & (0xFFFFFFFFFFFFFFF0 if is_64bit else 0xFFFFFFF0)
        width = 0xFFFFFFFFFFFFFFFF if is_64bit else 0xFFFFFFFF
    if mask == 0:
        return 0
    return ((~mask) & width) + 1


@dataclass
class BarAllocator:
    """Hands out naturally aligned bus addresses (pure; the firmware's job)."""

    next_io: int = IO_BASE
    next_mmio: int = MMIO_BASE
    io_limit: int = IO_LIMIT
    mmio_limit: int = MMIO_LIMIT

    def allocate(self, kind: BarKind, size_bytes: int) -> int:
        if size_bytes <= 0 or size_bytes & (size_bytes - 1):
            raise HardwareError(f"PCI BAR size {size_bytes:#x} is not a power of two")
        if kind is BarKind.IO:
            address = _align(self.next_io, max(size_bytes, 4))
            if address + size_bytes > self.io_limit:
                raise HardwareError(f"no I/O space left for a BAR of {size_bytes:#x} bytes")
            self.next_io = address + size_bytes
        else:
            address = _align(self.next_mmio, max(size_bytes, 0x1000))
            if address + size_bytes > self.mmio_limit:
                raise HardwareError(f"no MMIO space left for a BAR of {size_bytes:#x} bytes")
            self.next_mmio = address + size_bytes
        return address


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass
class PciFunction:
    """A function found on bus 0 (``devfn`` = device << 3 | function)."""

    devfn: int
    header: PciHeader
    capabilities: list[Capability] = field(default_factory=list)
    bars: dict[int, BarInfo] = field(default_factory=dict)

    @property
    def slot(self) -> int:
        return self.devfn >> 3

    @property
    def function(self) -> int:
        return self.devfn & 7

    def capabilities_with_id(self, cap_id: int) -> list[Capability]:
        return [cap for cap in self.capabilities if cap.cap_id == cap_id]


async def read_function(backend: Backend, devfn: int) -> PciFunction | None:
    """Header and capabilities of ``devfn``, or None when no function answers there."""
    vendor = await backend.config_read(devfn, VENDOR_ID, 2)
    if vendor in (0xFFFF, 0x0000):
        return None
    config = await backend.config_read_block(devfn, 0, 256)
    return PciFunction(devfn, parse_header(config), parse_capabilities(config))


async def enumerate_bus(backend: Backend) -> list[PciFunction]:
    """Every function on bus 0, in devfn order."""
    found: list[PciFunction] = []
    for device in range(32):
        first = await read_function(backend, device << 3)
        if first is None:
            continue
        found.append(first)
        if first.header.multifunction:
            for function in range(1, 8):
                other = await read_function(backend, (device << 3) | function)
                if other is not None:
                    found.append(other)
    return found


async def configure_function(
    backend: Backend, function: PciFunction, allocator: BarAllocator | None = None
) -> PciFunction:
    """Size (and with ``backend.assigns_bars`` place) every BAR, then enable I/O, memory
    and bus mastering with INTx enabled.  Fills ``function.bars`` and returns it.
    Raises HardwareError when a BAR cannot be placed.
    """
    devfn = function.devfn
    allocator = allocator or BarAllocator()
    command = await backend.config_read(devfn, COMMAND, 2)
    backend.config_write(devfn, COMMAND, 2, command & ~(COMMAND_IO | COMMAND_MEMORY))
    bars: dict[int, BarInfo] = {}
    index = 0
    while index < 6:
        reg = BAR0 + 4 * index
        original = await backend.config_read(devfn, reg, 4)
        backend.config_write(devfn, reg, 4, 0xFFFFFFFF)
        readback = await backend.config_read(devfn, reg, 4)
        kind = BarKind.IO if original & 1 else BarKind.MEMORY
        is_64 = kind is BarKind.MEMORY and (original & 0x6) == 0x4
        original_hi = 0
        if is_64:
            if index == 5:
                raise HardwareError(f"64-bit BAR in the last BAR slot of {devfn:#x}")
            original_hi = await backend.config_read(devfn, reg + 4, 4)
            backend.config_write(devfn, reg + 4, 4, 0xFFFFFFFF)
            readback |= (await backend.config_read(devfn, reg + 4, 4)) << 32
        size = bar_size(readback, kind, is_64)
        if size == 0:
            backend.config_write(devfn, reg, 4, original)
            if is_64:
                backend.config_write(devfn, reg + 4, 4, original_hi)
        elif backend.assigns_bars:
            address = allocator.allocate(kind, size)
            backend.config_write(devfn, reg, 4, (address & 0xFFFFFFFF) | (original & 0xF))
            if is_64:
                backend.config_write(devfn, reg + 4, 4, address >> 32)
            bars[index] = BarInfo(index, kind, address, size, is_64, bool(original & 0x8))
        else:
            backend.config_write(devfn, reg, 4, original)
            if is_64:
                backend.config_write(devfn, reg + 4, 4, original_hi)
            mask = 0xFFFFFFFC if kind is BarKind.IO else 0xFFFFFFF0
            address = (original & mask) | (original_hi << 32)
            bars[index] = BarInfo(index, kind, address, size, is_64, bool(original & 0x8))
        index += 2 if is_64 else 1
    enable = COMMAND_BUS_MASTER
    if any(bar.kind is BarKind.IO for bar in bars.values()):
        enable |= COMMAND_IO
    if any(bar.kind is BarKind.MEMORY for bar in bars.values()):
        enable |= COMMAND_MEMORY
    backend.config_write(devfn, COMMAND, 2, (command | enable) & ~COMMAND_INTX_DISABLE)
    await backend.sync()
    function.bars = bars
    return function
