"""Checking (and repairing) an FFS/OFS volume: checksums, chains, hash placement, link
chains, dircache and the bitmap against the blocks reachable from the root.

What ``repair`` fixes, and only when the tree itself walked without errors (otherwise
a bitmap rebuilt from an incomplete walk would free blocks still in use): the bitmap
(rebuilt from the reachable blocks), the dircache of every directory whose records
differ from its entries (rebuilt), and the bitmap-valid flag.
"""

from __future__ import annotations

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.errors import CorruptError
from amigafuse.fs import CheckReport
from amigafuse.fs.ffs.bitmap import Bitmap
from amigafuse.fs.ffs.layout import (
    ST_FILE,
    ST_LINKDIR,
    ST_LINKFILE,
    ST_USERDIR,
    T_DATA,
    DirCacheRecord,
    EntryBlock,
    OfsDataBlock,
    hash_name,
    verify_checksum,
)
from amigafuse.fs.ffs.volume import dircache_record
from amigafuse.fs.ffs.writer import FfsVolume, open_volume


async def _check_tree(vol: FfsVolume, report: CheckReport) -> tuple[set[int], set[int]]:
    """Walk the tree; returns (used blocks, directories whose dircache needs a rebuild)."""
    errors = report.errors
    used: dict[int, str] = {}
    for b in range(vol.reserved):
        used[b] = "reserved"
    used[vol.root_block] = "root"
    for b in vol.bitmap_blocks:
        used[b] = "bitmap"
    for b in vol.bitmap_ext_blocks:
        used[b] = "bitmap extension"

    def claim(block: int, what: str) -> None:
        if block in used:
            errors.append(f"block {block} is used twice: {used[block]} and {what}")
        else:
            used[block] = what

    bad_dircache: set[int] = set()
    files = dirs = links = 0
    stack = [vol.root_block]
    visited: set[int] = set()
    link_refs: list[tuple[int, EntryBlock]] = []
    while stack:
        d = stack.pop()
        if d in visited:
            errors.append(f"directory {d} is reachable twice (a directory loop)")
            continue
        visited.add(d)
        try:
            table = await vol._dir_table(d)
        except CorruptError as exc:
            errors.append(f"directory {d}: {exc}")
            continue
        entries: list[tuple[int, EntryBlock]] = []
        for slot, head in enumerate(table):
            if not head:
                continue
            try:
                chain = await vol._chain(d, head)
            except CorruptError as exc:
                errors.append(f"directory {d}, hash slot {slot}: {exc}")
                continue
            prev = 0
            for b, e in chain:
                if hash_name(e.name, vol.intl, vol.block_size) != slot:
                    errors.append(f"entry {b} ({e.name!r}) is in hash slot {slot}, its name hashes elsewhere")
                if e.parent != d:
                    errors.append(f"entry {b} ({e.name!r}) names parent {e.parent}, it is in directory {d}")
                if b < prev:
                    report.warnings.append(f"directory {d}, hash slot {slot}: chain not sorted by block number")
                prev = b
                claim(b, f"header of {e.name!r}")
                entries.append((b, e))
                if vol.lnfs and e.comment_block:
                    try:
                        c = await vol._comment_block(e.comment_block, b)
                        if c.owner != b:
                            errors.append(f"comment block {e.comment_block} names owner {c.owner}, not {b}")
                        claim(e.comment_block, f"comment of {e.name!r}")
                    except CorruptError as exc:
                        errors.append(f"entry {b}: {exc}")
                if e.sec_type == ST_USERDIR:
                    dirs += 1
                    stack.append(b)
                elif e.sec_type == ST_FILE:
                    files += 1
                    await _check_file(vol, b, e, claim, report)
                elif e.sec_type in (ST_LINKFILE, ST_LINKDIR):
                    links += 1
                    link_refs.append((b, e))
        if vol.dircache:
            await _check_dircache(vol, d, entries, claim, report, bad_dircache)
    # hard links: each link's target lists it in its link chain, and back
    for b, e in link_refs:
        try:
            target = await vol._link_target(b, e)
            t = await vol._entry(target)
            link_chain: list[int] = []
            nxt = t.next_link
            seen: set[int] = set()
            while nxt and nxt not in seen and len(seen) < vol.block_count:
                seen.add(nxt)
                link_chain.append(nxt)
                nxt = (await vol._entry(nxt)).next_link
            if nxt:
                errors.append(f"the link chain of {target} loops")
            if b not in link_chain:
                errors.append(f"hard link {b} ({e.name!r}) is missing from the link chain of {target}")
        except CorruptError as exc:
            errors.append(f"hard link {b}: {exc}")
    report.stats.update(files=files, dirs=dirs, links=links, used_blocks=len(used) - vol.reserved)
    return set(used), bad_dircache


