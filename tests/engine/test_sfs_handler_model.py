"""An independent model of what the SmartFilesystem handler does at mount with an
unfinished transaction, and tests that run it on volumes amigafuse left behind.

The model follows SFS 1.84 step by step (FS/transactions.c and FS/support.c,
LONGCOMPRESSION; read for facts, nothing copied), *not* amigafuse's encoder or replay:

- ``checkfortransaction``: block root OC + 2 must pass the checksum and hold its own
  block number, else the mount fails (INTERR_CHECKSUM_FAILURE); id TRFA means replay.
- ``loadtransaction``: from ``firsttransaction``, every block read with id TRST,
  checksum and own block checked (``readcachebuffercheck``); its data area (byte 16 to
  the end) copied in pieces: at a record start the UWORD ``len`` is read; 0 ends the
  load; else ``(len | 1) + sizeof(OperationInformation) - 1`` bytes (sizeof is 8 on
  m68k: UWORD, ULONG at offset 2, UBYTE, padded to even) are copied into a new
  operation, continuing into the next block (``next``) when the block ends.
- the operations are kept in a tree keyed by block number; ``writeoperations`` walks it
  in ascending order: ``applyoperation`` takes a fresh, *uninitialised* cache buffer
  for OI_EMPTY (``createnewcachebuffer`` does not clear it; modelled here as 0xA5
  bytes) or reads the block from disk, applies ``uncompress`` and writes it.
- ``uncompress``: while bytes remain, a control byte: ``(c & 0xC0) == 0x40`` skips
  ``(c & 0x3F) + 1`` longs, ``0x80`` stores that many 0xFFFFFFFF, ``0x00`` that many
  zeros, otherwise that many longs copied from the data.
- ``removetransactionfailure``: a cleared block with id TROK and own block root OC + 2,
  checksummed, written there.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amigafuse.amiga.dostype import SFS0, SFS2
from amigafuse.blockdev import MemoryBlockDevice
from amigafuse.errors import DeviceGone
from amigafuse.fs.sfs import check_volume, open_volume
from tests.engine.test_sfs_crash import CrashingDevice, base_image, snapshot, workload

TRST = b"TRST"
TRFA = b"TRFA"
TROK = b"TROK"
SIZEOF_OPERATIONINFORMATION = 8
UNINITIALISED = 0xA5


@dataclass
class ModelOp:
    blckno: int
    bits: int
    data: bytes
    blocks_spanned: int  # TRST blocks this record's bytes were copied from


@dataclass
class ReplayLog:
    ops: list[ModelOp] = field(default_factory=list)
    chain: list[int] = field(default_factory=list)
    run_kinds: set[int] = field(default_factory=set)
    written: list[int] = field(default_factory=list)


class MountFailed(Exception):
    pass


def _sum_ok(block: bytes, sfs2: bool) -> bool:
    # SFS\0: 1 + the sum of all longs is 0; SFS\2 (docs/sfs.md): 2 + the sum.
    total = sum(struct.unpack(f">{len(block) // 4}I", block)) + (2 if sfs2 else 1)
    return total & 0xFFFFFFFF == 0


def _checksummed(block: bytearray, sfs2: bool) -> bytes:
    struct.pack_into(">I", block, 4, 0)
    total = sum(struct.unpack(f">{len(block) // 4}I", block)) + (2 if sfs2 else 1)
    struct.pack_into(">I", block, 4, (-total) & 0xFFFFFFFF)
    return bytes(block)


def model_uncompress(dest: bytearray, data: bytes, log: ReplayLog) -> None:
    p = 0
    d = 0
    while p < len(data):
        code = data[p]
        p += 1
        count = (code & 0x3F) + 1
        log.run_kinds.add(code & 0xC0)
        if (code & 0xC0) == 0x40:
            d += count
        elif (code & 0xC0) == 0x80:
            for _ in range(count):
                dest[d * 4 : d * 4 + 4] = b"\xff\xff\xff\xff"
                d += 1
        elif (code & 0xC0) == 0x00:
            for _ in range(count):
                dest[d * 4 : d * 4 + 4] = bytes(4)
                d += 1
        else:
            for _ in range(count):
                dest[d * 4 : d * 4 + 4] = data[p : p + 4]
                p += 4
                d += 1
        assert d * 4 <= len(dest), "the record writes past its block (the handler would overrun memory)"


def handler_mount(image: bytearray, bs: int, root_oc: int, sfs2: bool) -> ReplayLog | None:
    """Replay as the handler's mount does, on ``image`` (the partition, ``bs`` blocks).
    Returns None when block root OC + 2 is TROK; raises MountFailed where the handler
    would fail the mount or refuse the transaction."""

    def read(n: int) -> bytes:
        return bytes(image[n * bs : (n + 1) * bs])

    tr = root_oc + 2
    head = read(tr)
    if not _sum_ok(head, sfs2) or struct.unpack_from(">I", head, 8)[0] != tr:
        raise MountFailed("INTERR_CHECKSUM_FAILURE on the transaction block")
    if head[:4] != TRFA:
        return None
    log = ReplayLog()
    # loadtransaction
    block = struct.unpack_from(">I", head, 12)[0]
    current: bytearray | None = None
    length = 0
    spanned = 0
    done = False
    while block != 0 and not done:
        cb = read(block)
        if cb[:4] != TRST or not _sum_ok(cb, sfs2) or struct.unpack_from(">I", cb, 8)[0] != block:
            raise MountFailed(f"readcachebuffercheck refuses TRST block {block}")
        log.chain.append(block)
        assert len(log.chain) <= len(image) // bs, "chain loops"
        block = struct.unpack_from(">I", cb, 12)[0]
        src = 16
        bytesleft = bs - 16
        if current is not None:
            spanned += 1
        while bytesleft != 0:
            if length != 0:
                n = min(length, bytesleft)
                current += cb[src : src + n]  # type: ignore[operator]
                src += n
                length -= n
                bytesleft -= n
            else:
                rec_len = struct.unpack_from(">H", cb, src)[0]
                if current is not None:
                    _link(log, current, spanned)
                    current = None
                if rec_len == 0:
                    done = True
                    break
                length = (rec_len | 1) + SIZEOF_OPERATIONINFORMATION - 1
                current = bytearray()
                spanned = 1
    if not done and current is not None:
        _link(log, current, spanned)
    # writeoperations, in the tree's (block number) order
    tree = {op.blckno: op for op in log.ops}
    assert len(tree) == len(log.ops), "two operations for one block"
    for blckno in sorted(tree):
        op = tree[blckno]
        buf = bytearray([UNINITIALISED]) * bs if op.bits & 1 else bytearray(read(blckno))
        model_uncompress(buf, op.data, log)
        image[blckno * bs : (blckno + 1) * bs] = buf
        log.written.append(blckno)
    # removetransactionfailure
    ok = bytearray(bs)
    ok[0:4] = TROK
    struct.pack_into(">I", ok, 8, tr)
    image[tr * bs : (tr + 1) * bs] = _checksummed(ok, sfs2)
    return log


def _link(log: ReplayLog, raw: bytearray, spanned: int) -> None:
    rec_len, blckno, bits = struct.unpack_from(">HIB", raw, 0)
    log.ops.append(ModelOp(blckno, bits, bytes(raw[7 : 7 + rec_len]), spanned))


class TearingDevice(CrashingDevice):
    """Dies after ``limit`` *device blocks* written: a request crossing the limit
    writes only its first blocks (a torn multi-block write), then DeviceGone."""

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        count = len(data) // self.mem.block_size
        if self.limit is not None and self.writes + count > self.limit:
            keep = self.limit - self.writes
            if keep > 0:
                await self.mem.write(lba, bytes(data[: keep * self.mem.block_size]))
            self.writes = self.limit
            raise DeviceGone("simulated crash")
        self.writes += count
        await self.mem.write(lba, data)


@pytest.mark.parametrize(("dostype", "bs"), [(SFS0, 512), (SFS2, 1024)])
async def test_handler_replays_every_crash_after_trfa(dostype: int, bs: int) -> None:
    """Crash after every write of the workload: wherever TRFA is on disk, the handler
    model replays our records to exactly the new tree, and the checker agrees."""
    image, geo = await base_image(dostype, bs)
    before = await snapshot(await open_volume(MemoryBlockDevice(data=image), geo, True))
    dry = TearingDevice(image)
    vol = await open_volume(dry, geo, False)
    await workload(vol)
    after = await snapshot(vol)
    root_oc = vol.r.root.rootobjectcontainer  # type: ignore[attr-defined]
    trfa_states = 0
    multi_block_records = 0
    kinds: set[int] = set()
    for limit in range(dry.writes + 1):
        dev = TearingDevice(image, limit)
        with contextlib.suppress(DeviceGone):
            await workload(await open_volume(dev, geo, False))
        crashed = bytearray(dev.mem.data)
        log = handler_mount(crashed, bs, root_oc, dostype == SFS2)
        if log is None:
            # No TRFA on disk: the handler mounts the volume as it is, the old or the
            # new tree.
            state = await snapshot(await open_volume(MemoryBlockDevice(data=bytes(crashed)), geo, True))
            assert state in (before, after), limit
            continue
        trfa_states += 1
        assert log.ops, limit
        assert all(op.bits in (0, 1) for op in log.ops)
        multi_block_records += sum(op.blocks_spanned > 1 for op in log.ops)
        kinds |= log.run_kinds
        mem = MemoryBlockDevice(data=bytes(crashed))
        replayed = await open_volume(mem, geo, True)
        assert not any("transaction" in n for n in replayed.info.notes), limit
        assert await snapshot(replayed) == after, limit
        rep = await check_volume(mem, geo, False)
        assert rep.clean, (limit, rep.errors)
    assert trfa_states > 3
    assert multi_block_records > 0
    assert kinds == {0x00, 0x40, 0x80, 0xC0}


async def test_handler_model_reads_our_chain_like_our_replay() -> None:
    """One crash image, replayed by the model and by amigafuse: identical bytes."""
    image, geo = await base_image(SFS0, 512)
    dry = CrashingDevice(image)
    await workload(await open_volume(dry, geo, False))
    # The last write is TROK; crash just before it, after every block was written,
    # and also right after TRFA, before any block was written.
    for limit in range(dry.writes - 1, 0, -1):
        dev = CrashingDevice(image, limit)
        with contextlib.suppress(DeviceGone):
            await workload(await open_volume(dev, geo, False))
        if bytes(dev.mem.data[5 * 512 : 5 * 512 + 4]) != TRFA:
            break
        model = bytearray(dev.mem.data)
        log = handler_mount(model, 512, 3, False)
        assert log is not None
        ours = MemoryBlockDevice(data=bytes(dev.mem.data))
        vol = await open_volume(ours, geo, False)
        assert any("replayed" in n for n in vol.info.notes)
        assert bytes(ours.data) == bytes(model), limit


def _trst_blocks(path: str, bs: int) -> dict[int, bytes]:
    from tests.conftest import shared_image

    raw = shared_image(path).read_bytes()[256 * 512 :]  # the partition starts at sector 256
    return {n: raw[n * bs : (n + 1) * bs] for n in range(len(raw) // bs) if raw[n * bs : n * bs + 4] == TRST}


@pytest.mark.parametrize(
    ("path", "bs", "last_next"),
    [("handler/sfs0_v183.hdf.gz", 512, "zero"), ("handler/sfs0_v1277_bs1024.hdf.gz", 1024, "own+1")],
)
def test_records_the_real_handler_left_on_disk(path: str, bs: int, last_next: str) -> None:
    """TRST blocks written by SmartFilesystem 1.83 and 1.277 (left in free space after
    their transactions finished) decode with the format we write: header, checksum,
    records up to a zero length, every record covering its whole block, OI_EMPTY
    records without skip runs and re-encoded byte for byte by our encoder."""
    from amigafuse.fs.sfs import codec, transactions

    found = _trst_blocks(path, bs)
    assert len(found) >= 10
    records = empty_records = 0
    for n, blk in found.items():
        assert codec.checksum_ok(blk), n
        ts = codec.TransactionStorage.unpack(blk)
        assert ts.ownblock == n
        # 1.83 ends a one-block chain with next = 0 (as 1.84's savetransaction);
        # 1.277 stores the following block number even in the last block: the
        # zero length inside the block ends the records.
        assert ts.next == (0 if last_next == "zero" else n + 1), n
        ops = transactions.parse_operations(ts.data)
        stream_end = sum(transactions.record_size(len(op.data)) for op in ops)
        assert ts.data[stream_end : stream_end + 2] == b"\0\0"
        for op in ops:
            records += 1
            empty = bool(op.bits & transactions.OI_EMPTY)
            assert op.bits in (0, transactions.OI_EMPTY)
            log = ReplayLog()
            buf = bytearray([UNINITIALISED]) * bs
            model_uncompress(buf, op.data, log)
            new = transactions.uncompress(bytes(bs), op.data, empty=empty)  # exact coverage
            if empty:
                empty_records += 1
                assert 0x40 not in log.run_kinds
                assert bytes(buf) == new
                assert codec.checksum_ok(new) and struct.unpack_from(">I", new, 8)[0] == op.blckno
                assert transactions.compress_from_zero(new) == op.data
            # Literal runs never hold a zero or all-ones long (the handler's rule).
            p = 0
            while p < len(op.data):
                code = op.data[p]
                p += 1
                if code & 0xC0 == 0xC0:
                    longs = struct.unpack_from(f">{(code & 0x3F) + 1}I", op.data, p)
                    assert 0 not in longs and 0xFFFFFFFF not in longs
                    p += 4 * len(longs)
    assert records >= 20
    if last_next == "zero":
        assert empty_records >= 1


_LONGS = [0, 0xFFFFFFFF, 1, 0x12345678, 0xFFFFFFFE]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_model_reads_what_we_encode(data: st.DataObject) -> None:
    """Random blocks and changes, several records over a chain of TRST blocks: the
    model's byte-wise load and step-by-step uncompress give exactly the new blocks."""
    from amigafuse.fs.sfs import transactions

    bs = data.draw(st.sampled_from([512, 1024]))
    n = bs // 4
    image = bytearray(64 * bs)
    ops = []
    want = {}
    for blk in sorted(data.draw(st.sets(st.integers(10, 40), min_size=1, max_size=8))):
        old = data.draw(st.lists(st.sampled_from(_LONGS), min_size=n, max_size=n))
        new = list(old)
        for i in data.draw(st.lists(st.integers(0, n - 1), max_size=n)):
            new[i] = data.draw(st.sampled_from(_LONGS) | st.integers(0, 2**32 - 1))
        ob = b"".join(x.to_bytes(4, "big") for x in old)
        nb = b"".join(x.to_bytes(4, "big") for x in new)
        image[blk * bs : (blk + 1) * bs] = ob
        empty = data.draw(st.booleans())
        enc = transactions.compress_from_zero(nb) if empty else transactions.compress(ob, nb)
        ops.append(transactions.Operation(blk, transactions.OI_EMPTY if empty else 0, enc))
        want[blk] = nb
    stream = transactions.pack_operations(ops)
    chain = list(range(50, 50 + transactions.storage_block_count(len(stream), bs)))
    for b, content in transactions.storage_blocks(stream, chain, bs, False).items():
        image[b * bs : (b + 1) * bs] = content
    image[5 * bs : 6 * bs] = transactions.failure_block(5, chain[0], bs, False)
    log = handler_mount(image, bs, 3, False)
    assert log is not None and log.chain == chain
    assert [op.blckno for op in log.ops] == sorted(want)
    for blk, nb in want.items():
        assert bytes(image[blk * bs : (blk + 1) * bs]) == nb
    assert bytes(image[5 * bs : 5 * bs + 4]) == TROK
