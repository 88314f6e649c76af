"""VirtIO PCI transports: legacy (I/O BAR0 registers) and modern (capabilities, MMIO).

Both present one interface, :class:`VirtioTransport`, to :mod:`.device` and
:mod:`.scsi`.  Register reads are awaited; register writes are posted through the
backend (they happen in issue order; ``await transport.backend.sync()`` waits for them).

* Legacy (virtio 1.x §4.1.4.8; device ids 0x1000-0x103F, virtio-scsi 0x1004): BAR0 I/O
  ports: device features (32 bits) at 0x00, driver features 0x04, queue PFN 0x08 (ring
  address >> 12, one contiguous 4096-aligned area), queue size 0x0C (fixed by the
  device), queue select 0x0E, queue notify 0x10, status 0x12, ISR 0x13, device config at
  0x14 — or, while MSI-X is enabled (:meth:`VirtioTransport.set_msix`), the config
  vector at 0x14, the selected queue's vector at 0x16 and the device config at 0x18.
  Guest-endian = little.
* Modern (virtio 1.x §4.1.4; device id 0x1040 + type, virtio-scsi 0x1048): vendor
  capabilities (id 0x09) name BAR/offset/length of the COMMON, NOTIFY, ISR and DEVICE
  configuration structures.  64-bit fields are written as two 32-bit halves.
"""

from __future__ import annotations

import abc
import struct

import trio

from amigafuse.driver.backends.base import Backend, BarKind, BarRegion
from amigafuse.driver.pci import CAP_ID_VENDOR, Capability, PciFunction
from amigafuse.driver.virtio.ring import RingLayout
from amigafuse.errors import HardwareError

VIRTIO_PCI_VENDOR = 0x1AF4

# virtio_pci_cap cfg_type values
CAP_COMMON_CFG = 1
CAP_NOTIFY_CFG = 2
CAP_ISR_CFG = 3
CAP_DEVICE_CFG = 4
CAP_PCI_CFG = 5

# legacy register offsets (BAR0)
LEGACY_DEVICE_FEATURES = 0x00
LEGACY_DRIVER_FEATURES = 0x04
LEGACY_QUEUE_PFN = 0x08
LEGACY_QUEUE_SIZE = 0x0C
LEGACY_QUEUE_SELECT = 0x0E
LEGACY_QUEUE_NOTIFY = 0x10
LEGACY_STATUS = 0x12
LEGACY_ISR = 0x13
LEGACY_CONFIG = 0x14
LEGACY_MSIX_CONFIG_VECTOR = 0x14  # these two only while MSI-X is enabled,
LEGACY_MSIX_QUEUE_VECTOR = 0x16  # which moves the device config to 0x18
LEGACY_CONFIG_MSIX = 0x18
LEGACY_QUEUE_ALIGN = 4096

# modern common configuration offsets
COMMON_DEVICE_FEATURE_SELECT = 0x00
COMMON_DEVICE_FEATURE = 0x04
COMMON_DRIVER_FEATURE_SELECT = 0x08
COMMON_DRIVER_FEATURE = 0x0C
COMMON_MSIX_CONFIG = 0x10
COMMON_NUM_QUEUES = 0x12
COMMON_DEVICE_STATUS = 0x14
COMMON_CONFIG_GENERATION = 0x15
COMMON_QUEUE_SELECT = 0x16
COMMON_QUEUE_SIZE = 0x18
COMMON_QUEUE_MSIX_VECTOR = 0x1A
COMMON_QUEUE_ENABLE = 0x1C
COMMON_QUEUE_NOTIFY_OFF = 0x1E
COMMON_QUEUE_DESC = 0x20
COMMON_QUEUE_DRIVER = 0x28
COMMON_QUEUE_DEVICE = 0x30
COMMON_CFG_MIN_LENGTH = 0x38

VIRTIO_MSI_NO_VECTOR = 0xFFFF


