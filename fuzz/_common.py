"""Shared parts of the hostile-image fuzz harnesses (see fuzz/README.md).

A harness takes a small valid image made by our own ``format`` code, lets the fuzzer's
bytes mutate its metadata blocks (which block, which offset, what value, whether the
checksum is fixed afterwards), and then drives the engine the way a user would:
read-only mount and a full walk, the checker, and on a copy a read-write mount with a few
writes followed by the checker again.

What counts as a finding (raised, so the fuzzer records the input):

* any exception that is not an :class:`~amigafuse.errors.AmigaFuseError` (IndexError,
  struct.error, RecursionError, AssertionError, ExceptionGroup...);
* a walk that exceeds the trio time bound (``trio.TooSlowError``) or the wall-clock
  alarm (:class:`Hang`);
* a write on the volume that touches a block outside the partition window, or that
  leaves a volume the checker found clean unclean, or with more checker errors than
  before (:class:`Damage`).
"""

from __future__ import annotations

import contextlib
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from amigafuse.amiga.geometry import VolumeGeometry  # noqa: E402
from amigafuse.blockdev.base import BlockDevice  # noqa: E402
from amigafuse.blockdev.memory import MemoryBlockDevice  # noqa: E402
from amigafuse.blockdev.window import PartitionDevice  # noqa: E402
from amigafuse.errors import AmigaFuseError, MediumError  # noqa: E402
from amigafuse.fs import CheckReport, Engine  # noqa: E402
from amigafuse.fs.api import Kind, Volume  # noqa: E402

TIME_BOUND_S = 5.0  # trio.fail_after per phase of one input
WALL_BOUND_S = 30  # SIGALRM: a loop that never reaches a checkpoint
GUARD_BLOCKS = 16  # device blocks before and after the partition window
GUARD_BYTE = 0xA5
MAX_READ_BYTES = 1 << 20
MAX_ENTRIES = 5000  # a walk visits at most this many entries
MAX_DEPTH = 40


# Dates written by format and by the writes come from time.time(): a fixed clock makes
# the base images, and so every saved input, replay byte for byte in another process.
FIXED_UNIX_TIME = 1_700_000_000.0


@contextlib.contextmanager
def fixed_clock() -> Iterator[None]:
    """``time.time()`` returns FIXED_UNIX_TIME in the body (then the real clock again)."""
    real = time.time
    time.time = lambda: FIXED_UNIX_TIME
    try:
        yield
    finally:
        time.time = real


class Hang(Exception):
    """An input ran past the wall-clock bound."""


class Damage(Exception):
    """A write damaged something it must not have."""


class DataProvider(Protocol):
    """The subset of atheris.FuzzedDataProvider the mutator uses."""

    def ConsumeIntInRange(self, lo: int, hi: int) -> int: ...
    def ConsumeBool(self) -> bool: ...
    def remaining_bytes(self) -> int: ...


