"""Async block devices: the contract (:mod:`.base`), files, memory and windows."""

from amigafuse.blockdev.base import BlockDevice, DeviceInfo, ReadLease
from amigafuse.blockdev.file import FileBlockDevice
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.blockdev.window import FsBlockIO, PartitionDevice

__all__ = [
    "BlockDevice",
    "DeviceInfo",
    "FileBlockDevice",
    "FsBlockIO",
    "MemoryBlockDevice",
    "PartitionDevice",
    "ReadLease",
]
