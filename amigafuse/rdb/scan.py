"""The bounded RDB scanner: what partitions and handlers a disk holds.

The scanner is pure ("sans I/O"): :func:`scan_disk` is a generator that yields
:class:`ReadRequest` (device blocks it needs) and is sent the bytes back; it returns a
:class:`DiskLayout`.  Two drivers run it: :func:`scan_bytes` over an image in memory
(tests, tools) and :func:`scan_device` over any async BlockDevice.  A driver that
cannot read a block throws the DeviceError into the generator; the scanner turns an
unreadable chain block into a problem, and lets an unreadable block 0..15 propagate.

Rules (see docs/rdb.md):

* The RDSK is looked for in blocks 0..15 (the first whose ID is RDSK and whose checksum
  verifies, also with bytes 0xDC..0xDF zeroed, as Linux does).  An RDSK-looking block
  whose checksum fails is reported; scanning goes on.
* RDB block pointers count rdb_BlockBytes-sized blocks (as Linux reads them); every
  pointer is range-checked against the disk, every chain has a loop guard (a visited
  set) and a length bound, so a scan reads at most a bounded number of blocks.
* A pointer of 0 is taken as an empty chain (small.hdf's rdb_FileSysHeaderList = 0):
  block 0 holds the RDSK and can never be a PART/FSHD/BADB.  A note is recorded.
* A PART with a bad checksum is skipped and reported; its pb_Next is still followed
  when the block at least says PART.  A block that does not say PART ends the chain.
* A bad FSHD or LSEG is reported and never hides a partition.
* Each partition is checked: sane DosEnvec, inside the disk, aligned to device blocks,
  not overlapping another partition or the RDB blocks.  A partition that fails a check
  is still listed, with ``issues`` saying why it must not be mounted.
* Without an RDSK, block 0 of a bare volume (``DOS\\x``, ``SFS\\0``, ``PFS\\x``...) makes
  the whole device one partition: an ADF floppy (880 KiB DD or 1760 KiB HD) or a
  hardfile (reserved 2, the whole file).
"""

from __future__ import annotations

import re
from collections.abc import Generator
from dataclasses import dataclass, replace
from typing import Literal

from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.errors import CorruptError, DeviceError
from amigafuse.rdb.blocks import (
    END_OF_CHAIN,
    IDNAME_BADBLOCK,
    IDNAME_FILESYSHEADER,
    IDNAME_LOADSEG,
    IDNAME_PARTITION,
    IDNAME_RIGIDDISK,
    PBFF_BOOTABLE,
    PBFF_NOMOUNT,
    RDB_LOCATION_LIMIT,
    BadBlockBlock,
    DosEnvec,
    FileSysHeaderBlock,
    LoadSegBlock,
    PartitionBlock,
    RigidDiskBlock,
    block_sum,
    checksum_ok,
    checksum_ok_zeroed_dc,
    to_signed,
)

# Bounds on chain walks (a real disk is far below every one of them).
MAX_PARTITIONS = 128
MAX_FILESYSTEMS = 64
MAX_LSEG_BLOCKS = 16384  # 8 MiB of handler code in 512-byte blocks
MAX_BADB_BLOCKS = 1024

ADF_DD_BLOCKS = 1760
ADF_HD_BLOCKS = 3520

DE_DOSTYPE = 16  # de_TableSize must reach this index for de_DosType to count
DE_BOOTBLOCKS = 19
DOS0 = 0x444F5300

Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class ReadRequest:
    """``count`` device blocks from ``lba``."""

    lba: int
    count: int


