"""The FastFileSystem engine: DOS\\0-\\7 (OFS, FFS, INTL, DCFS, LNFS), read and write.

Layout and codecs in :mod:`.layout`, the bitmap allocator in :mod:`.bitmap`, reading in
:mod:`.volume`, writing in :mod:`.writer`, mkfs in :mod:`.format`, fsck in :mod:`.check`.
"""

from __future__ import annotations

from amigafuse.amiga.dostype import DOS0, DOS1, DOS2, DOS3, DOS4, DOS5, DOS6, DOS7
from amigafuse.fs import Engine
from amigafuse.fs.ffs.check import check_volume
from amigafuse.fs.ffs.format import format_volume
from amigafuse.fs.ffs.writer import FfsVolume, open_volume

ENGINE = Engine(
    name="ffs",
    dostypes=frozenset({DOS0, DOS1, DOS2, DOS3, DOS4, DOS5, DOS6, DOS7}),
    open_volume=open_volume,
    format_volume=format_volume,
    check_volume=check_volume,
)

__all__ = ["ENGINE", "FfsVolume", "check_volume", "format_volume", "open_volume"]