class VirtioTransport(abc.ABC):
    """Register access to one virtio PCI function (see module docstring)."""

    kind: str
    backend: Backend
    function: PciFunction
    #: Whether the function's MSI-X is enabled (the backend turned it on); see set_msix.
    msix_enabled: bool = False

    def set_msix(self, enabled: bool) -> None:
        """Tell the transport that the backend turned the function's MSI-X on (or off):
        the legacy register layout depends on it.  Queues are then given vectors in
        :meth:`setup_queue`."""
        self.msix_enabled = enabled

    @abc.abstractmethod
    async def get_status(self) -> int: ...

    @abc.abstractmethod
    def set_status(self, status: int) -> None: ...

    @abc.abstractmethod
    async def reset(self) -> None:
        """Write status 0 and wait (bounded, 2 s) until the device reads back 0."""

    @abc.abstractmethod
    async def device_features(self) -> int:
        """The feature bits the device offers (64 bits modern, 32 legacy)."""

    @abc.abstractmethod
    def set_driver_features(self, features: int) -> None: ...

    @abc.abstractmethod
    async def queue_max_size(self, index: int) -> int:
        """Size the device offers for queue ``index`` (0: queue not available)."""

    @property
    @abc.abstractmethod
    def queue_size_fixed(self) -> bool:
        """Legacy devices dictate the queue size; modern ones accept any power of two
        up to the maximum."""

    @abc.abstractmethod
    async def setup_queue(
        self,
        index: int,
        size: int,
        desc_address: int,
        avail_address: int,
        used_address: int,
        msix_vector: int = VIRTIO_MSI_NO_VECTOR,
    ) -> int:
        """Give the device queue ``index``'s three ring parts and enable it.  Legacy
        needs them as one contiguous 4096-aligned legacy layout starting at
        ``desc_address``; raises HardwareError otherwise.

        With MSI-X enabled, the queue signals on ``msix_vector``; returns the vector the
        device took (read back: VIRTIO_MSI_NO_VECTOR when it refused, and always
        without MSI-X)."""

    @abc.abstractmethod
    def notify(self, index: int) -> None:
        """Post a queue notification (a kick)."""

    @abc.abstractmethod
    async def read_isr(self) -> int:
        """Read (and so clear) the ISR status; deasserts INTx."""

    @abc.abstractmethod
    async def config_read(self, offset: int, size: int) -> int:
        """Read the device-specific configuration (little-endian on both transports)."""

    @abc.abstractmethod
    def config_write(self, offset: int, size: int, value: int) -> None: ...

    async def _wait_reset(self) -> None:
        with trio.move_on_after(2.0):
            while await self.get_status() != 0:
                await trio.sleep(0.001)
            return
        raise HardwareError(f"virtio {self.kind} device did not finish its reset within 2 s")