@dataclass(frozen=True)
class Problem:
    """Something the scan found wrong (``error``), odd (``warning``) or tolerated (``note``)."""

    severity: Severity
    message: str
    block: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = []
        if self.block is not None:
            where.append(f"block {self.block}")
        if self.field is not None:
            where.append(f"field {self.field}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


@dataclass(frozen=True)
class Partition:
    """One partition: from a PART block, or a whole bare volume (``part`` is None).

    ``first_byte``/``size_bytes`` are the byte range on the device; ``first_lba`` and
    ``block_count`` the same in device blocks.  ``issues`` non-empty means the partition
    must not be mounted (the reasons, for the user)."""

    index: int
    drive_name: str
    dostype: int
    first_byte: int
    size_bytes: int
    first_lba: int
    block_count: int
    bootable: bool
    no_automount: bool
    boot_pri: int
    geometry: VolumeGeometry
    part_block: int | None = None
    part: PartitionBlock | None = None
    issues: tuple[str, ...] = ()

    @property
    def last_byte(self) -> int:
        return self.first_byte + self.size_bytes - 1


@dataclass(frozen=True)
class FileSystemHandler:
    """A filesystem handler stored in the RDB (FSHD + its LSEG chain)."""

    block: int
    header: FileSysHeaderBlock
    dostype: int
    version: str
    lseg_blocks: int
    code: bytes
    ver_string: str | None
    complete: bool

    @property
    def code_bytes(self) -> int:
        return len(self.code)


@dataclass(frozen=True)
class DiskLayout:
    """The scan's result.  ``kind``: ``rdb``, ``bare`` (a volume from block 0) or ``none``."""

    kind: Literal["rdb", "bare", "none"]
    block_size: int
    block_count: int
    rdsk_block: int | None = None
    rdsk: RigidDiskBlock | None = None
    rdb_block_bytes: int = 512
    partitions: tuple[Partition, ...] = ()
    filesystems: tuple[FileSystemHandler, ...] = ()
    bad_blocks: tuple[tuple[int, int], ...] = ()
    problems: tuple[Problem, ...] = ()
    bare_dostype: int | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.block_count


# --------------------------------------------------------------------------- helpers


_VER_RE = re.compile(rb"\$VER: ?([\x20-\x7e\xa0-\xff]{1,200})")


def find_ver_string(code: bytes) -> str | None:
    """The text after ``$VER:`` in a binary (up to a NUL or line end), or None."""
    m = _VER_RE.search(code)
    if not m:
        return None
    return m.group(1).decode("latin-1").strip() or None


def is_volume_dostype(dostype: int) -> bool:
    """True for the block-0 signatures of Amiga volumes: DOS\\0-7, SFS\\0/2, PFS\\1-3, PDS\\3..."""
    prefix = dostype >> 8
    last = dostype & 0xFF
    if prefix == 0x444F53:  # DOS
        return last <= 7
    if prefix in (0x534653,):  # SFS
        return last in (0, 2)
    if prefix in (0x504653, 0x504453, 0x6D7566):  # PFS, PDS, muF(S)
        return last <= 3
    return False


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def envec_issues(env: DosEnvec) -> list[tuple[str, str]]:
    """Reasons (message, field) why a DosEnvec cannot describe a partition."""
    issues: list[tuple[str, str]] = []
    if env.de_TableSize < 11:
        issues.append((f"de_TableSize {env.de_TableSize} is too small to hold HighCyl", "de_TableSize"))
    if not (_power_of_two(env.de_SizeBlock) and 64 <= env.de_SizeBlock <= 16384):
        issues.append((f"de_SizeBlock {env.de_SizeBlock} longs is not a sector size", "de_SizeBlock"))
    if env.de_Surfaces == 0 or env.de_Surfaces > 0xFFFF:
        issues.append((f"de_Surfaces {env.de_Surfaces} is absurd", "de_Surfaces"))
    if env.de_BlocksPerTrack == 0 or env.de_BlocksPerTrack > 0xFFFFFF:
        issues.append((f"de_BlocksPerTrack {env.de_BlocksPerTrack} is absurd", "de_BlocksPerTrack"))
    spb = env.de_SectorPerBlock or 1
    if not _power_of_two(spb) or env.de_SizeBlock * 4 * spb > 65536:
        issues.append(
            (f"de_SectorPerBlock {env.de_SectorPerBlock} gives no valid block size", "de_SectorPerBlock")
        )
    if env.de_HighCyl < env.de_LowCyl:
        issues.append((f"de_HighCyl {env.de_HighCyl} < de_LowCyl {env.de_LowCyl}", "de_HighCyl"))
    return issues


def geometry_from_envec(env: DosEnvec, *, block_count: int) -> VolumeGeometry:
    """The VolumeGeometry engines need, from a (checked) DosEnvec.

    Fields past de_TableSize take AmigaOS's defaults (DosType DOS\\0, BootPri 0...).
    ``block_count`` is the number of filesystem blocks in the partition."""
    size_block_bytes = env.de_SizeBlock * 4
    spb = env.de_SectorPerBlock or 1
    table = env.de_TableSize
    return VolumeGeometry(
        dostype=env.de_DosType if table >= DE_DOSTYPE else DOS0,
        fs_block_size=size_block_bytes * spb,
        fs_block_count=block_count,
        reserved=env.de_Reserved,
        prealloc=env.de_PreAlloc,
        size_block_bytes=size_block_bytes,
        surfaces=env.de_Surfaces,
        blocks_per_track=env.de_BlocksPerTrack,
        low_cyl=env.de_LowCyl,
        high_cyl=env.de_HighCyl,
        max_transfer=env.de_MaxTransfer if table >= 13 else 0x7FFFFFFF,
        mask=env.de_Mask if table >= 14 else 0xFFFFFFFF,
        boot_pri=to_signed(env.de_BootPri) if table >= 15 else 0,
        num_buffers=env.de_NumBuffers,
        interleave=env.de_Interleave,
        boot_blocks=env.de_BootBlocks if table >= DE_BOOTBLOCKS else env.de_Reserved,
    )


# --------------------------------------------------------------------------- the scanner


ScanGen = Generator[ReadRequest, bytes, DiskLayout]



@dataclass(frozen=True)
class _ChainSpec:
    """How one RDB chain is bounded and how its problems are worded (``str.format``
    templates: ``{fld}``/``{ptr}`` for loop and length, ``{exc}`` for a failed read,
    ``{found}`` for a wrong ID).  ``idname`` None: the caller checks the ID itself."""

    chain: str
    limit: int
    loop: str
    too_long: str
    unreadable: str
    idname: bytes | None = None
    id_field: str = ""
    wrong_id: str = ""


_PART_CHAIN = _ChainSpec(
    "partition", MAX_PARTITIONS,
    "{fld} points back to block {ptr}: the partition list loops; stopped there",
    f"more than {MAX_PARTITIONS} PART blocks; the rest are ignored",
    "cannot read PART block: {exc}; the rest of the partition list is lost",
    IDNAME_PARTITION, "pb_ID",
    "expected a PART block, found ID {found!r}; the partition list ends here",
)  # fmt: skip
_FSHD_CHAIN = _ChainSpec(
    "filesystem", MAX_FILESYSTEMS,
    "{fld} points back to block {ptr}: the filesystem list loops; stopped there",
    f"more than {MAX_FILESYSTEMS} FSHD blocks; the rest are ignored",
    "cannot read FSHD block: {exc}",
    IDNAME_FILESYSHEADER, "fhb_ID",
    "expected an FSHD block, found ID {found!r}; the filesystem list ends here",
)  # fmt: skip
_LSEG_CHAIN = _ChainSpec(
    "LoadSeg", MAX_LSEG_BLOCKS,
    "{fld} points back to block {ptr}: the LSEG chain loops; handler incomplete",
    f"LSEG chain longer than {MAX_LSEG_BLOCKS} blocks; handler incomplete",
    "cannot read LSEG block: {exc}; handler incomplete",
    IDNAME_LOADSEG, "lsb_ID",
    "expected an LSEG block, found ID {found!r}; handler incomplete",
)  # fmt: skip
_BADB_CHAIN = _ChainSpec(
    "bad-block", MAX_BADB_BLOCKS,
    "{fld} loops or the bad-block list is too long; stopped there",
    "{fld} loops or the bad-block list is too long; stopped there",
    "cannot read BADB block: {exc}",
)  # fmt: skip

class _Scan:
    """State of one scan; methods are generators that yield ReadRequests."""

    def __init__(self, block_size: int, block_count: int) -> None:
        self.block_size = block_size
        self.block_count = block_count
        self.problems: list[Problem] = []
        self.unit = block_size  # bytes per RDB block (rdb_BlockBytes once known)
        self.rdb_blocks: set[int] = set()  # RDB blocks read (RDSK, PART, FSHD, LSEG, BADB)
        self.rdsk_block = 0
        self.first_blocks = b""

    def problem(self, severity: Severity, message: str, block: int | None = None, fld: str | None = None) -> None:
        self.problems.append(Problem(severity, message, block, fld))

    @property
    def unit_count(self) -> int:
        return self.block_count * self.block_size // self.unit

    def read_rdb_block(self, block: int) -> Generator[ReadRequest, bytes, bytes]:
        per = self.unit // self.block_size
        data = yield ReadRequest(block * per, per)
        return data

    def pointer_ok(self, ptr: int, chain: str, fld: str, src: int) -> bool | None:
        """True: follow; None: end of chain (END or tolerated 0); False: bad pointer."""
        if ptr == END_OF_CHAIN:
            return None
        if ptr == 0:
            self.problem("note", f"{fld} is 0 instead of 0xFFFFFFFF; taken as an empty {chain} list", src, fld)
            return None
        if ptr >= self.unit_count:
            self.problem(
                "error",
                f"{fld} points to block {ptr}, past the end of the disk ({self.unit_count} blocks); "
                f"the rest of the {chain} list is lost",
                src, fld,
            )  # fmt: skip
            return False
        return True

    # ---------------------------------------------------------------- RDSK
    def find_rdsk(self) -> Generator[ReadRequest, bytes, tuple[int, RigidDiskBlock, bytes] | None]:
        limit = min(RDB_LOCATION_LIMIT, self.block_count)
        if limit == 0:
            return None
        raw = yield ReadRequest(0, limit)
        self.first_blocks = raw
        bs = self.block_size
        for blk in range(limit):
            data = raw[blk * bs : (blk + 1) * bs]
            if data[:4] != IDNAME_RIGIDDISK:
                continue
            if checksum_ok(data):
                return blk, RigidDiskBlock.unpack(data), data
            if checksum_ok_zeroed_dc(data):
                self.problem("note", "RDSK checksum verifies only with bytes 0xDC..0xDF zeroed (as Linux accepts)", blk, "rdb_ChkSum")
                return blk, RigidDiskBlock.unpack(data), data
            self.problem("warning", "block says RDSK but its checksum is wrong; ignored", blk, "rdb_ChkSum")
        return None

    # ---------------------------------------------------------------- chains
    def chain_link(
        self, spec: _ChainSpec, ptr: int, src: int, fld: str, visited: set[int]
    ) -> Generator[ReadRequest, bytes, bytes | bool]:
        """One bounded step along an RDB block chain: check the pointer, the loop and
        length guards, read the block and check its ID.  Returns the block's bytes to
        go on, True at a proper end of the chain, False when the chain is broken (the
        problem is recorded with the chain's own words)."""
        ok = self.pointer_ok(ptr, spec.chain, fld, src)
        if ok is None:
            return True
        if not ok:
            return False
        if ptr in visited:
            self.problem("error", spec.loop.format(fld=fld, ptr=ptr), src, fld)
            return False
        if len(visited) >= spec.limit:
            self.problem("error", spec.too_long.format(fld=fld, ptr=ptr), src, fld)
            return False
        visited.add(ptr)
        self.rdb_blocks.add(ptr)
        try:
            data = yield from self.read_rdb_block(ptr)
        except DeviceError as exc:
            self.problem("error", spec.unreadable.format(exc=exc), ptr)
            return False
        if spec.idname is not None and data[:4] != spec.idname:
            self.problem("error", spec.wrong_id.format(found=data[:4]), ptr, spec.id_field)
            return False
        return data

    # ---------------------------------------------------------------- PART chain
    def walk_parts(self, rdsk: RigidDiskBlock, rdsk_block: int) -> Generator[ReadRequest, bytes, list[tuple[int, PartitionBlock]]]:
        found: list[tuple[int, PartitionBlock]] = []
        visited: set[int] = set()
        ptr, src, fld = rdsk.rdb_PartitionList, rdsk_block, "rdb_PartitionList"
        while True:
            data = yield from self.chain_link(_PART_CHAIN, ptr, src, fld, visited)
            if not isinstance(data, bytes):
                break
            part = PartitionBlock.unpack(data)
            if not checksum_ok(data):
                self.problem("error", f"PART {part.drive_name!r} has a bad checksum; partition skipped", ptr, "pb_ChkSum")
            else:
                found.append((ptr, part))
            ptr, src, fld = part.pb_Next, ptr, "pb_Next"
        return found

    # ---------------------------------------------------------------- FSHD + LSEG
    def walk_filesystems(self, rdsk: RigidDiskBlock, rdsk_block: int) -> Generator[ReadRequest, bytes, list[FileSystemHandler]]:
        found: list[FileSystemHandler] = []
        visited: set[int] = set()
        ptr, src, fld = rdsk.rdb_FileSysHeaderList, rdsk_block, "rdb_FileSysHeaderList"
        while True:
            data = yield from self.chain_link(_FSHD_CHAIN, ptr, src, fld, visited)
            if not isinstance(data, bytes):
                break
            fshd = FileSysHeaderBlock.unpack(data)
            if not checksum_ok(data):
                self.problem("error", "FSHD has a bad checksum; handler ignored (partitions are not affected)", ptr, "fhb_ChkSum")
            else:
                code, nblocks, complete = yield from self.load_segments(fshd, ptr)
                found.append(
                    FileSystemHandler(
                        block=ptr, header=fshd, dostype=fshd.fhb_DosType,
                        version=fshd.version_text, lseg_blocks=nblocks, code=code,
                        ver_string=find_ver_string(code), complete=complete,
                    )
                )  # fmt: skip
            ptr, src, fld = fshd.fhb_Next, ptr, "fhb_Next"
        return found

    def load_segments(self, fshd: FileSysHeaderBlock, fshd_block: int) -> Generator[ReadRequest, bytes, tuple[bytes, int, bool]]:
        chunks: list[bytes] = []
        visited: set[int] = set()
        ptr, src, fld = fshd.fhb_SegListBlocks, fshd_block, "fhb_SegListBlocks"
        while True:
            data = yield from self.chain_link(_LSEG_CHAIN, ptr, src, fld, visited)
            if data is True:
                return b"".join(chunks), len(visited), True
            if not isinstance(data, bytes):
                break
            if not checksum_ok(data):
                if len(data) % 4 == 0 and block_sum(data, len(data) // 4) == 0:
                    self.problem(
                        "note",
                        "LSEG checksum covers the whole block, not lsb_SummedLongs longs "
                        "(as amitools writes a short last block); accepted",
                        ptr, "lsb_SummedLongs",
                    )  # fmt: skip
                else:
                    self.problem("error", "LSEG has a bad checksum; handler incomplete", ptr, "lsb_ChkSum")
                    break
            lseg = LoadSegBlock.unpack(data)
            chunks.append(lseg.lsb_LoadData)
            ptr, src, fld = lseg.lsb_Next, ptr, "lsb_Next"
        return b"".join(chunks), len(visited), False

    # ---------------------------------------------------------------- BADB
    def walk_badblocks(self, rdsk: RigidDiskBlock, rdsk_block: int) -> Generator[ReadRequest, bytes, list[tuple[int, int]]]:
        pairs: list[tuple[int, int]] = []
        visited: set[int] = set()
        ptr, src, fld = rdsk.rdb_BadBlockList, rdsk_block, "rdb_BadBlockList"
        while True:
            data = yield from self.chain_link(_BADB_CHAIN, ptr, src, fld, visited)
            if not isinstance(data, bytes):
                break
            if data[:4] != IDNAME_BADBLOCK or not checksum_ok(data):
                self.problem("error", "bad BADB block (ID or checksum); bad-block list ends here", ptr, "bbb_ChkSum")
                break
            badb = BadBlockBlock.unpack(data)
            pairs.extend(p for p in badb.bbb_BlockPairs if p != (0, 0))
            ptr, src, fld = badb.bbb_Next, ptr, "bbb_Next"
        if pairs:
            self.problem("warning", f"the RDB remaps {len(pairs)} bad blocks; amigafuse does not apply the remapping", rdsk_block, "rdb_BadBlockList")
        return pairs

    # ---------------------------------------------------------------- partitions
    def make_partition(self, index: int, blk: int, part: PartitionBlock) -> Partition | None:
        env = part.pb_Environment
        name = part.drive_name
        bad = envec_issues(env)
        if bad:
            for message, fld in bad:
                self.problem("error", f"partition {name!r}: {message}; partition skipped", blk, fld)
            return None
        cyl_bytes = env.de_Surfaces * env.de_BlocksPerTrack * env.de_SizeBlock * 4
        first_byte = env.de_LowCyl * cyl_bytes
        size_bytes = (env.de_HighCyl - env.de_LowCyl + 1) * cyl_bytes
        issues: list[str] = []
        disk_bytes = self.block_count * self.block_size
        if first_byte + size_bytes > disk_bytes:
            msg = (
                f"partition {name!r} (bytes {first_byte}..{first_byte + size_bytes - 1}) reaches past "
                f"the end of the disk ({disk_bytes} bytes)"
            )
            self.problem("error", msg, blk, "de_HighCyl")
            issues.append(msg)
        if first_byte % self.block_size or size_bytes % self.block_size:
            msg = f"partition {name!r} is not aligned to the disk's {self.block_size}-byte blocks"
            self.problem("error", msg, blk, "de_SizeBlock")
            issues.append(msg)
        fs_block = env.de_SizeBlock * 4 * (env.de_SectorPerBlock or 1)
        fs_blocks = size_bytes // fs_block
        if env.de_Reserved + env.de_PreAlloc >= fs_blocks:
            msg = f"partition {name!r}: de_Reserved {env.de_Reserved} + de_PreAlloc {env.de_PreAlloc} leave no blocks"
            self.problem("error", msg, blk, "de_Reserved")
            issues.append(msg)
        geometry = geometry_from_envec(env, block_count=fs_blocks)
        return Partition(
            index=index,
            drive_name=name,
            dostype=geometry.dostype,
            first_byte=first_byte,
            size_bytes=size_bytes,
            first_lba=first_byte // self.block_size,
            block_count=size_bytes // self.block_size,
            bootable=bool(part.pb_Flags & PBFF_BOOTABLE),
            no_automount=bool(part.pb_Flags & PBFF_NOMOUNT),
            boot_pri=geometry.boot_pri,
            geometry=geometry,
            part_block=blk,
            part=part,
            issues=tuple(issues),
        )

    def check_overlaps(self, parts: list[Partition]) -> list[Partition]:
        """Partitions overlapping an earlier one or an RDB block get an issue."""
        result: list[Partition] = []
        for p in parts:
            issues = list(p.issues)
            for q in result:
                if p.first_byte <= q.last_byte and q.first_byte <= p.last_byte:
                    msg = f"partition {p.drive_name!r} overlaps partition {q.drive_name!r}"
                    self.problem("error", msg, p.part_block, "de_LowCyl")
                    issues.append(msg)
            rdb_bytes = {b * self.unit for b in self.rdb_blocks} | {self.rdsk_block * self.block_size}
            hit = sorted(off for off in rdb_bytes if p.first_byte <= off <= p.last_byte)
            if hit:
                msg = (
                    f"partition {p.drive_name!r} covers the RDB block at byte {hit[0]}; "
                    "writing it would destroy the RDB"
                )
                self.problem("error", msg, p.part_block, "de_LowCyl")
                issues.append(msg)
            result.append(p if issues == list(p.issues) else _with_issues(p, issues))
        return result

    # ---------------------------------------------------------------- whole scan
    def run(self) -> ScanGen:
        found = yield from self.find_rdsk()
        if found is None:
            return self.bare()
        rdsk_block, rdsk, _ = found
        self.rdsk_block = rdsk_block  # in device blocks; rdb_blocks are in RDB units
        bb = rdsk.rdb_BlockBytes
        if bb != self.block_size:
            if _power_of_two(bb) and self.block_size < bb <= 65536:
                self.unit = bb
            else:
                self.problem(
                    "warning",
                    f"rdb_BlockBytes {bb} differs from the disk's {self.block_size}-byte blocks; using {self.block_size}",
                    rdsk_block, "rdb_BlockBytes",
                )  # fmt: skip
        if rdsk.rdb_CylBlocks == 0:
            self.problem("note", "rdb_CylBlocks is 0 (tolerated; partitions use their own DosEnvec)", rdsk_block, "rdb_CylBlocks")
        elif rdsk.rdb_CylBlocks != rdsk.rdb_Heads * rdsk.rdb_Sectors:
            self.problem("warning", f"rdb_CylBlocks {rdsk.rdb_CylBlocks} != rdb_Heads x rdb_Sectors", rdsk_block, "rdb_CylBlocks")
        part_blocks = yield from self.walk_parts(rdsk, rdsk_block)
        filesystems = yield from self.walk_filesystems(rdsk, rdsk_block)
        bad_blocks = yield from self.walk_badblocks(rdsk, rdsk_block)
        parts = [p for i, (blk, pb) in enumerate(part_blocks) if (p := self.make_partition(i, blk, pb)) is not None]
        parts = self.check_overlaps(parts)
        return DiskLayout(
            kind="rdb",
            block_size=self.block_size,
            block_count=self.block_count,
            rdsk_block=rdsk_block,
            rdsk=rdsk,
            rdb_block_bytes=self.unit,
            partitions=tuple(parts),
            filesystems=tuple(filesystems),
            bad_blocks=tuple(bad_blocks),
            problems=tuple(self.problems),
        )

    def bare(self) -> DiskLayout:
        first = self.first_blocks
        dostype = int.from_bytes(first[:4], "big") if len(first) >= 4 else 0
        if not is_volume_dostype(dostype):
            self.problem("warning", "no RDB in blocks 0..15 and no Amiga volume at block 0")
            return DiskLayout(
                kind="none", block_size=self.block_size, block_count=self.block_count,
                problems=tuple(self.problems), bare_dostype=None,
            )  # fmt: skip
        return DiskLayout(
            kind="bare",
            block_size=self.block_size,
            block_count=self.block_count,
            partitions=(bare_partition(self.block_size, self.block_count, dostype),),
            problems=tuple(self.problems),
            bare_dostype=dostype,
        )


def _with_issues(p: Partition, issues: list[str]) -> Partition:
    return replace(p, issues=tuple(issues))


def bare_partition(block_size: int, block_count: int, dostype: int) -> Partition:
    """The single partition of a volume that starts at block 0 (ADF floppy or hardfile)."""
    size_bytes = block_size * block_count
    blocks_512 = size_bytes // 512
    if block_size == 512 and blocks_512 in (ADF_DD_BLOCKS, ADF_HD_BLOCKS):
        per_track = 11 if blocks_512 == ADF_DD_BLOCKS else 22
        name, surfaces, high_cyl = "DF0", 2, 79
    else:
        per_track, name, surfaces, high_cyl = 1, "DH0", 1, block_count - 1
    geometry = VolumeGeometry(
        dostype=dostype,
        fs_block_size=block_size,
        fs_block_count=block_count,
        reserved=2,
        prealloc=0,
        size_block_bytes=block_size,
        surfaces=surfaces,
        blocks_per_track=per_track,
        low_cyl=0,
        high_cyl=high_cyl,
        boot_blocks=2,
    )
    return Partition(
        index=0, drive_name=name, dostype=dostype, first_byte=0, size_bytes=size_bytes,
        first_lba=0, block_count=block_count, bootable=True, no_automount=False,
        boot_pri=0, geometry=geometry,
    )  # fmt: skip


def scan_disk(block_size: int, block_count: int) -> ScanGen:
    """The scanner generator for a device of ``block_count`` blocks of ``block_size``."""
    if block_size < 256 or not _power_of_two(block_size):
        raise CorruptError(f"device block size {block_size} is not a power of two >= 256")
    return _Scan(block_size, block_count).run()


def scan_bytes(image: bytes | bytearray | memoryview, block_size: int = 512) -> DiskLayout:
    """Run the scanner over an image held in memory (a trailing partial block is ignored)."""
    view = memoryview(image)
    count = len(view) // block_size
    gen = scan_disk(block_size, count)
    try:
        req = next(gen)
        while True:
            if req.lba < 0 or req.lba + req.count > count:
                raise AssertionError(f"scanner asked for blocks outside the device: {req}")
            req = gen.send(bytes(view[req.lba * block_size : (req.lba + req.count) * block_size]))
    except StopIteration as stop:
        layout: DiskLayout = stop.value
        return layout


async def scan_device(device: BlockDevice) -> DiskLayout:
    """Scan an async BlockDevice.  Raises DeviceError when blocks 0..15 cannot be read.

    Cancellation: safe at every await (the scan holds no state outside this call)."""
    gen = scan_disk(device.block_size, device.block_count)
    try:
        req = next(gen)
        while True:
            try:
                data = await device.read(req.lba, req.count)
            except DeviceError as exc:
                req = gen.throw(exc)
            else:
                req = gen.send(data)
    except StopIteration as stop:
        layout: DiskLayout = stop.value
        return layout


__all__ = [
    "DiskLayout",
    "FileSystemHandler",
    "Partition",
    "Problem",
    "ReadRequest",
    "bare_partition",
    "find_ver_string",
    "geometry_from_envec",
    "is_volume_dostype",
    "scan_bytes",
    "scan_device",
    "scan_disk",
]
