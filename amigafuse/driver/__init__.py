"""amigafuse's userspace VirtIO SCSI driver: disks behind a virtio-scsi controller as
:class:`~amigafuse.blockdev.base.BlockDevice` s.

Public entry points (everything else in this package is internal to the driver):

* :class:`DiskImage` — an image file to attach (path, read_only, logical_block_size);
* :func:`open_qemu` — ``async with open_qemu([DiskImage(...)], transport="auto") as c``
  starts QEMU with the images as SCSI targets 0..n-1 and yields a :class:`Controller`
  (``.disks`` in target order, ``.transport_name``, ``.stats``);
* :func:`attach_qemu` — the same for a QEMU that is already running;
* :class:`ScsiDisk` — the disks' type (read/write/flush, ``info``, pass-through
  ``execute``).
"""

from amigafuse.driver.controller import Controller, DiskImage, attach_qemu, open_qemu
from amigafuse.driver.scsi.disk import ScsiDisk

__all__ = ["Controller", "DiskImage", "ScsiDisk", "attach_qemu", "open_qemu"]