async def _check_file(vol: FfsVolume, b: int, e: EntryBlock, claim, report: CheckReport) -> None:  # type: ignore[no-untyped-def]
    try:
        data, exts = await vol._block_lists(b, e)
    except CorruptError as exc:
        report.errors.append(f"file {b} ({e.name!r}): {exc}")
        return
    need = vol._data_count(e.byte_size)
    if len(data) < need:
        report.errors.append(f"file {b} ({e.name!r}) has {len(data)} data blocks, its size {e.byte_size} needs {need}")
    elif len(data) > need:
        report.warnings.append(f"file {b} ({e.name!r}) holds {len(data) - need} data blocks past its end")
    for x in exts:
        claim(x, f"extension of {e.name!r}")
        xb = await vol._ext(x, b)
        if xb.parent != b:
            report.errors.append(f"extension block {x} names parent {xb.parent}, not {b}")
    for i, d in enumerate(data):
        claim(d, f"data block {i} of {e.name!r}")
    if not vol.ffs and data:
        raws = await vol._read_blocks(data)
        for i, raw in enumerate(raws):
            blk = OfsDataBlock.unpack(raw)
            if not verify_checksum(raw):
                report.errors.append(f"OFS data block {data[i]} of {b}: checksum does not verify")
            elif blk.type != T_DATA or blk.header_key != b:
                report.errors.append(f"OFS data block {data[i]} does not belong to file {b}")
            else:
                nxt = data[i + 1] if i + 1 < len(data) else 0
                if blk.seq_num != i + 1 or blk.next_data != nxt:
                    # FFS 40.1 leaves these wrong after a seek past EOF; reads use the table
                    report.warnings.append(
                        f"OFS data block {data[i]} of file {b}: seq_num/next_data "
                        f"({blk.seq_num}/{blk.next_data}) disagree with the table ({i + 1}/{nxt})"
                    )


async def _check_dircache(vol: FfsVolume, d: int, entries, claim, report: CheckReport, bad: set[int]) -> None:  # type: ignore[no-untyped-def]
    try:
        chain = await vol._dircache_chain(d)
    except CorruptError as exc:
        report.errors.append(f"directory {d}: dircache: {exc}")
        bad.add(d)
        return
    if not chain:
        report.errors.append(f"directory {d} has no dircache block")
        bad.add(d)
        return
    records: dict[int, DirCacheRecord] = {}
    for blk, dc in chain:
        claim(blk, f"dircache of directory {d}")
        if dc.parent != d:
            report.errors.append(f"dircache block {blk} names parent {dc.parent}, not {d}")
            bad.add(d)
        try:
            for r in dc.decode_records():
                if r.header in records:
                    report.errors.append(f"dircache of {d} lists {r.header} twice")
                    bad.add(d)
                records[r.header] = r
        except ValueError as exc:
            report.errors.append(f"dircache block {blk}: {exc}")
            bad.add(d)
    have = {b for b, _ in entries}
    for b in have - set(records):
        report.errors.append(f"dircache of {d} lacks entry {b}")
        bad.add(d)
    for b in set(records) - have:
        report.errors.append(f"dircache of {d} lists {b}, which is not in the directory")
        bad.add(d)
    for b, e in entries:
        rec = records.get(b)
        if rec is None:
            continue
        want = dircache_record(b, e, await vol._comment(b, e))
        if rec.name != want.name or rec.type != want.type or rec.comment != want.comment or rec.protect != want.protect:
            report.errors.append(f"dircache record of {b} ({e.name!r}) differs from its header")
            bad.add(d)
        elif rec != want:
            report.warnings.append(
                f"dircache record of {b} ({e.name!r}) keeps a stale size/date "
                f"({rec.size} bytes, header says {e.byte_size})"
            )
            bad.add(d)


