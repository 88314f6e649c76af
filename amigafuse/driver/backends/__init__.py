"""Backends the PCI and VirtIO layers run on: QEMU's qtest socket (:mod:`.qtest`), VFIO."""

from amigafuse.driver.backends.base import Backend, BarInfo, BarKind, BarRegion, DmaArena

__all__ = ["Backend", "BarInfo", "BarKind", "BarRegion", "DmaArena"]
