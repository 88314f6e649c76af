"""The RDB writer: lay out a new disk like HDToolBox and encode its RDB blocks.

Pure: :func:`plan_disk` turns a disk size and partition requests into a
:class:`DiskPlan` (geometry, cylinder ranges, the RDB blocks as bytes); the async
:func:`write_rdb` writes a plan to a BlockDevice.

Layout rules (docs/rdb.md):

* Geometry: up to 128 MiB, 2 heads x 32 sectors (32 KiB cylinders, fine-grained for
  small images); above, 16 heads x 63 sectors (504 KiB cylinders, what HDToolBox and
  most SCSI-to-CHS translations give).  Cylinders = whole cylinders in the disk.
* The RDB owns cylinders 0..1 (more if a stored handler needs them): blocks
  RDSK (0), PART (1..n), FSHD, LSEG... in that order; rdb_RDBBlocksHi is the last block
  of the reserved cylinders; partitions start at rdb_LoCylinder.
* Partition sizes round up to whole cylinders; a size of None ("rest") takes every
  cylinder left and may only be the last.  Partitions follow each other without gaps.
* PART DosEnvec: de_TableSize 16, de_SizeBlock 128 (512-byte sectors), de_Reserved 2,
  de_NumBuffers 30, de_MaxTransfer 0x00FFFFFF, de_Mask 0x7FFFFFFE; the first partition is
  bootable unless the request says otherwise.
* A handler is stored as one FSHD (fhb_PatchFlags 0x180: SegList and GlobalVec,
  fhb_GlobalVec -1) and a chain of LSEG blocks holding the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from amigafuse.blockdev.base import BlockDevice
from amigafuse.errors import UsageError
from amigafuse.rdb.blocks import (
    END_OF_CHAIN,
    FHB_PATCH_GLOBALVEC,
    FHB_PATCH_SEGLIST,
    IDNAME_FILESYSHEADER,
    IDNAME_LOADSEG,
    IDNAME_PARTITION,
    IDNAME_RIGIDDISK,
    PBFF_BOOTABLE,
    PBFF_NOMOUNT,
    RDBFF_LAST,
    RDBFF_LASTLUN,
    RDBFF_LASTTID,
    DosEnvec,
    FileSysHeaderBlock,
    LoadSegBlock,
    PartitionBlock,
    RigidDiskBlock,
    bstr_encode,
    to_unsigned,
)

HOST_ID = 7  # the SCSI ID HDToolBox writes for the host adapter
SMALL_DISK_BYTES = 128 << 20
RDB_CYLINDERS = 2
MAX_NAME = 31


@dataclass(frozen=True)
class PartitionSpec:
    """A partition to create.  ``size_bytes`` None = the rest of the disk."""

    name: str
    dostype: int
    size_bytes: int | None
    bootable: bool | None = None  # None: only the first partition
    boot_pri: int = 0
    no_automount: bool = False
    sectors_per_block: int = 1
    reserved: int = 2


@dataclass(frozen=True)
class HandlerSpec:
    """A filesystem handler binary to store in the RDB."""

    dostype: int
    code: bytes
    version: int = 0  # major << 16 | minor


@dataclass(frozen=True)
class DiskGeometry:
    cylinders: int
    heads: int
    sectors: int
    block_size: int = 512

    @property
    def cyl_blocks(self) -> int:
        return self.heads * self.sectors

    @property
    def cyl_bytes(self) -> int:
        return self.cyl_blocks * self.block_size


@dataclass(frozen=True)
class PlannedPartition:
    spec: PartitionSpec
    low_cyl: int
    high_cyl: int
    first_lba: int
    block_count: int


@dataclass(frozen=True)
class DiskPlan:
    geometry: DiskGeometry
    rdb_cylinders: int
    partitions: tuple[PlannedPartition, ...]
    blocks: tuple[tuple[int, bytes], ...]  # (lba, block) of every RDB block

    @property
    def rdb_block_count(self) -> int:
        return self.rdb_cylinders * self.geometry.cyl_blocks


def choose_geometry(size_bytes: int, block_size: int = 512) -> DiskGeometry:
    """HDToolBox-like CHS for a disk of ``size_bytes`` (see the module docstring)."""
    heads, sectors = (2, 32) if size_bytes <= SMALL_DISK_BYTES else (16, 63)
    cylinders = size_bytes // (heads * sectors * block_size)
    return DiskGeometry(cylinders, heads, sectors, block_size)


def version_from_code(code: bytes) -> int:
    """``major << 16 | minor`` from a ``$VER: name 45.13 (date)`` string, else 0."""
    m = re.search(rb"\$VER: ?[^\x00\r\n]*?(\d+)\.(\d+)", code)
    if not m:
        return 0
    return (min(int(m.group(1)), 0xFFFF) << 16) | min(int(m.group(2)), 0xFFFF)


def _check_spec(spec: PartitionSpec) -> None:
    if not spec.name or len(spec.name.encode("latin-1", "replace")) > MAX_NAME:
        raise UsageError(f"partition name {spec.name!r} must be 1..{MAX_NAME} characters")
    if any(c in spec.name for c in "/:") or any(ord(c) < 0x20 for c in spec.name):
        raise UsageError(f"partition name {spec.name!r} may not contain '/', ':' or control characters")
    spb = spec.sectors_per_block
    if spb < 1 or spb & (spb - 1) or spb > 128:
        raise UsageError(f"sectors per block {spb} must be a power of two up to 128")
    if not -128 <= spec.boot_pri <= 127:
        raise UsageError(f"boot priority {spec.boot_pri} must be in -128..127")


def plan_disk(
    size_bytes: int,
    partitions: list[PartitionSpec],
    handler: HandlerSpec | None = None,
    *,
    geometry: DiskGeometry | None = None,
) -> DiskPlan:
    """Lay out a disk.  Raises UsageError when the request does not fit or is malformed."""
    geo = geometry or choose_geometry(size_bytes)
    if not partitions:
        raise UsageError("give at least one --partition NAME:TYPE:SIZE")
    names = [p.name.upper() for p in partitions]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UsageError(f"two partitions are called {dup}: DOS names must be unique on a disk")
    for i, spec in enumerate(partitions):
        _check_spec(spec)
        if spec.size_bytes is None and i != len(partitions) - 1:
            raise UsageError(f"partition {spec.name}: 'rest' may only be the size of the last partition")
    bs = geo.block_size
    lseg_data = bs - 20
    code = b""
    if handler is not None:
        code = handler.code + bytes(-len(handler.code) % 4)
        if not code:
            raise UsageError("the handler file is empty")
    lseg_count = -(-len(code) // lseg_data) if handler is not None else 0
    rdb_blocks_needed = 1 + len(partitions) + (1 + lseg_count if handler is not None else 0)
    rdb_cyls = max(RDB_CYLINDERS, -(-rdb_blocks_needed // geo.cyl_blocks))
    if geo.cylinders <= rdb_cyls:
        raise UsageError(
            f"a disk of {size_bytes} bytes has {geo.cylinders} cylinders of {geo.cyl_bytes} bytes; "
            f"the RDB alone needs {rdb_cyls}: make it larger"
        )
    planned: list[PlannedPartition] = []
    cyl = rdb_cyls
    for spec in partitions:
        left = geo.cylinders - cyl
        ncyl = left if spec.size_bytes is None else max(1, -(-spec.size_bytes // geo.cyl_bytes))
        if ncyl <= 0 or ncyl > left:
            raise UsageError(
                f"partition {spec.name} needs {ncyl} cylinders of {geo.cyl_bytes} bytes but only "
                f"{max(left, 0)} are left on the {geo.cylinders}-cylinder disk: give smaller sizes "
                f"or a larger --size"
            )
        fs_blocks = ncyl * geo.cyl_blocks // spec.sectors_per_block
        if spec.reserved + 2 >= fs_blocks:
            raise UsageError(f"partition {spec.name} is too small for a filesystem")
        planned.append(
            PlannedPartition(spec, cyl, cyl + ncyl - 1, cyl * geo.cyl_blocks, ncyl * geo.cyl_blocks)
        )
        cyl += ncyl
    blocks = _encode(geo, rdb_cyls, planned, handler, code)
    return DiskPlan(geo, rdb_cyls, tuple(planned), tuple(blocks))


def _encode(
    geo: DiskGeometry,
    rdb_cyls: int,
    planned: list[PlannedPartition],
    handler: HandlerSpec | None,
    code: bytes,
) -> list[tuple[int, bytes]]:
    bs = geo.block_size
    part_lbas = list(range(1, 1 + len(planned)))
    fshd_lba = 1 + len(planned) if handler is not None else None
    lseg_data = bs - 20
    chunks = [code[i : i + lseg_data] for i in range(0, len(code), lseg_data)]
    lseg_lbas = [2 + len(planned) + i for i in range(len(chunks))]
    high = max([0, *part_lbas, *([fshd_lba] if fshd_lba is not None else []), *lseg_lbas])
    tail = bytes(bs - 256)
    rdsk = RigidDiskBlock(
        rdb_ID=IDNAME_RIGIDDISK, rdb_SummedLongs=64, rdb_ChkSum=0, rdb_HostID=HOST_ID,
        rdb_BlockBytes=bs, rdb_Flags=RDBFF_LAST | RDBFF_LASTLUN | RDBFF_LASTTID,
        rdb_BadBlockList=END_OF_CHAIN, rdb_PartitionList=part_lbas[0] if part_lbas else END_OF_CHAIN,
        rdb_FileSysHeaderList=fshd_lba if fshd_lba is not None else END_OF_CHAIN,
        rdb_DriveInit=END_OF_CHAIN, rdb_Reserved1=(END_OF_CHAIN,) * 6,
        rdb_Cylinders=geo.cylinders, rdb_Sectors=geo.sectors, rdb_Heads=geo.heads,
        rdb_Interleave=1, rdb_Park=geo.cylinders, rdb_Reserved2=(0,) * 3,
        rdb_WritePreComp=geo.cylinders, rdb_ReducedWrite=geo.cylinders, rdb_StepRate=3,
        rdb_Reserved3=(0,) * 5, rdb_RDBBlocksLo=0, rdb_RDBBlocksHi=rdb_cyls * geo.cyl_blocks - 1,
        rdb_LoCylinder=rdb_cyls, rdb_HiCylinder=geo.cylinders - 1, rdb_CylBlocks=geo.cyl_blocks,
        rdb_AutoParkSeconds=0, rdb_HighRDSKBlock=high, rdb_Reserved4=0,
        rdb_DiskVendor=bytes(8), rdb_DiskProduct=bytes(16), rdb_DiskRevision=bytes(4),
        rdb_ControllerVendor=bytes(8), rdb_ControllerProduct=bytes(16),
        rdb_ControllerRevision=bytes(4), rdb_DriveInitName=bytes(40), tail=tail,
    ).seal()  # fmt: skip
    out: list[tuple[int, bytes]] = [(0, rdsk.pack())]
    for i, (lba, pp) in enumerate(zip(part_lbas, planned, strict=True)):
        spec = pp.spec
        bootable = spec.bootable if spec.bootable is not None else i == 0
        flags = (PBFF_BOOTABLE if bootable else 0) | (PBFF_NOMOUNT if spec.no_automount else 0)
        env = DosEnvec(
            de_TableSize=16, de_SizeBlock=bs // 4, de_SecOrg=0, de_Surfaces=geo.heads,
            de_SectorPerBlock=spec.sectors_per_block, de_BlocksPerTrack=geo.sectors,
            de_Reserved=spec.reserved, de_PreAlloc=0, de_Interleave=0, de_LowCyl=pp.low_cyl,
            de_HighCyl=pp.high_cyl, de_NumBuffers=30, de_BufMemType=0,
            de_MaxTransfer=0x00FFFFFF, de_Mask=0x7FFFFFFE,
            de_BootPri=to_unsigned(spec.boot_pri), de_DosType=spec.dostype,
            de_Baud=0, de_Control=0, de_BootBlocks=0,
        )  # fmt: skip
        nxt = part_lbas[i + 1] if i + 1 < len(part_lbas) else END_OF_CHAIN
        part = PartitionBlock(
            pb_ID=IDNAME_PARTITION, pb_SummedLongs=64, pb_ChkSum=0, pb_HostID=HOST_ID,
            pb_Next=nxt, pb_Flags=flags, pb_Reserved1=(0, 0), pb_DevFlags=0,
            pb_DriveName=bstr_encode(spec.name, 32), pb_Reserved2=(0,) * 15,
            pb_Environment=env, pb_EReserved=(0,) * 12, tail=tail,
        ).seal()  # fmt: skip
        out.append((lba, part.pack()))
    if handler is not None and fshd_lba is not None:
        fshd = FileSysHeaderBlock(
            fhb_ID=IDNAME_FILESYSHEADER, fhb_SummedLongs=64, fhb_ChkSum=0, fhb_HostID=HOST_ID,
            fhb_Next=END_OF_CHAIN, fhb_Flags=0, fhb_Reserved1=(0, 0), fhb_DosType=handler.dostype,
            fhb_Version=handler.version, fhb_PatchFlags=FHB_PATCH_SEGLIST | FHB_PATCH_GLOBALVEC,
            fhb_Type=0, fhb_Task=0, fhb_Lock=0, fhb_Handler=0, fhb_StackSize=0, fhb_Priority=0,
            fhb_Startup=0, fhb_SegListBlocks=lseg_lbas[0], fhb_GlobalVec=END_OF_CHAIN,
            fhb_Reserved2=(0,) * 23, fhb_Reserved3=(0,) * 21, tail=tail,
        ).seal()  # fmt: skip
        out.append((fshd_lba, fshd.pack()))
        for i, (lba, chunk) in enumerate(zip(lseg_lbas, chunks, strict=True)):
            nxt = lseg_lbas[i + 1] if i + 1 < len(lseg_lbas) else END_OF_CHAIN
            lseg = LoadSegBlock(
                lsb_ID=IDNAME_LOADSEG, lsb_SummedLongs=5 + len(chunk) // 4, lsb_ChkSum=0,
                lsb_HostID=HOST_ID, lsb_Next=nxt, lsb_LoadData=chunk,
                tail=bytes(bs - 20 - len(chunk)),
            ).seal()  # fmt: skip
            out.append((lba, lseg.pack()))
    return out


async def write_rdb(device: BlockDevice, plan: DiskPlan) -> None:
    """Write the plan's RDB: zero the RDB cylinders and each partition's first two
    blocks (so no stale volume shows through), then the RDB blocks, then flush.

    Raises UsageError when the device is smaller than the plan, DeviceErrors from the
    device.  Cancellation: a cancelled write leaves a partial RDB (rewrite it)."""
    geo = plan.geometry
    if device.block_size != geo.block_size:
        raise UsageError(f"the device has {device.block_size}-byte blocks; the plan needs {geo.block_size}")
    if device.block_count < geo.cylinders * geo.cyl_blocks:
        raise UsageError("the device is smaller than the planned disk")
    zero_run = 256
    total = plan.rdb_block_count
    for lba in range(0, total, zero_run):
        n = min(zero_run, total - lba)
        await device.write(lba, bytes(n * geo.block_size))
    for pp in plan.partitions:
        await device.write(pp.first_lba, bytes(2 * geo.block_size))
    for lba, data in plan.blocks:
        await device.write(lba, data)
    await device.flush()
