"""The abstract machine the PCI and VirtIO layers drive.

A :class:`Backend` gives the layers above everything they need from "a PCI bus with a
device on it" and nothing more:

* PCI configuration space of bus 0 (``config_read``/``config_write`` by devfn);
* BAR access through :class:`BarRegion` objects (``map_bar``): reads are awaited,
  writes are *posted* (``write`` queues the access and returns at once, in order with
  every other access; ``await backend.sync()`` waits until all of them are done);
* a :class:`DmaArena`: memory the device can DMA to and from, as a writable memoryview
  plus the bus address the device sees for its first byte;
* interrupts: ``wait_interrupt`` sleeps (no polling) until the device's INTx line was
  raised since the last call, ``ack_interrupt`` re-arms it after the driver has read the
  device's ISR (a no-op where the line re-arms by itself, as with qtest).  A backend
  that can may route MSI-X vector 0 to ``wait_interrupt`` instead (``enable_msix``;
  ``interrupt_mode`` then says "msix": one message per event, no ISR read, no ack);
  the default is INTx only;
* death detection: once the backend is gone (QEMU exited, socket closed, VFIO device
  lost) every pending and future operation raises
  :class:`~amigafuse.errors.DeviceGone` with a message that says why.

Whether the layer above must act as firmware (size and place BARs, enable decoding) is
``assigns_bars``: true for qtest (nobody else configured the fresh QEMU machine), false
for VFIO (the host kernel placed the BARs; they are accessed by index).

Backends are used from one trio task at a time per operation, but many tasks may issue
operations concurrently: implementations keep the order in which operations were
*issued* (a posted write issued before a read is performed before it).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass


class BarKind(enum.Enum):
    IO = "io"
    MEMORY = "memory"


@dataclass
class DmaArena:
    """Memory shared with the device.

    ``view`` is a writable memoryview of ``size_bytes`` bytes; byte ``i`` of it is at bus
    address ``bus_address + i`` for the device.  Owned by the backend: valid until the
    backend is closed.
    """

    view: memoryview
    bus_address: int

    @property
    def size_bytes(self) -> int:
        return len(self.view)


@dataclass(frozen=True)
class BarInfo:
    """One implemented BAR of a PCI function, as sized (and placed) by the PCI layer.

    ``address`` is the bus address it decodes (meaningful when the backend
    ``assigns_bars``); ``index`` is the BAR register number 0..5 (a 64-bit BAR takes
    ``index`` and ``index + 1``).
    """

    index: int
    kind: BarKind
    address: int
    size_bytes: int
    is_64bit: bool = False
    prefetchable: bool = False


class BarRegion(abc.ABC):
    """One mapped BAR of one PCI function.  Offsets are relative to the BAR start."""

    kind: BarKind
    size_bytes: int

    def _check(self, offset: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"access size {size} is not 1, 2, 4 or 8")
        if offset < 0 or offset + size > self.size_bytes:
            raise ValueError(
                f"access at offset {offset:#x} size {size} outside BAR of {self.size_bytes:#x} bytes"
            )

    @abc.abstractmethod
    async def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes (little-endian) at ``offset``.  Raises DeviceGone."""

    @abc.abstractmethod
    def write(self, offset: int, size: int, value: int) -> None:
        """Post a ``size``-byte little-endian write; returns without waiting.

        Raises DeviceGone at once if the backend is already known to be dead; a failure
        discovered later is reported by the next awaited operation.
        """


class Backend(abc.ABC):
    """See the module docstring for the contract."""

    #: True when the layer above must size and assign BARs and enable decoding.
    assigns_bars: bool = True
    #: Set while a virtio-scsi controller drives this backend (one at a time).
    _virtio_scsi_claimed: bool = False

    @property
    @abc.abstractmethod
    def arena(self) -> DmaArena:
        """The DMA arena (see :class:`DmaArena`)."""

    @property
    @abc.abstractmethod
    def dead(self) -> bool:
        """True once the backend is gone; every operation then raises DeviceGone."""

    @abc.abstractmethod
    def gone_error(self) -> Exception:
        """The DeviceGone (with the reason) that operations raise once ``dead``."""

    # --------------------------------------------------------------- PCI config space

    @abc.abstractmethod
    async def config_read(self, devfn: int, offset: int, size: int) -> int:
        """Read ``size`` (1, 2, 4) bytes of bus 0 function ``devfn``'s config space."""

    @abc.abstractmethod
    def config_write(self, devfn: int, offset: int, size: int, value: int) -> None:
        """Post a config-space write (ordered before every later operation)."""

    async def config_read_block(self, devfn: int, offset: int, length: int) -> bytes:
        """Read ``length`` bytes of config space (dword aligned); backends may pipeline."""
        if offset % 4 or length % 4:
            raise ValueError("config_read_block needs dword-aligned offset and length")
        out = bytearray()
        for off in range(offset, offset + length, 4):
            out += (await self.config_read(devfn, off, 4)).to_bytes(4, "little")
        return bytes(out)

    # --------------------------------------------------------------- BARs

    @abc.abstractmethod
    def map_bar(self, devfn: int, bar: BarInfo) -> BarRegion:
        """A :class:`BarRegion` for ``bar`` of ``devfn``.

        ``bar`` comes from :func:`amigafuse.driver.pci.configure_function`, which (with
        ``assigns_bars``) also placed it and enabled decoding.
        """

    # --------------------------------------------------------------- ordering

    @abc.abstractmethod
    async def sync(self) -> None:
        """Return once every operation issued before the call has been performed."""

    def flush_posted(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Hint: start performing buffered posted writes now rather than batching them
        with later operations (a latency-critical kick).  Never blocks."""

    # --------------------------------------------------------------- interrupts

    @abc.abstractmethod
    async def enable_interrupts(self, devfn: int) -> None:
        """Route ``devfn``'s INTx to :meth:`wait_interrupt` (switching MSI-X off first if
        :meth:`enable_msix` had turned it on)."""

    async def enable_msix(self, devfn: int) -> bool:
        """Route MSI-X vector 0 of ``devfn`` to :meth:`wait_interrupt` instead of INTx,
        if the backend and the function can; returns whether it did.

        After True, :attr:`interrupt_mode` is "msix" and the caller must make the device
        signal its events on vector 0 (VirtIO: ``queue_msix_vector``), or call
        :meth:`enable_interrupts` to fall back to INTx.  The default (qtest) is False:
        INTx only.  Raises DeviceGone when the backend is dead.
        """
        return False

    @property
    def interrupt_mode(self) -> str:
        """"intx" (a level: read the device's ISR, then :meth:`ack_interrupt`) or "msix"
        (one message per event: no ISR read, nothing to ack)."""
        return "intx"

    @abc.abstractmethod
    async def wait_interrupt(self) -> None:
        """Sleep until the INTx line was raised since the previous call returned.

        Raises DeviceGone when the backend dies while waiting.  Cancellation is safe: a
        raise that was not consumed stays pending for the next call.
        """

    def ack_interrupt(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Re-arm the interrupt after the device's ISR was read (VFIO INTx unmask)."""

    @property
    def interrupt_count(self) -> int:
        """How many interrupts were delivered so far (for statistics)."""
        return 0

    # --------------------------------------------------------------- life cycle

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the device and everything the backend owns.  Idempotent."""
