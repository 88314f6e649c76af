"""Writing an empty FFS/OFS volume (DOS\\0-\\7): boot block, root, bitmap, dircache."""

from __future__ import annotations

import time
from dataclasses import replace

from amigafuse.amiga.dates import DateStamp
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.blockdev.window import FsBlockIO
from amigafuse.errors import InvalidName, NameTooLong, NoSpace, UsageError
from amigafuse.fs.ffs.bitmap import Bitmap
from amigafuse.fs.ffs.layout import (
    BM_VALID,
    MAX_NAME_STD,
    ROOT_BM_PAGES,
    ST_ROOT,
    T_HEADER,
    BitmapBlock,
    BitmapExtBlock,
    BootBlock,
    DirCacheBlock,
    RootBlock,
    dostype_flags,
    make_bcpl,
    table_size,
)
from amigafuse.fs.ffs.volume import root_block_for


def encode_label(label: str) -> bytes:
    if not label or "/" in label or ":" in label:
        raise InvalidName(f"{label!r} is not a valid volume name (empty, or holds '/' or ':')")
    try:
        raw = label.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidName(f"volume name {label!r} has characters outside Latin-1") from None
    if len(raw) > MAX_NAME_STD:
        raise NameTooLong(f"volume name {label!r} is longer than {MAX_NAME_STD} characters")
    return raw


def plan_layout(
    block_count: int, reserved: int, block_size: int, dircache: bool
) -> tuple[int, int, list[int], list[int]]:
    """(root, root dircache block or 0, bitmap pages, bitmap extension blocks).

    Pages follow the root (after the root's dircache block on DCFS): the 25 the root
    names, then each extension block followed by the pages it names, as FFS 40.1 lays
    them out.  Raises NoSpace when the volume is too small."""
    root = root_block_for(reserved, block_count)
    bm = Bitmap(reserved, block_count - reserved, block_size)
    per_ext = block_size // 4 - 1
    nxt = root + 1
    dc = 0
    if dircache:
        dc = nxt
        nxt += 1
    pages: list[int] = []
    exts: list[int] = []
    first = min(ROOT_BM_PAGES, bm.pages)
    pages.extend(range(nxt, nxt + first))
    nxt += first
    left = bm.pages - first
    while left > 0:
        exts.append(nxt)
        nxt += 1
        take = min(per_ext, left)
        pages.extend(range(nxt, nxt + take))
        nxt += take
        left -= take
    if nxt > block_count:
        raise NoSpace(f"a volume of {block_count} blocks is too small for its root and bitmap")
    return root, dc, pages, exts


async def format_volume(device: BlockDevice, geometry: VolumeGeometry, label: str) -> None:
    """Write an empty ``geometry.dostype`` volume named ``label`` on ``device``.

    Raises UsageError for a DosType that is not DOS\\0-\\7, InvalidName/NameTooLong for
    the label, NoSpace when the partition is too small, DeviceError on I/O failure."""
    dostype = geometry.dostype
    if dostype >> 8 != 0x444F53 or (dostype & 0xFF) > 7:
        raise UsageError(f"DosType 0x{dostype:08x} is not an FFS type (DOS\\0..DOS\\7)")
    name = encode_label(label)
    bs = geometry.fs_block_size
    io = FsBlockIO(device, bs)
    count = io.block_count
    if geometry.fs_block_count and geometry.fs_block_count < count:
        count = geometry.fs_block_count
    reserved = geometry.reserved
    if count < reserved + 8:
        raise NoSpace(f"a partition of {count} blocks is too small for FFS")
    _, _, dircache, _ = dostype_flags(dostype)
    root_block, dc_block, pages, exts = plan_layout(count, reserved, bs, dircache)
    now = DateStamp.from_unix(time.time())

    # boot block: the DOS type (and a valid checksum) in the reserved area
    boot_blocks = -(-1024 // bs)
    if reserved >= boot_blocks:
        boot = BootBlock.new(dostype).pack().ljust(boot_blocks * bs, b"\0")
        await io.write(0, boot)

    bm = Bitmap(reserved, count - reserved, bs)
    bm.set_all(True)
    for b in [root_block, *pages, *exts] + ([dc_block] if dc_block else []):
        bm.mark(b, False)
    for i, p in enumerate(pages):
        await io.write(p, BitmapBlock.with_map(bm.page_map(i)).pack())
    per_ext = bs // 4 - 1
    rest = pages[ROOT_BM_PAGES:]
    for i, x in enumerate(exts):
        chunk = rest[i * per_ext : (i + 1) * per_ext]
        nxt = exts[i + 1] if i + 1 < len(exts) else 0
        await io.write(x, BitmapExtBlock(tuple(chunk) + (0,) * (per_ext - len(chunk)), nxt).pack())
    if dc_block:
        await io.write(dc_block, DirCacheBlock.build(bs, dc_block, root_block, 0, []).packed_with_checksum())
    n = table_size(bs)
    root = RootBlock(
        block_size=bs, type=T_HEADER, header_key=0, high_seq=0, ht_size=n, first_data=0,
        chksum=0, ht=(0,) * n, bm_flag=BM_VALID,
        bm_pages=tuple(pages[:ROOT_BM_PAGES]) + (0,) * (ROOT_BM_PAGES - min(ROOT_BM_PAGES, len(pages))),
        bm_ext=exts[0] if exts else 0, r_days=now.days, r_mins=now.minutes, r_ticks=now.ticks,
        name_area=make_bcpl(name, 32), unused1=bytes(8), v_days=now.days, v_mins=now.minutes,
        v_ticks=now.ticks, c_days=now.days, c_mins=now.minutes, c_ticks=now.ticks,
        next_hash=0, parent_dir=0, extension=dc_block, sec_type=ST_ROOT,
    )  # fmt: skip
    root = replace(root)
    await io.write(root_block, root.packed_with_checksum())
    await io.flush()