class _Window:
    """A sub-range of a BAR: offsets checked against the capability's length."""

    def __init__(self, region: BarRegion, offset: int, length: int, what: str) -> None:
        if offset < 0 or length <= 0 or offset + length > region.size_bytes:
            raise HardwareError(
                f"virtio {what} structure at {offset:#x}+{length:#x} lies outside its BAR "
                f"of {region.size_bytes:#x} bytes"
            )
        self.region = region
        self.offset = offset
        self.length = length
        self.what = what

    def _check(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.length:
            raise HardwareError(
                f"access at {offset:#x} size {size} outside the virtio {self.what} structure"
                f" of {self.length:#x} bytes"
            )
        return self.offset + offset

    async def read(self, offset: int, size: int) -> int:
        return await self.region.read(self._check(offset, size), size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.region.write(self._check(offset, size), size, value)


class LegacyTransport(VirtioTransport):
    kind = "legacy"

    def __init__(self, backend: Backend, function: PciFunction) -> None:
        bar = function.bars.get(0)
        if bar is None or bar.kind is not BarKind.IO:
            raise HardwareError("virtio legacy transport needs an I/O BAR0; the device has none")
        self.backend = backend
        self.function = function
        self.regs = backend.map_bar(function.devfn, bar)
        self._queue_sizes: dict[int, int] = {}

    async def get_status(self) -> int:
        return await self.regs.read(LEGACY_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.regs.write(LEGACY_STATUS, 1, status)

    async def reset(self) -> None:
        self.set_status(0)
        await self._wait_reset()

    async def device_features(self) -> int:
        return await self.regs.read(LEGACY_DEVICE_FEATURES, 4)

    def set_driver_features(self, features: int) -> None:
        if features >> 32:
            raise HardwareError(f"legacy virtio cannot take feature bits above 31: {features:#x}")
        self.regs.write(LEGACY_DRIVER_FEATURES, 4, features)

    async def queue_max_size(self, index: int) -> int:
        self.regs.write(LEGACY_QUEUE_SELECT, 2, index)
        size = await self.regs.read(LEGACY_QUEUE_SIZE, 2)
        self._queue_sizes[index] = size
        return size

    @property
    def queue_size_fixed(self) -> bool:
        return True

    async def setup_queue(
        self,
        index: int,
        size: int,
        desc_address: int,
        avail_address: int,
        used_address: int,
        msix_vector: int = VIRTIO_MSI_NO_VECTOR,
    ) -> int:
        layout = RingLayout.contiguous(size, LEGACY_QUEUE_ALIGN)
        if (
            desc_address % LEGACY_QUEUE_ALIGN
            or avail_address != desc_address + layout.avail_offset
            or used_address != desc_address + layout.used_offset
        ):
            raise HardwareError("legacy virtio queues need the contiguous 4096-aligned layout")
        device_size = self._queue_sizes.get(index) or await self.queue_max_size(index)
        if size != device_size:
            raise HardwareError(f"legacy queue {index} has size {device_size}, not {size}")
        pfn = desc_address // LEGACY_QUEUE_ALIGN
        if pfn >> 32:
            raise HardwareError(f"legacy virtio queue address {desc_address:#x} above 16 TiB")
        self.regs.write(LEGACY_QUEUE_SELECT, 2, index)
        self.regs.write(LEGACY_QUEUE_PFN, 4, pfn)
        if not self.msix_enabled:
            await self.backend.sync()
            return VIRTIO_MSI_NO_VECTOR
        # As Linux's legacy driver: the vector after the PFN, read back to see it taken.
        self.regs.write(LEGACY_MSIX_QUEUE_VECTOR, 2, msix_vector)
        return await self.regs.read(LEGACY_MSIX_QUEUE_VECTOR, 2)

    def notify(self, index: int) -> None:
        self.regs.write(LEGACY_QUEUE_NOTIFY, 2, index)

    async def read_isr(self) -> int:
        return await self.regs.read(LEGACY_ISR, 1)

    @property
    def _config_base(self) -> int:
        return LEGACY_CONFIG_MSIX if self.msix_enabled else LEGACY_CONFIG

    async def config_read(self, offset: int, size: int) -> int:
        return await self.regs.read(self._config_base + offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.regs.write(self._config_base + offset, size, value)


def parse_virtio_capability(cap: Capability) -> tuple[int, int, int, int, int]:
    """(cfg_type, bar, offset, length, notify_off_multiplier) of a vendor capability
    (pure; the multiplier is 0 unless cfg_type is NOTIFY).  Raises HardwareError when
    the capability is too short."""
    body = cap.body
    cap_len = body[2] if len(body) > 2 else 0
    if cap_len < 16 or len(body) < 16:
        raise HardwareError(f"virtio PCI capability at {cap.offset:#x} is {cap_len} bytes, < 16")
    cfg_type, bar = body[3], body[4]
    offset, length = struct.unpack_from("<II", body, 8)
    multiplier = 0
    if cfg_type == CAP_NOTIFY_CFG:
        if cap_len < 20 or len(body) < 20:
            raise HardwareError(f"virtio notify capability at {cap.offset:#x} is too short")
        multiplier = struct.unpack_from("<I", body, 16)[0]
    return cfg_type, bar, offset, length, multiplier


class ModernTransport(VirtioTransport):
    kind = "modern"

    def __init__(self, backend: Backend, function: PciFunction) -> None:
        self.backend = backend
        self.function = function
        found: dict[int, tuple[int, int, int, int]] = {}
        for cap in function.capabilities_with_id(CAP_ID_VENDOR):
            cfg_type, bar, offset, length, multiplier = parse_virtio_capability(cap)
            # the first capability of each type is the preferred one (spec 4.1.4)
            if cfg_type in (CAP_COMMON_CFG, CAP_NOTIFY_CFG, CAP_ISR_CFG, CAP_DEVICE_CFG):
                found.setdefault(cfg_type, (bar, offset, length, multiplier))
        missing = [
            name
            for name, t in (("COMMON", 1), ("NOTIFY", 2), ("ISR", 3), ("DEVICE", 4))
            if t not in found
        ]
        if missing:
            raise HardwareError(
                f"virtio device at {function.devfn:#x} lacks modern capabilities {', '.join(missing)}"
            )
        regions: dict[int, BarRegion] = {}

        def window(cfg_type: int, what: str) -> _Window:
            bar, offset, length, _ = found[cfg_type]
            info = function.bars.get(bar)
            if info is None:
                raise HardwareError(f"virtio {what} capability names unimplemented BAR {bar}")
            if bar not in regions:
                regions[bar] = backend.map_bar(function.devfn, info)
            return _Window(regions[bar], offset, length, what)

        self.common = window(CAP_COMMON_CFG, "common")
        if self.common.length < COMMON_CFG_MIN_LENGTH:
            raise HardwareError(
                f"virtio common structure of {self.common.length} bytes is too short"
            )
        self.notify_window = window(CAP_NOTIFY_CFG, "notify")
        self.notify_multiplier = found[CAP_NOTIFY_CFG][3]
        self.isr = window(CAP_ISR_CFG, "ISR")
        self.device_cfg = window(CAP_DEVICE_CFG, "device")
        self._notify_offsets: dict[int, int] = {}

    async def get_status(self) -> int:
        return await self.common.read(COMMON_DEVICE_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.common.write(COMMON_DEVICE_STATUS, 1, status)

    async def reset(self) -> None:
        self.set_status(0)
        await self._wait_reset()

    async def device_features(self) -> int:
        self.common.write(COMMON_DEVICE_FEATURE_SELECT, 4, 0)
        low = await self.common.read(COMMON_DEVICE_FEATURE, 4)
        self.common.write(COMMON_DEVICE_FEATURE_SELECT, 4, 1)
        high = await self.common.read(COMMON_DEVICE_FEATURE, 4)
        return low | (high << 32)

    def set_driver_features(self, features: int) -> None:
        self.common.write(COMMON_DRIVER_FEATURE_SELECT, 4, 0)
        self.common.write(COMMON_DRIVER_FEATURE, 4, features & 0xFFFFFFFF)
        self.common.write(COMMON_DRIVER_FEATURE_SELECT, 4, 1)
        self.common.write(COMMON_DRIVER_FEATURE, 4, (features >> 32) & 0xFFFFFFFF)

    async def queue_max_size(self, index: int) -> int:
        self.common.write(COMMON_QUEUE_SELECT, 2, index)
        return await self.common.read(COMMON_QUEUE_SIZE, 2)

    @property
    def queue_size_fixed(self) -> bool:
        return False

    async def setup_queue(
        self,
        index: int,
        size: int,
        desc_address: int,
        avail_address: int,
        used_address: int,
        msix_vector: int = VIRTIO_MSI_NO_VECTOR,
    ) -> int:
        maximum = await self.queue_max_size(index)
        if maximum == 0:
            raise HardwareError(f"virtio queue {index} is not available")
        if size > maximum:
            raise HardwareError(f"virtio queue {index}: size {size} > device maximum {maximum}")
        c = self.common
        c.write(COMMON_QUEUE_SIZE, 2, size)
        vector = msix_vector if self.msix_enabled else VIRTIO_MSI_NO_VECTOR
        c.write(COMMON_QUEUE_MSIX_VECTOR, 2, vector)
        if vector != VIRTIO_MSI_NO_VECTOR:  # read back: the device may refuse it
            vector = await c.read(COMMON_QUEUE_MSIX_VECTOR, 2)
        for offset, address in (
            (COMMON_QUEUE_DESC, desc_address),
            (COMMON_QUEUE_DRIVER, avail_address),
            (COMMON_QUEUE_DEVICE, used_address),
        ):
            c.write(offset, 4, address & 0xFFFFFFFF)
            c.write(offset + 4, 4, address >> 32)
        notify_off = await c.read(COMMON_QUEUE_NOTIFY_OFF, 2)
        byte_offset = notify_off * self.notify_multiplier
        if byte_offset + 2 > self.notify_window.length:
            raise HardwareError(
                f"virtio queue {index} notify offset {byte_offset:#x} outside the notify structure"
            )
        self._notify_offsets[index] = byte_offset
        c.write(COMMON_QUEUE_ENABLE, 2, 1)
        await self.backend.sync()
        return vector

    def notify(self, index: int) -> None:
        self.notify_window.write(self._notify_offsets[index], 2, index)

    async def read_isr(self) -> int:
        return await self.isr.read(0, 1)

    async def config_read(self, offset: int, size: int) -> int:
        if size == 8:
            low = await self.device_cfg.read(offset, 4)
            return low | (await self.device_cfg.read(offset + 4, 4)) << 32
        return await self.device_cfg.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.device_cfg.write(offset, size, value)


def has_modern_capabilities(function: PciFunction) -> bool:
    for cap in function.capabilities_with_id(CAP_ID_VENDOR):
        if len(cap.body) > 3 and cap.body[3] == CAP_COMMON_CFG:
            return True
    return False


def open_transport(backend: Backend, function: PciFunction, kind: str = "auto") -> VirtioTransport:
    """The transport for ``function``: "legacy", "modern", or "auto" (legacy for a
    transitional device id 0x1000-0x103F, as AmigaOne boards use it; modern for
    0x1040 and up).  Raises HardwareError when the asked transport is not there."""
    device_id = function.header.device_id
    if kind == "auto":
        kind = "legacy" if 0x1000 <= device_id <= 0x103F else "modern"
    if kind == "legacy":
        if not 0x1000 <= device_id <= 0x103F:
            raise HardwareError(
                f"device {device_id:#06x} is modern-only (no legacy interface); use transport 'modern'"
            )
        return LegacyTransport(backend, function)
    if kind == "modern":
        return ModernTransport(backend, function)
    raise ValueError(f"transport must be 'auto', 'legacy' or 'modern', not {kind!r}")
