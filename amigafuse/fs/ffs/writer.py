"""The writable FFS Volume: every mutation of :class:`amigafuse.fs.api.Volume`."""

from __future__ import annotations

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.errors import ReadOnlyFilesystem
from amigafuse.fs.api import SetAttrs, Stat, Volume
from amigafuse.fs.ffs.layout import BM_VALID
from amigafuse.fs.ffs.volume import FfsVolumeBase, read_boot_and_root


class FfsVolume(FfsVolumeBase, Volume):
    """An open FFS/OFS volume (DOS\\0-\\7)."""

    opened_invalid = False

    async def repair(self, used: set[int], bad_dircache: set[int]) -> list[str]:
        raise self._ro()

    def _ro(self) -> ReadOnlyFilesystem:
        return ReadOnlyFilesystem("writing FFS volumes is not implemented yet; mount read-only")

    async def create(self, dir_id: int, name: str, *, protection: int = 0) -> Stat:
        raise self._ro()

    async def mkdir(self, dir_id: int, name: str) -> Stat:
        raise self._ro()

    async def symlink(self, dir_id: int, name: str, target: str) -> Stat:
        raise self._ro()

    async def link(self, object_id: int, dir_id: int, name: str) -> Stat:
        raise self._ro()

    async def write(self, object_id: int, offset: int, data: bytes) -> int:
        raise self._ro()

    async def truncate(self, object_id: int, size: int) -> None:
        raise self._ro()

    async def unlink(self, dir_id: int, name: str) -> None:
        raise self._ro()

    async def rmdir(self, dir_id: int, name: str) -> None:
        raise self._ro()

    async def rename(self, src_dir: int, src_name: str, dst_dir: int, dst_name: str) -> None:
        raise self._ro()

    async def setattr(self, object_id: int, attrs: SetAttrs) -> Stat:
        raise self._ro()

    async def set_label(self, label: str) -> None:
        raise self._ro()

    async def sync(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True


async def open_volume(
    device: BlockDevice, geometry: VolumeGeometry, read_only: bool, *, validate: bool = True
) -> FfsVolume:
    """Open the FFS volume on ``device`` (the partition window).  Raises CorruptError
    when there is no valid FFS volume, DeviceError on I/O failure."""
    io, dostype, count, root_block, root = await read_boot_and_root(device, geometry)
    vol = FfsVolume(io, geometry, dostype, root_block, root, count, True)
    await vol._load_bitmap()
    vol.opened_invalid = root.bm_flag != BM_VALID
    _ = validate
    return vol
