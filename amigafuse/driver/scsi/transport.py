"""The seam between the VirtIO layer and the SCSI layer.

``amigafuse.driver.virtio`` implements :class:`ScsiTransport` (a virtio-scsi request
queue on some backend: QEMU's qtest socket or VFIO); ``amigafuse.driver.scsi`` builds
disks on it and never sees virtqueues, PCI or backends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# virtio-scsi response codes (virtio spec 5.6.6.1, struct virtio_scsi_resp_cmd.response)
VIRTIO_SCSI_S_OK = 0
VIRTIO_SCSI_S_OVERRUN = 1
VIRTIO_SCSI_S_ABORTED = 2
VIRTIO_SCSI_S_BAD_TARGET = 3
VIRTIO_SCSI_S_RESET = 4
VIRTIO_SCSI_S_BUSY = 5
VIRTIO_SCSI_S_TRANSPORT_FAILURE = 6
VIRTIO_SCSI_S_TARGET_FAILURE = 7
VIRTIO_SCSI_S_NEXUS_FAILURE = 8
VIRTIO_SCSI_S_FAILURE = 9


@dataclass(slots=True)
class ScsiCommandResult:
    """One completed virtio-scsi command (read-only by convention: not frozen, because a
    frozen dataclass costs 0.6 µs more to build, on every request).

    ``response`` is the virtio-scsi response code; ``status`` the SCSI status byte
    (0 GOOD, 2 CHECK CONDITION, 8 BUSY...); ``sense`` the sense bytes the device returned
    (``sense_len`` of them); ``data`` the data-in bytes transferred (``data_in_len -
    residual`` bytes); ``residual`` as the device reported it.

    A transport that lends buffers (``execute_lent``, optional: the VirtIO controller
    has it) returns a GOOD, complete read with ``data`` empty, ``lent`` a view of its
    own buffer and ``release`` the function that gives the buffer back (the caller
    calls it exactly once, and no one uses ``lent`` after).
    """

    response: int
    status: int
    sense: bytes
    data: bytes
    residual: int
    lent: memoryview | None = None
    release: Callable[[], None] | None = None


class ScsiTransport(Protocol):
    """A virtio-scsi controller's request queue.

    ``execute`` may be called by many trio tasks at once; at most ``queue_depth``
    commands are in flight, further callers wait.  Cancellation: a cancelled caller's
    command still completes on the device and its DMA buffers stay owned by the
    transport until then.  Raises :class:`~amigafuse.errors.DeviceGone` when the backend
    died (QEMU exited, socket closed); never hangs on a dead backend.
    """

    @property
    def max_target(self) -> int:
        """Highest target id (virtio-scsi config max_target)."""
        ...

    @property
    def max_lun(self) -> int: ...

    @property
    def max_transfer_bytes(self) -> int:
        """Largest data transfer one command may carry (max_sectors * 512, seg_max)."""
        ...

    @property
    def queue_depth(self) -> int: ...

    async def execute(
        self,
        target: int,
        lun: int,
        cdb: bytes,
        *,
        data_out: bytes | bytearray | memoryview | None = None,
        data_in_len: int = 0,
    ) -> ScsiCommandResult: ...
