"""The mounter: mounter.library's rules for turning scanned units into DOS devices.

Pure rules (:class:`Mounter`) plus a thin async layer (:func:`probe_volume_types`,
:func:`announce_unit`).  The driver finds units; for each one the caller scans it
(:func:`amigafuse.rdb.scan.scan_device`), reads the first block of every partition (the
volume's own DosType) and hands both to :meth:`Mounter.add_unit`, which returns one
:class:`Announcement` per partition, in RDB order.  :meth:`Mounter.remove_unit` withdraws a
unit's announcements and frees its names.

Naming rule (deterministic; docs/rdb.md): a partition keeps its PART name (pb_DriveName)
with ``/``, ``:`` and control characters replaced by ``_``; an empty name becomes
``PART<index>``.  Names compare case-insensitively, as AmigaDOS does.  When the name is
already taken by an earlier announcement (another unit, or an earlier partition of the
same unit), it gets the smallest free suffix ``.1``, ``.2`` ... (``DH0`` on two disks:
``DH0`` and ``DH0.1``).  Units are named in the order they are added, so the same
disks in the same order always get the same names; a withdrawn unit frees its names.

Mountable: the partition passed the scanner's checks, its first block holds a known
volume DosType, and an engine handles that DosType.  The volume's own DosType decides
(as the handler reads it from disk); the PART's de_DosType is reported beside it.  A
partition flagged PBFF_NOMOUNT is announced with ``automount`` False.

``rdb`` never imports ``fs``: the caller passes ``engine_lookup`` (DosType -> engine
name or None).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import trio

from amigafuse.amiga.dostype import common_name, dostype_to_str
from amigafuse.amiga.geometry import VolumeGeometry
from amigafuse.blockdev.base import BlockDevice
from amigafuse.blockdev.window import PartitionDevice
from amigafuse.errors import DeviceError
from amigafuse.rdb.scan import DiskLayout, Partition, is_volume_dostype, scan_device

EngineLookup = Callable[[int], str | None]

_BAD_CHARS = {"/", ":"}


def sanitize_name(name: str, index: int) -> str:
    """A DOS device name that is safe as a path component and in an AmigaDOS path."""
    clean = "".join("_" if (c in _BAD_CHARS or ord(c) < 0x20 or ord(c) == 0x7F) else c for c in name)
    clean = clean.strip()
    if clean in ("", ".", ".."):
        return f"PART{index}"
    return clean


@dataclass(frozen=True)
class Announcement:
    """One partition of one unit, as the mounter presents it.

    ``geometry`` is what engines open the volume with; its ``dostype`` is the volume's
    own DosType when block 0 holds a known one, else the PART's.  ``parent`` is the unit's
    device (None in pure tests); :meth:`open_device` gives the partition window."""

    unit: str
    dos_name: str
    partition: Partition
    part_dostype: int
    volume_dostype: int | None
    engine: str | None
    mountable: bool
    automount: bool
    reason: str | None
    geometry: VolumeGeometry
    parent: BlockDevice | None = field(default=None, compare=False, repr=False)

    @property
    def index(self) -> int:
        return self.partition.index

    @property
    def boot_pri(self) -> int:
        return self.partition.boot_pri

    @property
    def bootable(self) -> bool:
        return self.partition.bootable

    @property
    def no_automount(self) -> bool:
        return self.partition.no_automount

    @property
    def first_byte(self) -> int:
        return self.partition.first_byte

    @property
    def size_bytes(self) -> int:
        return self.partition.size_bytes

    def open_device(self, *, read_only: bool = False) -> PartitionDevice:
        """The partition window on the unit's device.  Raises OutOfRange if it does not fit."""
        if self.parent is None:
            raise ValueError("this announcement has no device (made without one)")
        p = self.partition
        return PartitionDevice(self.parent, p.first_lba, p.block_count, read_only=read_only)


@dataclass(frozen=True)
class Withdrawal:
    unit: str
    dos_name: str


