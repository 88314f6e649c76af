"""SmartFilesystem (SFS\\0 and SFS\\2) engine.  See docs/sfs.md."""

from __future__ import annotations

from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.fs import CheckReport, Engine
from amigafuse.fs.api import Volume
from amigafuse.fs.sfs.check import check
from amigafuse.fs.sfs.format import format_volume
from amigafuse.fs.sfs.volume import SfsVolume


async def open_volume(
    device: BlockDevice, geometry: VolumeGeometry, read_only: bool, *, show_recycled: bool = False
) -> Volume:
    """Open an SFS volume on the partition ``device``.  ``show_recycled`` lists the
    hidden ``.recycled`` directory in the root (it is always reachable by name)."""
    return await SfsVolume.open(device, geometry, read_only, show_recycled=show_recycled)


async def check_volume(device: BlockDevice, geometry: VolumeGeometry, repair: bool) -> CheckReport:
    """Verify every structure and the bitmap; ``repair`` rebuilds the bitmap and the
    free count when only they are wrong.  See ``check.py``."""
    return await check(device, geometry, repair)


__all__ = ["ENGINE", "check_volume", "format_volume", "open_volume"]

ENGINE = Engine(
    name="sfs",
    dostypes=frozenset({SFS0, SFS2}),
    open_volume=open_volume,
    format_volume=format_volume,
    check_volume=check_volume,
)
