"""The geometry a filesystem engine needs to open a volume (from an RDB PART's DosEnvec,
or defaults for a bare hardfile/floppy).  The RDB layer produces it; engines consume it;
neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VolumeGeometry:
    """Fields named after the DosEnvec ones they come from.

    ``size_block_bytes`` is de_SizeBlock * 4 (the sector size the Amiga uses);
    ``fs_block_size`` is that times de_SectorPerBlock (the filesystem block size).
    ``reserved`` is de_Reserved (filesystem blocks at the start that the filesystem
    leaves alone: the boot blocks); ``prealloc`` is de_PreAlloc (blocks at the end).
    ``fs_block_count`` is the number of filesystem blocks in the partition.
    """

    dostype: int
    fs_block_size: int = 512
    fs_block_count: int = 0
    reserved: int = 2
    prealloc: int = 0
    size_block_bytes: int = 512
    surfaces: int = 1
    blocks_per_track: int = 1
    low_cyl: int = 0
    high_cyl: int = 0
    max_transfer: int = 0x7FFFFFFF
    mask: int = 0xFFFFFFFE
    boot_pri: int = 0
    num_buffers: int = 30
    interleave: int = 0
    boot_blocks: int = 2