def judge(
    partition: Partition, volume_dostype: int | None, engine_lookup: EngineLookup
) -> tuple[int | None, str | None, bool, str | None]:
    """(effective volume DosType, engine name, mountable, reason) for one partition."""
    if partition.issues:
        return None, None, False, "; ".join(partition.issues)
    if volume_dostype is None:
        return None, None, False, "the partition's first block cannot be read"
    if not is_volume_dostype(volume_dostype):
        return (
            None,
            None,
            False,
            f"no filesystem: the partition's first block holds {volume_dostype:#010x}, not a "
            f"volume (the RDB says {dostype_to_str(partition.dostype)}); unformatted? "
            f"'amigafuse format' makes one",
        )
    engine = engine_lookup(volume_dostype)
    if engine is None:
        return (
            volume_dostype,
            None,
            False,
            f"amigafuse has no engine for {dostype_to_str(volume_dostype)} "
            f"({common_name(volume_dostype)})",
        )
    return volume_dostype, engine, True, None


class Mounter:
    """Pure naming and mountability rules; see the module docstring."""

    def __init__(self, engine_lookup: EngineLookup) -> None:
        self._lookup = engine_lookup
        self._names: dict[str, str] = {}  # upper-case DOS name -> unit
        self._units: dict[str, list[Announcement]] = {}

    @property
    def units(self) -> list[str]:
        return list(self._units)

    def announcements(self) -> list[Announcement]:
        return [a for anns in self._units.values() for a in anns]

    def _claim(self, wanted: str, unit: str) -> str:
        name = wanted
        n = 0
        while name.upper() in self._names:
            n += 1
            name = f"{wanted}.{n}"
        self._names[name.upper()] = unit
        return name

    def add_unit(
        self,
        unit: str,
        layout: DiskLayout,
        volume_types: Mapping[int, int | None],
        parent: BlockDevice | None = None,
    ) -> list[Announcement]:
        """Announce every partition of a new unit, in RDB order.

        ``volume_types`` maps partition index -> the big-endian long at the partition's
        first byte (None when unreadable).  Raises ValueError for a unit already added."""
        if unit in self._units:
            raise ValueError(f"unit {unit!r} is already announced")
        out: list[Announcement] = []
        for p in layout.partitions:
            vol, engine, mountable, reason = judge(p, volume_types.get(p.index), self._lookup)
            geometry = p.geometry if vol is None else replace(p.geometry, dostype=vol)
            automount = mountable and not p.no_automount
            if mountable and p.no_automount:
                reason = "marked no-automount in the RDB (PBFF_NOMOUNT); mount it by name"
            out.append(
                Announcement(
                    unit=unit, dos_name=self._claim(sanitize_name(p.drive_name, p.index), unit),
                    partition=p, part_dostype=p.dostype, volume_dostype=vol, engine=engine,
                    mountable=mountable, automount=automount, reason=reason,
                    geometry=geometry, parent=parent,
                )
            )  # fmt: skip
        self._units[unit] = out
        return out

    def remove_unit(self, unit: str) -> list[Withdrawal]:
        """Withdraw a unit's announcements (empty list for an unknown unit)."""
        anns = self._units.pop(unit, [])
        for a in anns:
            self._names.pop(a.dos_name.upper(), None)
        return [Withdrawal(unit, a.dos_name) for a in anns]


# --------------------------------------------------------------------------- async layer


async def probe_volume_types(device: BlockDevice, layout: DiskLayout) -> dict[int, int | None]:
    """Partition index -> DosType long at the partition's first byte (None if unreadable).

    Cancellation: safe (reads only)."""
    out: dict[int, int | None] = {}
    for p in layout.partitions:
        if p.issues or p.block_count == 0 or p.first_lba + 1 > device.block_count:
            out[p.index] = None
            continue
        try:
            data = await device.read(p.first_lba, 1)
        except DeviceError:
            out[p.index] = None
            continue
        out[p.index] = int.from_bytes(data[:4], "big")
    return out


async def announce_unit(
    mounter: Mounter, unit: str, device: BlockDevice
) -> tuple[DiskLayout, list[Announcement]]:
    """Scan a unit, probe its volumes and announce its partitions.

    Raises DeviceError when the unit's first blocks cannot be read.  Cancellation:
    the mounter is only changed by the final synchronous add_unit, so a cancelled call
    leaves it as it was."""
    layout = await scan_device(device)
    volume_types = await probe_volume_types(device, layout)
    return layout, mounter.add_unit(unit, layout, volume_types, device)


