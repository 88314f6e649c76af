"""Device status handshake and feature negotiation (virtio 1.x §3.1), on any transport.

Order: reset → ACKNOWLEDGE → DRIVER → read features → write the accepted subset →
FEATURES_OK (modern; re-read, the device may refuse) → queue setup (by the caller) →
DRIVER_OK (:func:`driver_ok`).  On failure the device is left with FAILED set.
"""

from __future__ import annotations

from amigafuse.driver.virtio.transport import VirtioTransport
from amigafuse.errors import HardwareError

# device status bits
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

# feature bits
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

FEATURE_NAMES = {
    VIRTIO_F_ANY_LAYOUT: "ANY_LAYOUT",
    VIRTIO_RING_F_INDIRECT_DESC: "INDIRECT_DESC",
    VIRTIO_RING_F_EVENT_IDX: "EVENT_IDX",
    VIRTIO_F_VERSION_1: "VERSION_1",
    VIRTIO_F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
}


def bit(feature: int) -> int:
    return 1 << feature


def choose_features(offered: int, wanted: int, *, modern: bool) -> int:
    """The feature set to accept (pure).

    ``wanted`` ∩ ``offered``; on modern VERSION_1 is required (HardwareError if not
    offered) and ACCESS_PLATFORM is accepted whenever offered (a device behind an
    IOMMU, the VFIO case, refuses drivers that ignore it)."""
    accepted = offered & wanted
    if modern:
        if not offered & bit(VIRTIO_F_VERSION_1):
            raise HardwareError("modern virtio device does not offer VERSION_1")
        accepted |= bit(VIRTIO_F_VERSION_1)
        if offered & bit(VIRTIO_F_ACCESS_PLATFORM):
            accepted |= bit(VIRTIO_F_ACCESS_PLATFORM)
    else:
        accepted &= 0xFFFFFFFF
    return accepted


def describe_features(features: int) -> str:
    names = [name for b, name in sorted(FEATURE_NAMES.items()) if features & bit(b)]
    return ",".join(names) or "none"


async def negotiate(transport: VirtioTransport, wanted: int) -> int:
    """Reset the device and negotiate features; returns the accepted set.

    Raises HardwareError (after setting FAILED) when the device refuses FEATURES_OK or
    lacks a required feature.
    """
    await transport.reset()
    transport.set_status(STATUS_ACKNOWLEDGE)
    transport.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    offered = await transport.device_features()
    modern = transport.kind == "modern"
    try:
        accepted = choose_features(offered, wanted, modern=modern)
    except HardwareError:
        transport.set_status(STATUS_FAILED)
        raise
    transport.set_driver_features(accepted)
    if modern:
        transport.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        status = await transport.get_status()
        if not status & STATUS_FEATURES_OK:
            transport.set_status(STATUS_FAILED)
            raise HardwareError(
                f"virtio device refused features {describe_features(accepted)} "
                f"(offered {offered:#x})"
            )
    return accepted


async def driver_ok(transport: VirtioTransport) -> None:
    """Set DRIVER_OK after the queues are set up; raises HardwareError if the device
    reports NEEDS_RESET or FAILED."""
    base = STATUS_ACKNOWLEDGE | STATUS_DRIVER
    if transport.kind == "modern":
        base |= STATUS_FEATURES_OK
    transport.set_status(base | STATUS_DRIVER_OK)
    status = await transport.get_status()
    if status & (STATUS_NEEDS_RESET | STATUS_FAILED) or not status & STATUS_DRIVER_OK:
        raise HardwareError(f"virtio device status {status:#x} after DRIVER_OK")
