"""``format_volume`` for SFS\\0 and SFS\\2: an empty volume laid out as SmartFilesystem
1.277 lays it out (compared with the handler images in tests/engine/test_sfs_format.py):

    0 root | 1 reserved | 2..33 first admin space: 2 ADMC, 3 root ObjectContainer
    (root info at its end), 4 root HashTable, 5 TROK, 6 extent B-tree root (empty
    leaf), 7 object-node root (leaf: node 1 root, 2 .recycled, 3..6 reserved with
    0xFFFFFFFF), 8 the root directory's first ObjectContainer holding ``.recycled``
    | 34.. bitmap | ... | last block: second root.

The layout is built by the pure :func:`build_layout`; ``format_volume`` writes it.
"""

from __future__ import annotations

import struct
import time

from amigafuse.amiga.dates import AMIGA_EPOCH_UNIX
from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.blockdev.window import FsBlockIO
from amigafuse.errors import InvalidName, NameTooLong, UsageError
from amigafuse.fs.sfs import codec
from amigafuse.fs.sfs.codec import SfsObject

ADMIN_START = 2
BITMAP_BASE = 34
RECYCLED_NAME = b".recycled"


def build_layout(
    total_blocks: int,
    block_size: int,
    label: bytes,
    *,
    sfs2: bool = False,
    case_sensitive: bool = False,
    recycled: bool = True,
    date: int = 0,
    first_byte: int = 0,
) -> dict[int, bytes]:
    """Every block an empty volume needs (block number -> contents)."""
    per = codec.blocks_per_bitmap(block_size)
    nbitmap = (total_blocks + per - 1) // per
    if total_blocks < BITMAP_BASE + nbitmap + 16:
        raise UsageError(f"a partition of {total_blocks} blocks is too small for SFS")
    out: dict[int, bytes] = {}

    def fin(buf: bytearray, block_id: int, block: int) -> bytes:
        return bytes(codec.finish_block(buf, block_id, block, sfs2))

    used_admin = list(range(2, 9 if recycled else 8))
    # bitmap
    used = {0, 1, total_blocks - 1, *range(ADMIN_START, ADMIN_START + 32), *range(BITMAP_BASE, BITMAP_BASE + nbitmap)}
    body = block_size - codec.BLOCKHEADER_SIZE
    bits = bytearray(nbitmap * body)
    bits[: total_blocks // 8] = b"\xff" * (total_blocks // 8)
    for b in range(total_blocks // 8 * 8, total_blocks):
        bits[b >> 3] |= 0x80 >> (b & 7)
    for b in used:
        bits[b >> 3] &= ~(0x80 >> (b & 7)) & 0xFF
    free = total_blocks - len(used)
    for i in range(nbitmap):
        buf = bytearray(block_size)
        buf[codec.BLOCKHEADER_SIZE :] = bits[i * body : (i + 1) * body]
        out[BITMAP_BASE + i] = fin(buf, codec.BITMAP_ID, BITMAP_BASE + i)
    # admin space container
    buf = bytearray(block_size)
    struct.pack_into(">IIBBH", buf, 12, 0, 0, 0x20, 0, 0)
    mask = 0
    for b in used_admin:
        mask |= 0x80000000 >> (b - ADMIN_START)
    struct.pack_into(">II", buf, codec.ADMINSPACECONTAINER_HEADER, ADMIN_START, mask)
    out[2] = fin(buf, codec.ADMINSPACECONTAINER_ID, 2)
    # root object container with the root info at its end
    root_obj = SfsObject(0, 0, codec.ROOTNODE, 0x0F, 4, SfsObject.dir_size_field(8 if recycled else 0, sfs2),
                         date, codec.OTYPE_DIR, label, b"", sfs2)  # fmt: skip
    info = codec.RootInfo(0, 0, free, date, 0, 0, 0, 0, 0)
    out[3] = bytes(codec.build_object_container(block_size, 3, 0, 0, 0, [root_obj], info.pack(), sfs2))
    # root hash table
    buf = bytearray(block_size)
    struct.pack_into(">I", buf, 12, codec.ROOTNODE)
    rec_hash = codec.name_hash(RECYCLED_NAME, case_sensitive)
    if recycled:
        struct.pack_into(">I", buf, codec.HASHTABLE_HEADER + 4 * (rec_hash % codec.hash_chains(block_size)), codec.RECYCLEDNODE)
    out[4] = fin(buf, codec.HASHTABLE_ID, 4)
    out[5] = fin(bytearray(block_size), codec.TRANSACTIONOK_ID, 5)
    out[6] = bytes(codec.build_bnode_container(block_size, 6, True, sfs2, [], []))
    # object node root (a leaf)
    buf = bytearray(block_size)
    struct.pack_into(">II", buf, 12, 1, 1)
    nodes = [(3, 0, 0), (8, 0, rec_hash) if recycled else (0xFFFFFFFF, 0, 0)] + [(0xFFFFFFFF, 0, 0)] * 4
    for i, (data, nxt, h16) in enumerate(nodes):
        struct.pack_into(">IIH", buf, codec.NODECONTAINER_HEADER + i * codec.OBJECTNODE_SIZE, data, nxt, h16)
    out[7] = fin(buf, codec.NODECONTAINER_ID, 7)
    if recycled:
        rec = SfsObject(0, 0, codec.RECYCLEDNODE, 0x0C, 0, 0, date,
                        codec.OTYPE_DIR | codec.OTYPE_HIDDEN | codec.OTYPE_UNDELETABLE | codec.OTYPE_QUICKDIR,
                        RECYCLED_NAME, b"", sfs2)  # fmt: skip
        out[8] = bytes(codec.build_object_container(block_size, 8, codec.ROOTNODE, 0, 0, [rec], b"", sfs2))
    # root blocks
    last_byte = first_byte + total_blocks * block_size
    for where in (0, total_blocks - 1):
        buf = bytearray(block_size)
        struct.pack_into(
            ">HHIBBH8sIIIIII", buf, 12,
            codec.STRUCTURE_VERSION_SFS2 if sfs2 else codec.STRUCTURE_VERSION_SFS0, 0, date,
            (codec.ROOTBITS_CASESENSITIVE if case_sensitive else 0) | (codec.ROOTBITS_RECYCLED if recycled else 0),
            0, 0, bytes(8), first_byte >> 32, first_byte & 0xFFFFFFFF, last_byte >> 32, last_byte & 0xFFFFFFFF,
            total_blocks, block_size,
        )  # fmt: skip
        struct.pack_into(">IIIII", buf, 96, BITMAP_BASE, 2, 3, 6, 7)
        out[where] = fin(buf, codec.ROOT_ID_SFS2 if sfs2 else codec.ROOT_ID_SFS0, where)
    out[1] = bytes(block_size)
    return out


async def format_volume(
    device: BlockDevice,
    geometry: VolumeGeometry,
    label: str,
    *,
    case_sensitive: bool = False,
    recycled: bool = True,
) -> None:
    """Write an empty SFS\\0 or SFS\\2 filesystem (``geometry.dostype``) on ``device``.

    Raises UsageError for an unsuitable block size or partition, InvalidName/NameTooLong
    for a bad label, DeviceError subclasses from the device."""
    if geometry.dostype not in (SFS0, SFS2):
        raise UsageError(f"DosType {geometry.dostype:#x} is not SFS\\0 or SFS\\2")
    bs = geometry.fs_block_size
    if bs < 512 or bs > 32768 or bs & (bs - 1):
        raise UsageError(f"SFS block sizes are powers of two from 512 to 32768, not {bs}")
    try:
        raw = label.encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidName(f"volume name {label!r} has characters outside Latin-1") from None
    if not raw or b"/" in raw or b":" in raw or 0 in raw:
        raise InvalidName(f"{label!r} is not a valid volume name")
    if len(raw) > 30:
        raise NameTooLong("volume names hold at most 30 characters")
    io = FsBlockIO(device, bs)
    total = io.block_count
    if geometry.fs_block_count:
        total = min(total, geometry.fs_block_count)
    cyl_bytes = geometry.surfaces * geometry.blocks_per_track * geometry.size_block_bytes
    first_byte = geometry.low_cyl * cyl_bytes
    date = max(0, int(time.time()) - AMIGA_EPOCH_UNIX)
    layout = build_layout(
        total, bs, raw, sfs2=geometry.dostype == SFS2, case_sensitive=case_sensitive, recycled=recycled,
        date=date, first_byte=first_byte,
    )  # fmt: skip
    # Zero the first admin space, then write everything (roots last).
    await io.write(ADMIN_START, bytes(32 * bs))
    for block in sorted(layout):
        if block not in (0, total - 1):
            await io.write(block, layout[block])
    await io.flush()
    await io.write(total - 1, layout[total - 1])
    await io.write(0, layout[0])
    await io.flush()
