"""Pure parts of the VFIO backend and of bind-vfio: no kernel, no guest."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from amigafuse.commands import vfio as vfio_cmd
from amigafuse.driver.backends import vfio
from amigafuse.errors import Busy, DeviceError, NotAvailable, UsageError


def test_ioctl_numbers_match_the_brief() -> None:
    # BRIEF §4: 0x3B00 | nr.
    expected = {
        "VFIO_GET_API_VERSION": 0x3B64,
        "VFIO_CHECK_EXTENSION": 0x3B65,
        "VFIO_SET_IOMMU": 0x3B66,
        "VFIO_GROUP_GET_STATUS": 0x3B67,
        "VFIO_GROUP_SET_CONTAINER": 0x3B68,
        "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
        "VFIO_DEVICE_GET_INFO": 0x3B6B,
        "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C,
        "VFIO_DEVICE_GET_IRQ_INFO": 0x3B6D,
        "VFIO_DEVICE_SET_IRQS": 0x3B6E,
        "VFIO_DEVICE_RESET": 0x3B6F,
        "VFIO_IOMMU_GET_INFO": 0x3B70,
        "VFIO_IOMMU_MAP_DMA": 0x3B71,
        "VFIO_IOMMU_UNMAP_DMA": 0x3B72,
    }
    for name, number in expected.items():
        assert getattr(vfio, name) == number, name


def test_struct_sizes_match_linux_vfio_h() -> None:
    assert vfio.REGION_INFO.size == 32
    assert vfio.DEVICE_INFO.size == 24
    assert vfio.IRQ_INFO.size == 16
    assert vfio.IRQ_SET_HEADER.size == 20
    assert vfio.DMA_MAP.size == 32
    assert vfio.DMA_UNMAP.size == 24
    assert vfio.IOMMU_INFO.size == 24


@pytest.mark.parametrize(
    ("text", "norm", "devfn"),
    [
        ("0000:00:04.0", "0000:00:04.0", 0x20),
        ("00:04.0", "0000:00:04.0", 0x20),
        ("0000:3A:1F.7", "0000:3a:1f.7", 0xFF),
        (" 0001:02:03.1 ", "0001:02:03.1", 0x19),
    ],
)
def test_parse_bdf(text: str, norm: str, devfn: int) -> None:
    assert vfio.parse_bdf(text) == norm
    assert vfio.devfn_of(norm) == devfn


@pytest.mark.parametrize("bad", ["", "04.0", "0000:00:20.0", "0000:00:04.8", "vfio:0000:00:04.0", "zz:00.0"])
def test_parse_bdf_rejects(bad: str) -> None:
    with pytest.raises(UsageError, match=r"DOMAIN:BUS:DEVICE\.FUNCTION"):
        vfio.parse_bdf(bad)


def _iommu_info(ranges: list[tuple[int, int]], *, cap_offset: int = 24, next_offset: int = 0) -> bytes:
    cap = vfio.CAP_HEADER.pack(vfio.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, next_offset)
    cap += vfio.IOVA_RANGE_HEADER.pack(len(ranges), 0)
    cap += b"".join(vfio.IOVA_RANGE.pack(s, e) for s, e in ranges)
    total = cap_offset + len(cap)
    head = vfio.IOMMU_INFO.pack(total, vfio.VFIO_IOMMU_INFO_CAPS | vfio.VFIO_IOMMU_INFO_PGSIZES, 0x1000, cap_offset, 0)
    return head.ljust(cap_offset, b"\0") + cap


def test_parse_iova_ranges_and_choice() -> None:
    q35 = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]
    assert vfio.parse_iova_ranges(_iommu_info(q35)) == q35
    assert vfio.choose_iova(q35, 32 << 20) == vfio.PREFERRED_IOVA
    # Preferred address not usable: lowest fitting page-aligned address >= 1 MiB.
    assert vfio.choose_iova([(0x2000_0000, 0x3FFF_FFFF)], 1 << 20) == 0x2000_0000
    assert vfio.choose_iova([(0, 0xFFFFF), (0x123456, 0x0FFFFFFF)], 1 << 20) == 0x124000
    assert vfio.choose_iova([], 4096) == vfio.PREFERRED_IOVA
    with pytest.raises(NotAvailable, match="no free IOVA range"):
        vfio.choose_iova([(0x1000, 0x1FFF)], 1 << 20)


def test_parse_iova_ranges_distrusts_the_reply() -> None:
    no_caps = vfio.IOMMU_INFO.pack(24, vfio.VFIO_IOMMU_INFO_PGSIZES, 0x1000, 0, 0)
    assert vfio.parse_iova_ranges(no_caps) == []
    looping = _iommu_info([(0, 0xFFFF)], next_offset=24)
    with pytest.raises(DeviceError, match="bad capability offset"):
        vfio.parse_iova_ranges(looping)
    truncated = _iommu_info([(0, 0xFFFF), (0x10000, 0x1FFFF)])[:-8]
    truncated = vfio.IOMMU_INFO.pack(len(truncated), vfio.VFIO_IOMMU_INFO_CAPS, 0, 24, 0) + truncated[24:]
    with pytest.raises(DeviceError, match="overrun"):
        vfio.parse_iova_ranges(truncated)
    outside = vfio.IOMMU_INFO.pack(24, vfio.VFIO_IOMMU_INFO_CAPS, 0, 4000, 0)
    with pytest.raises(DeviceError, match="bad capability offset"):
        vfio.parse_iova_ranges(outside)


def test_irq_set_layout() -> None:
    buf = vfio.irq_set(
        vfio.VFIO_IRQ_SET_DATA_EVENTFD | vfio.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, 1, struct.pack("<i", 9)
    )
    assert struct.unpack("<IIIIIi", buf) == (24, 0x24, 0, 0, 1, 9)


def test_bind_commands_name_the_device() -> None:
    text = vfio.bind_commands("0000:00:04.0")
    assert "echo vfio-pci > /sys/bus/pci/devices/0000:00:04.0/driver_override" in text
    assert "amigafuse bind-vfio 0000:00:04.0" in text


def test_backend_refuses_unknown_device() -> None:
    backend = vfio.VfioBackend("0000:7f:1f.7")
    with pytest.raises(UsageError, match=r"no PCI device 0000:7f:1f\.7"):
        backend._open(1 << 20)
    backend._release()
    assert backend.dead


def test_mounted_disks_block_binding(tmp_path: Path) -> None:
    dev = tmp_path / "bus/pci/devices/0000:00:04.0"
    (dev / "virtio2/host0/target0:0:0/0:0:0:0/block/sda/sda1").mkdir(parents=True)
    group = tmp_path / "kernel/iommu_groups/3"
    (group / "devices").mkdir(parents=True)
    (dev / "iommu_group").symlink_to(group)
    assert vfio_cmd.block_devices_under(dev) == ["sda", "sda1"]
    mounts = "/dev/sda1 /mnt/amiga affs rw 0 0\n/dev/vda / ext4 rw 0 0\n"
    assert vfio_cmd.mounted_among(["sda", "sda1"], mounts) == ["/dev/sda1 on /mnt/amiga"]
    with pytest.raises(Busy, match="unmount them"):
        vfio_cmd.bind("0000:00:04.0", sysfs=tmp_path, mounts_text=mounts)


def test_bind_without_iommu_group_says_enable_iommu(tmp_path: Path) -> None:
    (tmp_path / "bus/pci/devices/0000:00:04.0").mkdir(parents=True)
    with pytest.raises(NotAvailable, match="intel_iommu=on"):
        vfio_cmd.bind("0000:00:04.0", sysfs=tmp_path, mounts_text="")
    with pytest.raises(UsageError, match=r"no PCI device 0000:00:05\.0"):
        vfio_cmd.bind("0000:00:05.0", sysfs=tmp_path, mounts_text="")


def _config_with_caps(caps: list[tuple[int, bytes]], status_caps: bool = True) -> bytearray:
    cfg = bytearray(256)
    cfg[0:2] = (0x1AF4).to_bytes(2, "little")
    cfg[6] = 0x10 if status_caps else 0
    cfg[0x34] = caps[0][0] if caps else 0
    for i, (ptr, body) in enumerate(caps):
        nxt = caps[i + 1][0] if i + 1 < len(caps) else 0
        cfg[ptr : ptr + 1 + len(body)] = bytes([body[0], nxt]) + body[1:]
    return cfg


def _virtio_cap(cfg_type: int, bar: int, offset: int) -> bytes:
    # cap_vndr, (cap_next filled in), cap_len, cfg_type, bar, id, padding[2], offset, length
    return bytes([0x09, 16, cfg_type, bar, 0, 0, 0]) + offset.to_bytes(4, "little") + (0x1000).to_bytes(4, "little")


def test_find_common_cfg_walks_the_capability_list() -> None:
    msix = bytes([0x11]) + bytes(10)
    cfg = _config_with_caps([(0x98, msix), (0x84, _virtio_cap(3, 4, 0x1000)), (0x70, _virtio_cap(1, 4, 0x0))])
    assert vfio.find_common_cfg(bytes(cfg)) == (4, 0)
    assert vfio.find_common_cfg(bytes(_config_with_caps([(0x98, msix)]))) is None
    assert vfio.find_common_cfg(bytes(_config_with_caps([(0x70, _virtio_cap(1, 0, 0))], status_caps=False))) is None


def test_find_common_cfg_distrusts_the_device() -> None:
    loop = _config_with_caps([(0x40, bytes([0x11]) + bytes(10))])
    loop[0x41] = 0x40
    with pytest.raises(DeviceError, match="loops"):
        vfio.find_common_cfg(bytes(loop))
    wild = _config_with_caps([(0x40, bytes([0x11]) + bytes(10))])
    wild[0x41] = 0xFC
    with pytest.raises(DeviceError, match="out of range"):
        vfio.find_common_cfg(bytes(wild))
    bad_bar = _config_with_caps([(0x70, _virtio_cap(1, 7, 0))])
    with pytest.raises(DeviceError, match="BAR 7"):
        vfio.find_common_cfg(bytes(bad_bar))


# --------------------------------------------------------------------------- interrupts
# The interrupt path on real eventfds (the kernel's side of VFIO is not needed for it).


def _backend_with_eventfds(
    req: bool = True, index: int = vfio.VFIO_PCI_INTX_IRQ_INDEX
) -> vfio.VfioBackend:
    import os

    backend = vfio.VfioBackend("0000:00:04.0")
    backend._irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    if req:
        backend._req_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    backend._irq_index = index
    return backend


@pytest.mark.parametrize(
    ("index", "mode"),
    [(vfio.VFIO_PCI_INTX_IRQ_INDEX, "intx"), (vfio.VFIO_PCI_MSIX_IRQ_INDEX, "msix")],
)
async def test_wait_interrupt_sleeps_until_the_eventfd_fires(index: int, mode: str) -> None:
    import os

    import trio

    backend = _backend_with_eventfds(index=index)
    assert backend.interrupt_mode == mode
    try:
        with trio.move_on_after(0.2) as scope:
            await backend.wait_interrupt()
        assert scope.cancelled_caught  # nothing fired: it slept
        async with trio.open_nursery() as nursery:

            async def fire() -> None:
                await trio.sleep(0.05)
                os.eventfd_write(backend._irq_fd, 1)

            nursery.start_soon(fire)
            with trio.fail_after(5):
                await backend.wait_interrupt()
        assert backend.interrupt_count == 1
        # Two raises before a wait coalesce into one interrupt (a level-triggered line).
        os.eventfd_write(backend._irq_fd, 1)
        os.eventfd_write(backend._irq_fd, 1)
        await backend.wait_interrupt()
        with trio.move_on_after(0.1) as scope:
            await backend.wait_interrupt()
        assert scope.cancelled_caught
        assert backend.interrupt_count == 2
    finally:
        backend._release()


async def test_cancelled_wait_keeps_the_interrupt_pending() -> None:
    import os

    import trio

    backend = _backend_with_eventfds()
    try:
        os.eventfd_write(backend._irq_fd, 1)
        with trio.CancelScope() as scope:
            scope.cancel()
            await backend.wait_interrupt()  # consumes the counter, then is cancelled
        assert scope.cancelled_caught
        assert backend._irq_pending
        with trio.fail_after(1):
            await backend.wait_interrupt()  # the interrupt was not lost
        assert not backend._irq_pending
    finally:
        backend._release()


async def test_req_eventfd_ends_waits_with_device_gone() -> None:
    import os

    import trio

    from amigafuse.errors import DeviceGone

    backend = _backend_with_eventfds()
    try:
        async with trio.open_nursery() as nursery:

            async def request_device_back() -> None:
                await trio.sleep(0.05)
                os.eventfd_write(backend._req_fd, 1)

            nursery.start_soon(request_device_back)
            with trio.fail_after(5), pytest.raises(DeviceGone, match="asked for the device back"):
                await backend.wait_interrupt()
        assert backend.dead
        with pytest.raises(DeviceGone):
            await backend.config_read(backend.devfn, 0, 2)
        with pytest.raises(DeviceGone):
            backend.config_write(backend.devfn, 4, 2, 0)
        assert await backend.config_read(0, 0, 2) == 0xFFFF  # other devfns: no device
        backend.ack_interrupt()  # a no-op once dead, never raises
    finally:
        backend._release()
    assert backend._irq_fd == -1 and backend._req_fd == -1
    with pytest.raises(DeviceGone):
        await backend.wait_interrupt()


async def test_closing_wakes_a_sleeping_wait_with_device_gone() -> None:
    import trio

    from amigafuse.errors import DeviceGone

    backend = _backend_with_eventfds(req=False)
    result: list[str] = []

    async def waiter() -> None:
        try:
            await backend.wait_interrupt()
        except DeviceGone as exc:
            result.append(str(exc))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.05)
            await backend.aclose()
    assert result == ["VFIO device 0000:00:04.0 is closed"]


async def test_req_releases_the_device_at_once() -> None:
    import os

    import trio

    from amigafuse.errors import DeviceGone

    backend = _backend_with_eventfds()
    try:
        os.eventfd_write(backend._req_fd, 1)
        # Noticed by any check (here: another task asking whether the backend is dead),
        # the REQ closes every fd at once, even though the owner has not closed it.
        assert backend.dead
        assert backend._irq_fd == -1 and backend._req_fd == -1 and backend._closed
        with pytest.raises(DeviceGone, match="asked for the device back"):
            await backend.wait_interrupt()
        with trio.fail_after(1), pytest.raises(DeviceGone, match="asked for the device back"):
            await backend.sync()
    finally:
        backend._release()


def test_req_keeps_the_arena_mapped_until_close() -> None:
    # A request completed just before the REQ is copied out of the arena by its woken
    # caller afterwards (seen in the guest: "operation forbidden on released
    # memoryview"); the arena goes only when the owner closes the backend.
    import mmap
    import os

    backend = _backend_with_eventfds()
    backend._arena_map = mmap.mmap(-1, 4096)
    view = memoryview(backend._arena_map)
    backend._arena = vfio.DmaArena(view=view, bus_address=0x1000_0000)
    view[0:4] = b"data"
    os.eventfd_write(backend._req_fd, 1)
    assert backend.dead and backend._req_fd == -1
    assert bytes(view[0:4]) == b"data"  # still readable after the device was given back
    backend._release()
    with pytest.raises(ValueError, match="released"):
        bytes(view[0:4])
    assert backend._arena is None and backend._arena_map is None


async def test_interrupt_mode_choice_without_a_kernel() -> None:
    """INTx forced: enable_msix declines (no ioctl) and says why; an unknown mode is a
    usage error; before anything is enabled the mode reads intx and waiting is refused."""
    with pytest.raises(UsageError, match="interrupt mode"):
        vfio.VfioBackend("0000:00:04.0", interrupts="msi")  # type: ignore[arg-type]
    backend = vfio.VfioBackend("0000:00:04.0", interrupts="intx")
    try:
        assert backend.interrupt_mode == "intx"
        assert await backend.enable_msix(backend.devfn) is False
        assert backend.msix_note == "INTx asked for (interrupts=intx)"
        with pytest.raises(DeviceError, match="before enable_interrupts"):
            await backend.wait_interrupt()
        with pytest.raises(DeviceError, match="no device at devfn"):
            await backend.enable_msix(backend.devfn + 1)
    finally:
        backend._release()


def test_msix_demanded_but_missing_is_an_error_that_says_what_to_do() -> None:
    backend = vfio.VfioBackend("0000:00:04.0", interrupts="msix")
    with pytest.raises(NotAvailable, match=r"no MSI-X .*interrupts=auto"):
        backend._no_msix("the function has no MSI-X capability")
    assert backend.msix_note == "the function has no MSI-X capability"
    auto = vfio.VfioBackend("0000:00:04.0")
    assert auto._no_msix("VFIO refused to enable it: Invalid argument") is False
    assert auto.msix_note.startswith("VFIO refused")  # type: ignore[union-attr]
