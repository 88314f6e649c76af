"""Pure PCI parsing: header, bounded capability walk, BAR sizing, BAR placement."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.driver.backends.base import BarKind
from amigafuse.driver.pci import (
    IO_BASE,
    MMIO_BASE,
    BarAllocator,
    bar_size,
    parse_capabilities,
    parse_header,
)
from amigafuse.errors import HardwareError


def config_with_caps(chain: list[tuple[int, int, int]]) -> bytearray:
    """256 bytes of config space; ``chain`` = (offset, cap_id, next)."""
    cfg = bytearray(256)
    struct.pack_into("<HHHH", cfg, 0, 0x1AF4, 0x1048, 0x0007, 0x0010)
    cfg[0x34] = chain[0][0] if chain else 0
    for offset, cap_id, nxt in chain:
        cfg[offset] = cap_id
        cfg[offset + 1] = nxt
    return cfg


def test_header_fields() -> None:
    cfg = bytearray(64)
    struct.pack_into("<HHHHI", cfg, 0, 0x1AF4, 0x1004, 0x0403, 0x0010, 0x01000001)
    cfg[0x0E] = 0x80
    struct.pack_into("<HH", cfg, 0x2C, 0x1AF4, 0x0008)
    cfg[0x34] = 0x99  # low two bits are reserved
    cfg[0x3C], cfg[0x3D] = 11, 1
    h = parse_header(bytes(cfg))
    assert (h.vendor_id, h.device_id, h.command, h.status) == (0x1AF4, 0x1004, 0x0403, 0x10)
    assert h.class_code == 0x010000 and h.revision_id == 1
    assert h.multifunction and h.capabilities_pointer == 0x98
    assert (h.subsystem_vendor_id, h.subsystem_id) == (0x1AF4, 8)
    assert (h.interrupt_line, h.interrupt_pin) == (11, 1)
    with pytest.raises(ValueError):
        parse_header(bytes(10))


def test_capability_walk() -> None:
    cfg = config_with_caps([(0x98, 0x11, 0x84), (0x84, 0x09, 0x70), (0x70, 0x09, 0)])
    caps = parse_capabilities(bytes(cfg))
    assert [(c.offset, c.cap_id) for c in caps] == [(0x98, 0x11), (0x84, 9), (0x70, 9)]
    assert caps[1].body[:2] == bytes([9, 0x70]) and len(caps[1].body) == 256 - 0x84


def test_no_capability_list_when_status_says_so() -> None:
    cfg = config_with_caps([(0x40, 0x09, 0)])
    struct.pack_into("<H", cfg, 6, 0)
    assert parse_capabilities(bytes(cfg)) == []


@pytest.mark.parametrize(
    "chain,message",
    [
        ([(0x40, 9, 0x50), (0x50, 9, 0x40)], "loops"),
        ([(0x40, 9, 0x20)], "outside"),
        ([(0x30, 9, 0)], "outside"),
    ],
)
def test_hostile_capability_lists(chain: list[tuple[int, int, int]], message: str) -> None:
    cfg = config_with_caps(chain)
    cfg[0x34] = chain[0][0]
    with pytest.raises(HardwareError, match=message):
        parse_capabilities(bytes(cfg))


@given(st.binary(min_size=256, max_size=256))
def test_any_config_space_ends_in_a_list_or_hardware_error(data: bytes) -> None:
    try:
        caps = parse_capabilities(data)
    except HardwareError:
        return
    offsets = [c.offset for c in caps]
    assert len(set(offsets)) == len(offsets) <= 48
    assert all(0x40 <= o <= 0xFC for o in offsets)


def test_bar_sizes() -> None:
    assert bar_size(0xFFFFFFC1, BarKind.IO) == 0x40
    assert bar_size(0x0000FFC1, BarKind.IO) == 0x40  # decodes only 16 bits
    assert bar_size(0xFFFFF000, BarKind.MEMORY) == 0x1000
    assert bar_size(0xFFFFFFFF_FFFFC00C, BarKind.MEMORY, True) == 0x4000
    assert bar_size(0xFFFFFFFF_0000000C, BarKind.MEMORY, True) == 0x1_0000_0000
    assert bar_size(0, BarKind.MEMORY) == 0 and bar_size(0, BarKind.IO) == 0


def test_allocator_aligns_and_bounds() -> None:
    alloc = BarAllocator()
    assert alloc.allocate(BarKind.IO, 0x40) == IO_BASE
    assert alloc.allocate(BarKind.IO, 0x100) == IO_BASE + 0x100
    assert alloc.allocate(BarKind.MEMORY, 0x1000) == MMIO_BASE
    assert alloc.allocate(BarKind.MEMORY, 0x4000) == MMIO_BASE + 0x4000
    with pytest.raises(HardwareError, match="power of two"):
        alloc.allocate(BarKind.MEMORY, 0x3000)
    with pytest.raises(HardwareError, match="no I/O space"):
        alloc.allocate(BarKind.IO, 0x10000)