async def stale_dircaches(vol: FfsVolume) -> set[int]:
    """The directories whose dircache does not match their entries (DOS\\4/5), as
    ``check`` finds them; validation rebuilds those (a crash inside a write-back can
    leave a directory and its dircache from different states)."""
    report = CheckReport()
    _, bad = await _check_tree(vol, report)
    return bad


def bitmap_differences(bitmap: Bitmap, used: set[int]) -> tuple[list[int], list[int]]:
    """(blocks in use but marked free, blocks marked used but unused), compared a whole
    bitmap at a time."""
    expected = Bitmap(bitmap.reserved, bitmap.count, bitmap.longs_per_block * 4 + 4)
    expected.set_all(True)
    expected.mark_blocks(sorted(b for b in used if bitmap.in_range(b)), False)
    mask = (1 << bitmap.count) - 1
    have = int.from_bytes(bitmap.copy_bits(), "little") & mask
    want = int.from_bytes(expected.copy_bits(), "little") & mask
    if have == want:
        return [], []
    diff = have ^ want
    wrong_free: list[int] = []
    lost: list[int] = []
    while diff and len(wrong_free) + len(lost) < 10_000:
        low = diff & -diff
        k = low.bit_length() - 1
        (wrong_free if have & low else lost).append(k + bitmap.reserved)
        diff ^= low
    return wrong_free, lost


async def _check_once(device: BlockDevice, geometry: VolumeGeometry, repair: bool) -> CheckReport:
    report = CheckReport()
    try:
        vol = await open_volume(device, geometry, not repair, validate=False)
    except CorruptError as exc:
        report.errors.append(f"cannot open the volume: {exc}")
        return report
    try:
        if vol.opened_invalid:
            report.errors.append("the bitmap-valid flag is clear (the volume was not closed cleanly)")
        if not vol.bitmap_ok:
            report.errors.extend(n for n in vol.notes if "bitmap" in n)
        tree_errors_before = len(report.errors)
        used, bad_dircache = await _check_tree(vol, report)
        tree_errors = [
            e for e in report.errors[tree_errors_before:] if "dircache" not in e
        ]
        if vol.bitmap_ok:
            wrong_free, lost = bitmap_differences(vol.bitmap, used)
            if wrong_free:
                report.errors.append(f"{len(wrong_free)} blocks in use are marked free in the bitmap (first: {wrong_free[:5]})")
            if lost:
                report.errors.append(f"{len(lost)} blocks are marked used but nothing uses them (first: {lost[:5]})")
            report.stats["free_blocks"] = vol.bitmap.free_count()
        if repair and report.errors:
            if vol.read_only:
                report.warnings.append("not repairing: the device is read-only")
            elif tree_errors:
                report.warnings.append("not repairing: the directory tree itself is damaged")
            elif len(vol.bitmap_blocks) < vol.bitmap.pages:
                report.warnings.append("not repairing: the bitmap blocks cannot be found")
            else:
                report.repaired.extend(await vol.repair(used, bad_dircache))
    finally:
        await vol.close()
    return report


async def check_volume(device: BlockDevice, geometry: VolumeGeometry, repair: bool) -> CheckReport:
    """Check the FFS volume on ``device``; with ``repair``, fix what can be fixed safely
    (bitmap, dircache, bitmap-valid flag) and check again: the report then holds what
    was repaired and what is still wrong.  Damage lands in ``errors`` (never raised);
    DeviceError on I/O failure."""
    first = await _check_once(device, geometry, repair)
    if not (repair and first.repaired):
        return first
    second = await _check_once(device, geometry, False)
    second.repaired = first.repaired
    return second