def select_partition(anns: list[Announcement], name: str | None, source: str) -> Announcement:
    """The announcement the user named (DOS name or PART name, case-insensitive), or the
    only one when ``name`` is None.  Raises UsageError listing the choices otherwise."""
    from amigafuse.errors import UsageError

    choices = ", ".join(a.dos_name for a in anns) or "none"
    if name is None:
        if len(anns) == 1:
            return anns[0]
        raise UsageError(f"{source} has {len(anns)} partitions ({choices}): choose one with --partition NAME")
    wanted = name.upper()
    for a in anns:
        if a.dos_name.upper() == wanted:
            return a
    for a in anns:
        if a.partition.drive_name.upper() == wanted:
            return a
    raise UsageError(f"{source} has no partition {name!r}; it has: {choices}")


# --------------------------------------------------------------------------- service


@dataclass(frozen=True)
class UnitFailed:
    """A unit whose first blocks could not be read: nothing is announced for it."""

    unit: str
    error: Exception


MounterEvent = Announcement | Withdrawal | UnitFailed


class MounterService:
    """Announcements as units come and go, scanned concurrently, named deterministically.

    Use :func:`open_mounter`.  :meth:`unit_found` starts scanning a unit in the
    service's nursery and returns at once; :meth:`unit_lost` withdraws one.  Events
    (Announcement, Withdrawal, UnitFailed) arrive on :attr:`events` in this order: a
    unit's announcements come together, in RDB order, and units are announced in the
    order they were found whatever order their scans finish in — so names do not
    depend on timing.  Invariant: ``_turn[n]`` is set once unit n has been announced
    (or failed); unit n+1 waits for it before calling the pure ``add_unit``.
    """

    def __init__(
        self,
        mounter: Mounter,
        nursery: trio.Nursery,
        send: trio.MemorySendChannel[MounterEvent],
        receive: trio.MemoryReceiveChannel[MounterEvent],
    ) -> None:
        self.mounter = mounter
        self._nursery = nursery
        self._send = send
        self.events = receive
        self._turns: list[trio.Event] = []
        self._generation: dict[str, int] = {}  # bumped by unit_found and unit_lost

    def unit_found(self, unit: str, device: BlockDevice) -> None:
        """Scan ``unit`` in the background; its events follow those of earlier units."""
        prev = self._turns[-1] if self._turns else None
        mine = trio.Event()
        self._turns.append(mine)
        generation = self._generation.get(unit, 0) + 1
        self._generation[unit] = generation
        self._nursery.start_soon(self._scan, unit, device, prev, mine, generation)

    async def _scan(
        self,
        unit: str,
        device: BlockDevice,
        prev: trio.Event | None,
        mine: trio.Event,
        generation: int,
    ) -> None:
        try:
            try:
                layout = await scan_device(device)
                volume_types = await probe_volume_types(device, layout)
                failure: Exception | None = None
            except DeviceError as exc:
                failure = exc
            if prev is not None:
                await prev.wait()
            if self._generation.get(unit) != generation:  # lost or found again meanwhile
                return
            if unit in self.mounter.units:  # found again without being lost first
                for w in self.mounter.remove_unit(unit):
                    await self._send.send(w)
            if failure is not None:
                await self._send.send(UnitFailed(unit, failure))
                return
            # No await between add_unit and the sends' ordering: events of one unit
            # are sent before the next unit's turn begins.
            for ann in self.mounter.add_unit(unit, layout, volume_types, device):
                await self._send.send(ann)
        finally:
            mine.set()

    async def unit_lost(self, unit: str) -> None:
        """Withdraw ``unit``'s announcements (none if it was never announced)."""
        self._generation[unit] = self._generation.get(unit, 0) + 1
        for w in self.mounter.remove_unit(unit):
            await self._send.send(w)


@asynccontextmanager
async def open_mounter(
    engine_lookup: EngineLookup, *, buffer: int = 256
) -> AsyncIterator[MounterService]:
    """``async with open_mounter(lookup) as service:`` — a :class:`MounterService` whose
    scans run in a nursery owned by this context manager.  Leaving it waits for scans
    in progress (cancel the enclosing scope to abandon them) and closes ``events``."""
    send, receive = trio.open_memory_channel[MounterEvent](buffer)
    async with send, trio.open_nursery() as nursery:
        yield MounterService(Mounter(engine_lookup), nursery, send, receive)