class BytesProvider:
    """A FuzzedDataProvider stand-in over plain bytes (replay without atheris, tests)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, count: int) -> int:
        chunk = self._data[self._pos : self._pos + count]
        self._pos += len(chunk)
        return int.from_bytes(chunk.ljust(count, b"\0"), "big")

    def ConsumeIntInRange(self, lo: int, hi: int) -> int:
        span = hi - lo
        if span <= 0:
            return lo
        nbytes = (span.bit_length() + 7) // 8
        return lo + self._take(nbytes) % (span + 1)

    def ConsumeBool(self) -> bool:
        return bool(self._take(1) & 1)

    def remaining_bytes(self) -> int:
        return max(0, len(self._data) - self._pos)


@dataclass(frozen=True)
class BaseImage:
    """A formatted, populated volume and what the mutator needs to know about it."""

    name: str
    engine: Engine
    geometry: VolumeGeometry
    data: bytes  # the partition's bytes
    block_size: int  # filesystem block size
    meta_blocks: tuple[int, ...]  # filesystem blocks worth mutating
    fix_checksum: Callable[[bytearray, int], None]  # (block bytes, block number)
    interesting: tuple[int, ...]  # values worth writing (block numbers, type ids...)


# --------------------------------------------------------------------------- mutation


@dataclass(frozen=True)
class Mutation:
    block: int
    offset: int
    kind: str
    value: int
    fixed: bool

    def __str__(self) -> str:
        fix = " +checksum" if self.fixed else ""
        return f"block {self.block} +{self.offset}: {self.kind} {self.value:#x}{fix}"


def mutate(fdp: DataProvider, base: BaseImage) -> tuple[bytearray, list[Mutation]]:
    """1-4 mutations of ``base.data``'s metadata blocks, decided by the fuzzer's bytes."""
    raw = bytearray(base.data)
    bs = base.block_size
    done: list[Mutation] = []
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        if fdp.remaining_bytes() == 0:
            break
        block = base.meta_blocks[fdp.ConsumeIntInRange(0, len(base.meta_blocks) - 1)]
        start = block * bs
        kind_no = fdp.ConsumeIntInRange(0, 6)
        offset = fdp.ConsumeIntInRange(0, bs // 4 - 1) * 4
        if kind_no == 6:  # an offset near the end (the fields FFS keeps at B-200.. B-4)
            offset = bs - 4 * fdp.ConsumeIntInRange(1, 56)
        kind, value = "u32", 0
        if kind_no in (0, 6):
            value = fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
            struct.pack_into(">L", raw, start + offset, value)
        elif kind_no == 1:
            kind = "interesting"
            value = base.interesting[fdp.ConsumeIntInRange(0, len(base.interesting) - 1)]
            struct.pack_into(">L", raw, start + offset, value & 0xFFFFFFFF)
        elif kind_no == 2:
            kind = "byte"
            offset += fdp.ConsumeIntInRange(0, 3)
            value = fdp.ConsumeIntInRange(0, 255)
            raw[start + offset] = value
        elif kind_no == 3:
            kind = "bitflip"
            offset += fdp.ConsumeIntInRange(0, 3)
            value = 1 << fdp.ConsumeIntInRange(0, 7)
            raw[start + offset] ^= value
        elif kind_no == 4:
            kind = "copy-long-from"  # the same field of another metadata block
            value = base.meta_blocks[fdp.ConsumeIntInRange(0, len(base.meta_blocks) - 1)]
            raw[start + offset : start + offset + 4] = raw[
                value * bs + offset : value * bs + offset + 4
            ]
        else:
            kind = "copy-block-from"  # a whole other metadata block (duplicated keys)
            value = base.meta_blocks[fdp.ConsumeIntInRange(0, len(base.meta_blocks) - 1)]
            raw[start : start + bs] = raw[value * bs : value * bs + bs]
            offset = 0
        fixed = fdp.ConsumeBool()
        if fixed:
            blk = bytearray(raw[start : start + bs])
            base.fix_checksum(blk, block)
            raw[start : start + bs] = blk
        done.append(Mutation(block, offset, kind, value, fixed))
    return raw, done


@dataclass(frozen=True)
class Fault:
    """A device fault for one input: ``kind`` is ``none``, ``truncate`` (the partition
    window holds only ``value`` of the volume's device blocks), ``read`` (reads of
    device block ``value`` fail with MediumError) or ``write`` (writes of it do)."""

    kind: str = "none"
    value: int = 0

    def __str__(self) -> str:
        return f"fault {self.kind} {self.value}"


def decode_fault(fdp: DataProvider, base: BaseImage) -> Fault:
    """After the mutations: most inputs have no fault; the rest truncate the volume or
    make one of its (metadata) blocks unreadable or unwritable."""
    if fdp.remaining_bytes() == 0:
        return Fault()
    kind = fdp.ConsumeIntInRange(0, 7)
    dev_blocks = len(base.data) // 512
    per_block = base.block_size // 512
    if kind == 5:
        return Fault("truncate", dev_blocks * fdp.ConsumeIntInRange(1, 15) // 16)
    if kind in (6, 7):
        block = base.meta_blocks[fdp.ConsumeIntInRange(0, len(base.meta_blocks) - 1)]
        return Fault("read" if kind == 6 else "write", block * per_block)
    return Fault()


class FaultyDevice(BlockDevice):
    """A window that fails reads or writes touching one device block (MediumError)."""

    def __init__(self, inner: BlockDevice, fault: Fault) -> None:
        self.inner = inner
        self.fault = fault

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def block_count(self) -> int:
        return self.inner.block_count

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def requests_in_flight(self) -> int:
        return self.inner.requests_in_flight

    def _hits(self, kind: str, lba: int, count: int) -> bool:
        return self.fault.kind == kind and lba <= self.fault.value < lba + count

    async def read(self, lba: int, count: int) -> bytes:
        if self._hits("read", lba, count):
            raise MediumError(f"injected read error at block {self.fault.value}")
        return await self.inner.read(lba, count)

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        if self._hits("write", lba, max(1, len(data) // self.block_size)):
            raise MediumError(f"injected write error at block {self.fault.value}")
        await self.inner.write(lba, data)

    async def flush(self) -> None:
        await self.inner.flush()


# --------------------------------------------------------------------------- exercising


@contextlib.contextmanager
def wall_clock(seconds: int) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the body runs longer than ``seconds``."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"input ran longer than {seconds} s of wall-clock time")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


async def walk(vol: Volume) -> int:
    """readdir recursively, getattr/lookup every entry, read every file, readlink every
    soft link.  Errors of our hierarchy end one branch; returns entries handled."""
    handled = 0
    stack: list[tuple[int, int]] = [(vol.root_id, 0)]
    seen: set[int] = set()
    with contextlib.suppress(AmigaFuseError):
        await vol.statfs()
    while stack and handled < MAX_ENTRIES:
        dir_id, depth = stack.pop()
        if dir_id in seen or depth > MAX_DEPTH:
            continue
        seen.add(dir_id)
        try:
            entries = await vol.readdir(dir_id)
        except AmigaFuseError:
            continue
        for entry in entries:
            handled += 1
            try:
                await vol.getattr(entry.object_id)
                await vol.lookup(dir_id, entry.name)
                if entry.kind is Kind.DIR:
                    stack.append((entry.object_id, depth + 1))
                elif entry.kind is Kind.FILE:
                    length = min(max(entry.size, 1), MAX_READ_BYTES)
                    data = await vol.read(entry.object_id, 0, length)
                    with await vol.read_lease(entry.object_id, 0, length) as lease:
                        if bytes(lease.view) != data:  # the FUSE layer's zero-copy path
                            raise Damage(f"read_lease and read differ for object {entry.object_id}")
                    if entry.size > 700:
                        await vol.read(entry.object_id, entry.size - 700, 1000)
                else:
                    await vol.readlink(entry.object_id)
            except AmigaFuseError:
                pass
    return handled


async def _check(engine: Engine, device: BlockDevice, geo: VolumeGeometry) -> CheckReport | None:
    try:
        return await engine.check_volume(device, geo, False)
    except AmigaFuseError:
        return None


# Checker errors that say only "space is lost" (a leak): a volume with these and no
# others is compared before and after the writes.
LEAKS = (
    "marked used but nothing uses them",
    "are marked used but nothing uses",
)


def replay_pending(report: CheckReport) -> bool:
    """A transaction is pending: the checker saw the volume before its replay, the
    read-write open replays it, so the two reports do not compare."""
    return any("is pending" in e for e in report.errors)


def comparable(report: CheckReport) -> bool:
    """Whether the writes must leave the checker no worse than ``report``: only when
    the checker found nothing but leaked space.  On a volume it already finds damaged
    (a lying bitmap or admin-space bits, a pointer to a block the bitmap calls free,
    a structure with two owners...), writes may spread the damage: neither engine
    walks the whole tree on every read-write mount (AmigaOS does not either), so such
    damage is invisible to them.  Known and accepted (fuzz/README.md)."""
    return not replay_pending(report) and all(any(k in e for k in LEAKS) for e in report.errors)


async def _writes(vol: Volume) -> None:
    """A few mutations; each may be refused with one of our errors."""
    root = vol.root_id
    try:
        entries = await vol.readdir(root)
    except AmigaFuseError:
        entries = []
    files = [e for e in entries if e.kind is Kind.FILE]
    dirs = [e for e in entries if e.kind is Kind.DIR]
    ops: list[Callable[[], Any]] = []

    async def create_and_write() -> None:
        st = await vol.create(root, "fz_new")
        await vol.write(st.object_id, 0, b"F" * 3000)
        await vol.write(st.object_id, 60000, b"tail")

    ops.append(create_and_write)
    ops.append(lambda: vol.mkdir(root, "fz_dir"))
    if files:
        ops.append(lambda: vol.write(files[0].object_id, 10, b"overwritten" * 50))
        ops.append(lambda: vol.rename(root, files[0].name, root, "fz_renamed"))
    if len(files) > 1:
        ops.append(lambda: vol.truncate(files[1].object_id, 100))
        ops.append(lambda: vol.unlink(root, files[1].name))
    if dirs:
        ops.append(lambda: vol.rename(root, dirs[0].name, root, "fz_dir_moved"))

        async def into_dir() -> None:
            st = await vol.create(dirs[0].object_id, "fz_inner")
            await vol.write(st.object_id, 0, b"I" * 1500)

        ops.append(into_dir)
    for op in ops:
        with contextlib.suppress(AmigaFuseError):
            await op()
    with contextlib.suppress(AmigaFuseError):
        await vol.sync()


async def exercise(
    base: BaseImage, raw: bytes | bytearray, *, write: bool = True, fault: Fault | None = None
) -> dict[str, Any]:
    """Drive the engine over ``raw`` (a mutated copy of ``base.data``) through a device
    with ``fault``.  Raises a finding (see the module docstring); returns what
    happened, for statistics."""
    engine, geo = base.engine, base.geometry
    fault = fault or Fault()
    dev_bs = 512
    part_blocks = len(raw) // dev_bs
    if fault.kind == "truncate":
        part_blocks = min(part_blocks, fault.value)
    guard = bytes([GUARD_BYTE]) * (GUARD_BLOCKS * dev_bs)
    outcome: dict[str, Any] = {"opened_ro": False, "opened_rw": False}

    # read-only: mount, walk, close
    parent = MemoryBlockDevice(data=guard + bytes(raw) + guard, block_size=dev_bs)
    part = FaultyDevice(PartitionDevice(parent, GUARD_BLOCKS, part_blocks, read_only=True), fault)
    with trio.fail_after(TIME_BOUND_S):
        try:
            vol = await engine.open_volume(part, geo, True)
        except AmigaFuseError as exc:
            outcome["ro_error"] = type(exc).__name__
        else:
            outcome["opened_ro"] = True
            outcome["walked"] = await walk(vol)
            with contextlib.suppress(AmigaFuseError):
                await vol.close()
    if bytes(parent.data) != guard + bytes(raw) + guard:
        raise Damage("a read-only mount changed the device")
    if not write:
        return outcome

    # checker, read-write mount with a few writes, checker again
    with trio.fail_after(TIME_BOUND_S):
        before = await _check(
            engine, PartitionDevice(parent, GUARD_BLOCKS, part_blocks, read_only=True), geo
        )
    rw_part = FaultyDevice(PartitionDevice(parent, GUARD_BLOCKS, part_blocks), fault)
    with trio.fail_after(TIME_BOUND_S):
        try:
            rw = await engine.open_volume(rw_part, geo, False)
        except AmigaFuseError as exc:
            outcome["rw_error"] = type(exc).__name__
            return outcome
        outcome["opened_rw"] = rw.info.read_only is False
        await _writes(rw)
        with contextlib.suppress(AmigaFuseError):
            await rw.close()
    data = bytes(parent.data)
    if data[: len(guard)] != guard or data[len(guard) + len(raw) :] != guard:
        raise Damage("a write touched a block outside the partition window")
    with trio.fail_after(TIME_BOUND_S):
        after = await _check(
            engine, PartitionDevice(parent, GUARD_BLOCKS, part_blocks, read_only=True), geo
        )
    outcome["check_before"] = None if before is None else len(before.errors)
    outcome["check_after"] = None if after is None else len(after.errors)
    if outcome["opened_rw"] and before is not None and after is None:
        raise Damage("the checker could read the volume before the writes, not after")
    if fault.kind == "write":
        return outcome  # a failed write is a crash at that point: see test_*_crash.py
    if outcome["opened_rw"] and before is not None and after is not None:
        if before.clean and not after.clean:
            raise Damage(f"writes on a clean volume left checker errors: {after.errors[:5]}")
        if len(after.errors) > len(before.errors) and comparable(before):
            raise Damage(
                f"writes made the checker's findings worse: {len(before.errors)} -> "
                f"{len(after.errors)}: {after.errors[:5]}"
            )
    return outcome


def run_one(base: BaseImage, fdp: DataProvider, *, write: bool = True) -> dict[str, Any]:
    """Mutate and exercise one input under both time bounds."""
    raw, mutations = mutate(fdp, base)
    fault = decode_fault(fdp, base)
    try:
        with wall_clock(WALL_BOUND_S), fixed_clock():
            result: dict[str, Any] = trio.run(lambda: exercise(base, raw, write=write, fault=fault))
    except BaseException:
        print(
            f"[{base.name}] finding with mutations: {[str(m) for m in mutations]}, {fault}",
            file=sys.stderr,
        )
        raise
    result["mutations"] = mutations
    return result
