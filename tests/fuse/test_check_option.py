"""``-o check``: the whole-filesystem check before a read-write mount.  Damage that only
a walk of the whole tree reveals (here: a bitmap, checksum valid, that calls a file's
header free, so a new file could take that block) makes the partition mount read-only,
saying why; a clean partition mounts read-write as usual."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
import trio

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.memory import MemoryBlockDevice
from amigafuse.fs.ffs import ENGINE as FFS
from amigafuse.fs.ffs.layout import with_checksum

pytestmark = pytest.mark.fuse

BLOCKS, BS, DOS3 = 400, 512, 0x444F5303
ROOT = (2 + BLOCKS - 1) // 2


def bare_ffs_image(path: Path, *, free_a_header: bool) -> None:
    """A bare DOS\\3 volume (no RDB) with two files; optionally its bitmap (checksum
    fixed) calls the first file's header block free."""

    async def build() -> bytearray:
        dev = MemoryBlockDevice(BLOCKS)
        geo = VolumeGeometry(dostype=DOS3, fs_block_count=BLOCKS, reserved=2)
        await FFS.format_volume(dev, geo, "Checked")
        vol = await FFS.open_volume(dev, geo, False)
        header = (await vol.create(vol.root_id, "alpha")).object_id
        await vol.write(header, 0, b"alpha" * 10)
        await vol.write((await vol.create(vol.root_id, "beta")).object_id, 0, b"beta" * 10)
        await vol.close()
        raw = bytearray(dev.data)
        if free_a_header:
            bitmap = struct.unpack_from(">L", raw, ROOT * BS + BS - 196)[0]  # bm_pages[0]
            bit = header - 2  # the bitmap starts at the first block after the reserved ones
            off = bitmap * BS + 4 + bit // 32 * 4
            struct.pack_into(">L", raw, off, struct.unpack_from(">L", raw, off)[0] | 1 << bit % 32)
            raw[bitmap * BS : bitmap * BS + BS] = with_checksum(raw[bitmap * BS : bitmap * BS + BS], 0)
        return raw

    path.write_bytes(trio.run(build))


def test_damage_found_by_check_mounts_read_only(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "bad.adf"
    bare_ffs_image(image, free_a_header=True)
    before = image.read_bytes()
    mnt = cli_mount(image, options="backend=file,check")
    err = cli_mount.last.stderr
    assert "mounted read-only" in err and "-o check found 1 error(s)" in err, err
    assert "marked free in the bitmap" in err, err
    assert (mnt / "alpha").read_bytes() == b"alpha" * 10
    with pytest.raises(OSError) as exc:
        (mnt / "new").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    assert image.read_bytes() == before  # nothing was written, not even the bitmap flag


def test_a_clean_partition_mounts_read_write_after_the_check(cli_mount, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "good.adf"
    bare_ffs_image(image, free_a_header=False)
    mnt = cli_mount(image, options="backend=file,check")
    assert "checking the whole filesystem" in cli_mount.last.stderr
    assert "read-only" not in cli_mount.last.stderr
    (mnt / "new").write_bytes(b"written")
    assert (mnt / "new").read_bytes() == b"written"
