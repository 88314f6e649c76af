"""The QEMU-socket backend: drive a virtio-scsi device of a QEMU process through qtest.

QEMU (Debian 12's 7.2 has no qtest accelerator) runs a q35 machine under TCG with its
CPU stopped (``-S``); we talk to its qtest server over a unix socket and act as the
machine's firmware and driver.  Guest RAM is a file in ``/dev/shm`` that we create and
``mmap``: the virtqueues, request headers and data buffers live there, so only config
accesses, the queue notify and the ISR read cross the socket.

Protocol (QEMU ``softmmu/qtest.c``): one command per line (``outl 0xcf8 0x80002000``,
``inb 0xc013``, ``readl 0xe0000000``, ``writew 0xe0003000 0x2``, ``irq_intercept_in
ioapic``), answered strictly in order by ``OK [value]`` or ``FAIL``/``ERR ...``; the
asynchronous lines ``IRQ raise N`` / ``IRQ lower N`` may arrive between replies once
interrupts are intercepted.

Invariants:

* Bytes go to the socket in the order operations are *issued*, and each issued command
  appends exactly one entry to ``_pending`` in the same synchronous step, so the n-th
  reply belongs to the n-th pending entry.  Nothing awaits between the two.
* Posted writes have a ``None`` pending entry; a failure reply for one is remembered and
  raised (as HardwareError) by the next :meth:`QtestBackend.sync`.
* One reader task (in the nursery owned by :func:`launch_qemu`/:func:`attach_qtest`)
  parses every line; on EOF or error it marks the backend dead and fails every pending
  reply and interrupt waiter with DeviceGone.
* :func:`launch_qemu` always removes the socket, the ``/dev/shm`` file and its temporary
  directory, and never leaves the QEMU process running, also on errors and cancellation.
"""

from __future__ import annotations

import collections
import contextlib
import errno as _errno
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

from amigafuse.driver.backends.base import Backend, BarInfo, BarKind, BarRegion, DmaArena
from amigafuse.errors import DeviceGone, HardwareError, NotAvailable, UsageError

QEMU_BINARY = "qemu-system-x86_64"

#: Where we place the virtio-scsi controller on bus 0 (device 4, function 0).
VIRTIO_SCSI_DEVFN = 4 << 3
#: q35 routes INTA of the device at 04.0 to IOAPIC input (GSI) 20.
VIRTIO_SCSI_GSI = 20
#: The DMA arena starts above the legacy holes and BIOS shadow below 1 MiB.
ARENA_GUEST_OFFSET = 16 << 20

_CONFIG_ADDRESS = 0xCF8
_CONFIG_DATA = 0xCFC
_SIZE_SUFFIX = {1: "b", 2: "w", 4: "l", 8: "q"}


@dataclass(frozen=True)
class QemuDisk:
    """One disk image attached to the controller as a ``scsi-hd``.

    ``target`` defaults to the disk's position in the list (0..7).
    ``logical_block_size`` 4096 makes a 4K-sector disk (logical and physical).
    ``blkdebug_errors`` injects I/O errors for tests through QEMU's blkdebug driver:
    ``(event, sector, errno)`` triples, e.g. ``("read_aio", 2048, 5)`` fails every read
    that touches 512-byte sector 2048 with EIO; ``blkdebug_rules`` is raw blkdebug config
    text appended to those.  Errors are reported to the driver
    (``rerror=report,werror=report``), which sees them as SCSI MEDIUM ERROR / sense.
    ``no_medium`` attaches a removable ``scsi-hd`` whose drive is empty (``path`` is
    ignored): it answers INQUIRY, and NOT READY "medium not present" to everything
    else, for ever (a test of a target that does not come up).
    """

    path: Path | str
    read_only: bool = False
    logical_block_size: int = 512
    target: int | None = None
    blkdebug_errors: Sequence[tuple[str, int, int]] = ()
    blkdebug_rules: str | None = None
    serial: str | None = None
    no_medium: bool = False

    def blkdebug_config(self) -> str | None:
        """The blkdebug config text for this disk, or None when no errors are injected."""
        if not self.blkdebug_errors and self.blkdebug_rules is None:
            return None
        parts = []
        for event, sector, errno_value in self.blkdebug_errors:
            if not event.replace("_", "").isalnum():
                raise UsageError(f"bad blkdebug event name {event!r}")
            parts.append(
                "[inject-error]\n"
                f'event = "{event}"\n'
                f'errno = "{int(errno_value)}"\n'
                f'sector = "{int(sector)}"\n'
                'once = "off"\n'
            )
        if self.blkdebug_rules is not None:
            parts.append(self.blkdebug_rules)
        return "\n".join(parts)


def _escape_opt(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


def qemu_command(
    disks: Sequence[QemuDisk],
    *,
    socket_path: str,
    shm_path: str,
    ram_mib: int,
    device: Literal["transitional", "modern"] = "transitional",
    blkdebug_dir: str | None = None,
    qemu_binary: str = QEMU_BINARY,
    aio: Literal["threads", "io_uring"] = "threads",
    qmp_path: str | None = None,
) -> list[str]:
    """The QEMU command line :func:`launch_qemu` runs (pure; exposed for docs and tests).

    ``aio`` is QEMU's file I/O engine: io_uring halves QEMU's cost per request against
    the thread pool, where the kernel allows it (see :func:`io_uring_usable`).
    ``qmp_path``: also serve QMP on that unix socket (QEMU listens)."""
    if aio not in ("threads", "io_uring"):
        raise UsageError(f"aio must be 'threads' or 'io_uring', not {aio!r}")
    if device not in ("transitional", "modern"):
        raise UsageError(f"device must be 'transitional' or 'modern', not {device!r}")
    if len(disks) > 8:
        raise UsageError(f"at most 8 disks (SCSI targets 0..7), got {len(disks)}")
    model = "virtio-scsi-pci" if device == "transitional" else "virtio-scsi-pci-non-transitional"
    cmd = [
        qemu_binary,
        "-M",
        "q35,memory-backend=mem",
        "-m",
        f"{ram_mib}M",
        "-object",
        f"memory-backend-file,id=mem,size={ram_mib}M,mem-path={_escape_opt(shm_path)},share=on",
        "-accel",
        "tcg",
        "-S",
        "-qtest",
        f"unix:{socket_path}",
        "-qtest-log",
        "/dev/null",
        "-display",
        "none",
        "-nodefaults",
        "-device",
        f"{model},id=scsi0,addr=04.0",
    ]
    if qmp_path is not None:
        cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    used_targets: set[int] = set()
    for index, disk in enumerate(disks):
        target = index if disk.target is None else disk.target
        if not 0 <= target <= 7 or target in used_targets:
            raise UsageError(f"disk {disk.path}: SCSI target {target} is out of 0..7 or used twice")
        used_targets.add(target)
        if disk.logical_block_size not in (512, 1024, 2048, 4096):
            raise UsageError(
                f"disk {disk.path}: block size {disk.logical_block_size} is not supported"
            )
        if disk.no_medium:
            cmd += [
                "-drive", f"if=none,id=vd{index}",
                "-device", f"scsi-hd,drive=vd{index},bus=scsi0.0,channel=0,scsi-id={target},"
                "lun=0,removable=on",
            ]  # fmt: skip
            continue
        path = str(Path(disk.path).resolve())
        rules = disk.blkdebug_config()
        if rules is not None:
            if blkdebug_dir is None:
                raise UsageError("blkdebug rules need a directory for their config file")
            conf = Path(blkdebug_dir) / f"blkdebug{index}.conf"
            conf.write_text(rules)
            filename = f"blkdebug:{conf}:{path}"
            locking: list[str] = []
        else:
            filename = path
            # QEMU locks the whole image; amigafuse locks each partition itself (see
            # fuse/session.py), so two processes may serve two partitions of one image.
            locking = ["file.locking=off"]
        drive = [
            f"file={_escape_opt(filename)}",
            *locking,
            "if=none",
            f"id=vd{index}",
            "format=raw",
            "rerror=report",
            "werror=report",
            "cache=writeback",
            f"aio={aio}",
        ]
        if disk.read_only:
            drive.append("readonly=on")
        hd = [
            "scsi-hd",
            f"drive=vd{index}",
            "bus=scsi0.0",
            "channel=0",
            f"scsi-id={target}",
            "lun=0",
        ]
        if disk.logical_block_size != 512:
            hd += [
                f"logical_block_size={disk.logical_block_size}",
                f"physical_block_size={disk.logical_block_size}",
            ]
        if disk.serial:
            hd.append(f"serial={_escape_opt(disk.serial)}")
        cmd += ["-drive", ",".join(drive), "-device", ",".join(hd)]
    return cmd


# --------------------------------------------------------------------------- protocol


class _Reply:
    """The reply slot of one awaited command."""

    __slots__ = ("_event", "done", "error", "value")

    def __init__(self) -> None:
        self.done = False
        self.value = 0
        self.error: BaseException | None = None
        self._event: trio.Event | None = None

    def complete(self, value: int, error: BaseException | None) -> None:
        self.value = value
        self.error = error
        self.done = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> int:
        """The reply's value.  Cancellation-safe: the slot stays queued for the reader."""
        if not self.done:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        return self.value


class _QtestRegion(BarRegion):
    def __init__(self, backend: QtestBackend, bar: BarInfo) -> None:
        self._backend = backend
        self.kind = bar.kind
        self.size_bytes = bar.size_bytes
        self.base = bar.address
        if bar.kind is BarKind.IO:
            self._rd = {n: f"in{_SIZE_SUFFIX[n]} " for n in (1, 2, 4)}
            self._wr = {n: f"out{_SIZE_SUFFIX[n]} " for n in (1, 2, 4)}
        else:
            self._rd = {n: f"read{_SIZE_SUFFIX[n]} " for n in (1, 2, 4, 8)}
            self._wr = {n: f"write{_SIZE_SUFFIX[n]} " for n in (1, 2, 4, 8)}

    def _op(self, table: dict[int, str], offset: int, size: int) -> str:
        try:
            op = table[size]
        except KeyError:
            raise ValueError(
                f"{size}-byte access is not possible on an {self.kind.value} BAR"
            ) from None
        self._check(offset, size)
        return f"{op}{self.base + offset:#x}"

    async def read(self, offset: int, size: int) -> int:
        return await self._backend._request(self._op(self._rd, offset, size)).wait()

    def write(self, offset: int, size: int, value: int) -> None:
        self._backend._post(f"{self._op(self._wr, offset, size)} {value:#x}")


class QtestBackend(Backend):
    """A :class:`Backend` on a connected qtest socket and mmap'ed guest RAM.

    Created by :func:`launch_qemu` or :func:`attach_qtest`, which own its reader task.
    """

    assigns_bars = True

    def __init__(
        self,
        sock: socket.socket,
        ram: mmap.mmap,
        *,
        arena_offset: int = ARENA_GUEST_OFFSET,
        gsi: int = VIRTIO_SCSI_GSI,
        process: QemuProcess | None = None,
        stderr_fd: int | None = None,
    ) -> None:
        if arena_offset >= len(ram):
            raise UsageError(f"guest RAM of {len(ram)} bytes is too small for the DMA arena")
        self._sock = sock
        self._ram = ram
        self._ram_view = memoryview(ram)
        self._arena = DmaArena(self._ram_view[arena_offset:], arena_offset)
        self._gsi = gsi
        self.process = process
        self._stderr_fd = stderr_fd  # QEMU's stderr (an unlinked file), ours to read
        self._pending: collections.deque[_Reply | None] = collections.deque()
        self._outbuf = bytearray()
        self._writer_wakeup = trio.Event()
        self._flush_scheduled = False  # the writer will send what is buffered
        #: Posted writes wait for the next flush (or the writer, one batch later).
        self.cork_posted_writes = True
        self._write_blocked = False  # the socket buffer is full: only the writer sends
        self._send_failure: str | None = None  # a send failed; the writer reports it
        self._dead_reason: str | None = None
        self._posted_error: BaseException | None = None
        self._irq_pending = False
        self._irq_event = trio.Event()
        self._irq_count = 0
        self._intercepting = False
        self.commands_sent = 0
        self.sends = 0  # send() calls: commands_sent / sends is the batching factor
        self._closed = False
        #: Informational: files that launch_qemu owns and removes (None when attached).
        self.shm_path: Path | None = None
        #: QEMU's monitor, when launch_qemu was asked for it (qmp=True).
        self.qmp: QmpClient | None = None
        self.workdir: Path | None = None

    # ----------------------------------------------------------------- state

    @property
    def arena(self) -> DmaArena:
        return self._arena

    @property
    def guest_ram(self) -> memoryview:
        """All of guest RAM (guest physical address = index)."""
        return self._ram_view

    @property
    def dead(self) -> bool:
        return self._dead_reason is not None

    @property
    def interrupt_count(self) -> int:
        return self._irq_count

    def gone_error(self) -> DeviceGone:
        reason = self._dead_reason or "the backend was closed"
        proc = self.process
        if proc is not None and proc.returncode is not None:
            code = proc.returncode
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            reason = f"{reason}; QEMU ended ({how})"
            tail = self._stderr_tail()
            if tail:
                reason = f"{reason}: {tail}"
        return DeviceGone(f"QEMU device gone: {reason}")

    def _stderr_tail(self) -> str:
        if self._stderr_fd is None:
            return ""
        try:
            size = os.fstat(self._stderr_fd).st_size
            raw = os.pread(self._stderr_fd, 4096, max(0, size - 4096))
        except OSError:
            return ""
        text = raw.decode(errors="replace").strip()
        return " | ".join(text.splitlines()[-5:])

    def _mark_dead(self, reason: str) -> None:
        if self._dead_reason is not None:
            return
        self._dead_reason = reason
        err = self.gone_error()
        while self._pending:
            reply = self._pending.popleft()
            if reply is not None:
                reply.complete(0, err)
        self._irq_event.set()
        self._writer_wakeup.set()

    # ----------------------------------------------------------------- sending

    def _send(self, line: str, *, flush: bool) -> None:
        """Queue one command line.  ``flush``: send now (an awaited command); else the
        line waits for the next flush or for the writer task, which runs in the next
        scheduling batch, so that posted writes of one batch (a kick) share a send with
        what follows (the ISR read)."""
        if self._dead_reason is not None:
            raise self.gone_error()
        self.commands_sent += 1
        self._outbuf += line.encode("ascii") + b"\n"
        if (flush or not self.cork_posted_writes) and not self._write_blocked:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._writer_wakeup.set()

    def _flush(self) -> None:
        self.sends += 1
        try:
            sent = self._sock.send(self._outbuf)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            # QEMU is going away.  Let the writer task report it once QEMU's exit
            # status is known; the commands already issued fail then, with it.
            self._send_failure = f"sending to the qtest socket failed: {exc}"
            self._outbuf.clear()
            self._write_blocked = True
            self._writer_wakeup.set()
            return
        del self._outbuf[:sent]
        if self._outbuf:
            self._write_blocked = True  # the writer task waits until writable
            self._writer_wakeup.set()

    def flush_posted(self) -> None:
        if self._outbuf and not self._write_blocked and self._dead_reason is None:
            self._flush()

    def _post(self, line: str) -> None:
        self._send(line, flush=False)
        self._pending.append(None)

    def _request(self, line: str) -> _Reply:
        self._send(line, flush=True)
        reply = _Reply()
        self._pending.append(reply)
        return reply

    async def _writer(self) -> None:
        while self._dead_reason is None:
            if self._send_failure is not None:
                await self._connection_lost(self._send_failure)
                return
            if not self._outbuf:
                self._flush_scheduled = False
                self._writer_wakeup = trio.Event()
                await self._writer_wakeup.wait()
                continue
            self._flush_scheduled = False
            try:
                if self._write_blocked:
                    await trio.lowlevel.wait_writable(self._sock)
                self.sends += 1
                sent = self._sock.send(self._outbuf)
            except trio.ClosedResourceError:
                return
            except BlockingIOError:
                self._write_blocked = True
                continue
            except OSError as exc:
                await self._connection_lost(f"sending to the qtest socket failed: {exc}")
                return
            del self._outbuf[:sent]
            self._write_blocked = bool(self._outbuf)

    # ----------------------------------------------------------------- receiving

    async def _reader(self) -> None:
        partial = b""
        while True:
            try:
                await trio.lowlevel.wait_readable(self._sock)
                chunk = self._sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                await self._connection_lost(f"reading the qtest socket failed: {exc}")
                return
            if not chunk:
                await self._connection_lost("QEMU closed the qtest socket")
                return
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for line in lines:
                self._handle_line(line)

    async def _connection_lost(self, reason: str) -> None:
        if self.process is not None:
            # QEMU usually exits right after: wait a moment, so that the error can
            # carry its exit status and stderr.
            with trio.move_on_after(2):
                await self.process.wait()
        self._mark_dead(reason)

    def _handle_line(self, line: bytes) -> None:
        if line.startswith(b"IRQ "):
            words = line.split()
            if len(words) == 3 and words[1] == b"raise" and words[2] == str(self._gsi).encode():
                self._irq_count += 1
                self._irq_pending = True
                self._irq_event.set()
            return
        if not line:
            return
        if not self._pending:
            self._mark_dead(f"unexpected line from qtest: {line[:80]!r}")
            return
        reply = self._pending.popleft()
        if line == b"OK" or line.startswith(b"OK "):
            value = 0
            words = line.split()
            if len(words) > 1:
                try:
                    value = int(words[1], 16)
                except ValueError:
                    error = HardwareError(f"malformed qtest reply {line[:80]!r}")
                    if reply is not None:
                        reply.complete(0, error)
                    elif self._posted_error is None:
                        self._posted_error = error
                    return
            if reply is not None:
                reply.complete(value, None)
            return
        error = HardwareError(f"qtest command failed: {line.decode('ascii', 'replace')}")
        if reply is not None:
            reply.complete(0, error)
        elif self._posted_error is None:
            self._posted_error = error

    # ----------------------------------------------------------------- Backend API

    @staticmethod
    def _config_address(devfn: int, offset: int) -> int:
        if not 0 <= devfn <= 0xFF or not 0 <= offset <= 0xFF:
            raise ValueError(f"config access devfn {devfn:#x} offset {offset:#x} out of range")
        return 0x80000000 | (devfn << 8) | (offset & 0xFC)

    async def config_read(self, devfn: int, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset % size:
            raise ValueError(f"bad config read size {size} at {offset:#x}")
        self._post(f"outl {_CONFIG_ADDRESS:#x} {self._config_address(devfn, offset):#x}")
        suffix = _SIZE_SUFFIX[size]
        return await self._request(f"in{suffix} {_CONFIG_DATA + (offset & 3):#x}").wait()

    def config_write(self, devfn: int, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset % size:
            raise ValueError(f"bad config write size {size} at {offset:#x}")
        self._post(f"outl {_CONFIG_ADDRESS:#x} {self._config_address(devfn, offset):#x}")
        self._post(f"out{_SIZE_SUFFIX[size]} {_CONFIG_DATA + (offset & 3):#x} {value:#x}")

    async def config_read_block(self, devfn: int, offset: int, length: int) -> bytes:
        if offset % 4 or length % 4:
            raise ValueError("config_read_block needs dword-aligned offset and length")
        replies = []
        for off in range(offset, offset + length, 4):
            self._post(f"outl {_CONFIG_ADDRESS:#x} {self._config_address(devfn, off):#x}")
            replies.append(self._request(f"inl {_CONFIG_DATA:#x}"))
        out = bytearray()
        for reply in replies:
            out += (await reply.wait()).to_bytes(4, "little")
        return bytes(out)

    def map_bar(self, devfn: int, bar: BarInfo) -> BarRegion:
        if bar.address == 0:
            raise HardwareError(f"BAR {bar.index} of {devfn:#x} was not assigned an address")
        return _QtestRegion(self, bar)

    async def sync(self) -> None:
        await self._request("readb 0x0").wait()
        if self._posted_error is not None:
            error, self._posted_error = self._posted_error, None
            raise error

    async def enable_interrupts(self, devfn: int) -> None:
        if devfn != VIRTIO_SCSI_DEVFN and self._gsi == VIRTIO_SCSI_GSI:
            raise UsageError(
                f"interrupt routing is only known for the device at 04.0, not {devfn:#x}"
            )
        if not self._intercepting:
            await self._request("irq_intercept_in ioapic").wait()
            self._intercepting = True

    async def wait_interrupt(self) -> None:
        while True:
            if self._dead_reason is not None:
                raise self.gone_error()
            if self._irq_pending:
                self._irq_pending = False
                await trio.lowlevel.checkpoint()
                return
            self._irq_event = trio.Event()
            await self._irq_event.wait()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._mark_dead("the backend was closed")
        trio.lowlevel.notify_closing(self._sock)
        with contextlib.suppress(OSError):
            self._sock.close()
        await trio.lowlevel.checkpoint()

    def _release_memory(self) -> None:
        self._arena.view.release()
        self._ram_view.release()
        with contextlib.suppress(BufferError):
            self._ram.close()


# --------------------------------------------------------------------------- QMP


class QmpClient:
    """A minimal QMP client on QEMU's monitor socket, for what qtest cannot do: hot-plug
    (``device_add``/``device_del``), fault injection through HMP ``qemu-io`` (blkdebug
    ``break``/``resume``).  Used by tests and tools; the driver itself never needs it.

    One command at a time (a trio lock); asynchronous events that arrive meanwhile are
    kept in ``events`` (bounded) for :meth:`wait_event`.  Every reply is awaited on the
    socket; a closed socket raises DeviceGone.
    """

    MAX_EVENTS = 256

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = b""
        self._lock = trio.Lock()
        self.events: collections.deque[dict[str, object]] = collections.deque(
            maxlen=self.MAX_EVENTS
        )

    async def _line(self) -> dict[str, object]:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise DeviceGone("QEMU closed its QMP socket")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise HardwareError(f"malformed QMP line {line[:80]!r}") from None
        if not isinstance(message, dict):
            raise HardwareError(f"malformed QMP line {line[:80]!r}")
        return message

    async def _reply(self) -> object:
        while True:
            message = await self._line()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                error = message["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise HardwareError(f"QMP command failed: {desc}")
            if "return" in message:
                return message["return"]

    async def handshake(self) -> None:
        """Read the greeting and leave capabilities negotiation mode."""
        async with self._lock:
            greeting = await self._line()
            if "QMP" not in greeting:
                raise HardwareError(f"not a QMP greeting: {str(greeting)[:80]}")
        await self.execute("qmp_capabilities")

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """Run one QMP command; its ``return`` value.  Raises HardwareError for an error
        reply, DeviceGone when QEMU went away."""
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        async with self._lock:
            try:
                await self._stream.send_all(json.dumps(request).encode() + b"\n")
                return await self._reply()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise DeviceGone(f"QEMU's QMP socket failed: {exc}") from exc

    async def hmp(self, command_line: str) -> str:
        """An HMP command (e.g. ``qemu-io vd0 "break read_aio A"``) through QMP; its
        output text."""
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        return out if isinstance(out, str) else ""

    async def wait_event(self, name: str) -> dict[str, object]:
        """The first event called ``name`` (removed from ``events``), waiting for it.
        Cancellable (bound it with a trio timeout)."""
        while True:
            for event in list(self.events):
                if event.get("event") == name:
                    self.events.remove(event)
                    return event
            async with self._lock:
                message = await self._line()
                if "event" in message:
                    self.events.append(message)

    async def aclose(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._stream.aclose()


async def _connect_qmp(path: Path, proc: QemuProcess, timeout: float) -> QmpClient:
    """Connect to QEMU's QMP server socket (it appears during QEMU's startup)."""
    with trio.move_on_after(timeout):
        while True:
            if proc.poll() is not None:
                raise DeviceGone(f"QEMU exited (status {proc.returncode}) before its QMP socket")
            try:
                stream = await trio.open_unix_socket(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                await trio.sleep(0.02)
                continue
            client = QmpClient(stream)
            try:
                await client.handshake()
            except BaseException:
                await client.aclose()
                raise
            return client
    raise DeviceGone(f"QEMU's QMP socket {path} did not answer within {timeout:g} s")


# --------------------------------------------------------------------------- processes


def _find_qemu(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise NotAvailable(
            f"{binary} is not installed or not on PATH: install it with "
            "'apt-get install qemu-system-x86'"
        )
    return found


def _make_shm(ram_bytes: int, name_hint: str) -> tuple[Path, mmap.mmap]:
    shm_dir = Path("/dev/shm")
    if not shm_dir.is_dir():
        raise NotAvailable("/dev/shm is missing: the qtest backend needs a tmpfs at /dev/shm")
    fd, name = tempfile.mkstemp(prefix=f"amigafuse-{name_hint}-{os.getpid()}-", dir=shm_dir)
    path = Path(name)
    try:
        os.ftruncate(fd, ram_bytes)
        ram = mmap.mmap(fd, ram_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return path, ram


_IO_URING_USABLE: dict[str, bool] = {}
_SCHED_BATCH_USABLE: list[bool] = []


async def sched_batch_usable() -> bool:
    """Whether ``chrt --batch 0`` works here (util-linux installed, the policy change
    allowed: a seccomp profile may refuse it).  Probed once (a few ms), cached."""
    if not _SCHED_BATCH_USABLE:
        chrt = shutil.which("chrt")
        ok = False
        if chrt is not None:
            with trio.move_on_after(5):
                result = await trio.run_process(
                    [chrt, "--batch", "0", "true"], capture_stderr=True, check=False
                )
                ok = result.returncode == 0
        _SCHED_BATCH_USABLE.append(ok)
    return _SCHED_BATCH_USABLE[0]


async def io_uring_usable(qemu_binary: str) -> bool:
    """Whether ``qemu_binary`` can open a drive with ``aio=io_uring`` here (QEMU built
    with it, kernel/seccomp allowing it).  Probed once per binary (~50 ms), cached."""
    cached = _IO_URING_USABLE.get(qemu_binary)
    if cached is not None:
        return cached
    with tempfile.NamedTemporaryFile(prefix="amigafuse-probe-") as probe:
        probe.truncate(4096)
        probe.flush()
        cmd = [
            qemu_binary, "-M", "none", "-nodefaults", "-display", "none", "-S",
            "-monitor", "stdio",
            "-drive", f"file={_escape_opt(probe.name)},if=none,id=p,format=raw,aio=io_uring",
        ]  # fmt: skip
        ok = False
        with trio.move_on_after(10):
            result = await trio.run_process(
                cmd, stdin=b"quit\n", capture_stdout=True, capture_stderr=True, check=False
            )
            ok = result.returncode == 0 and b"io_uring" not in result.stderr
    _IO_URING_USABLE[qemu_binary] = ok
    return ok


class QemuProcess:
    """A child process started from the calling (trio) thread, awaited through a pidfd.

    QEMU gets ``PR_SET_PDEATHSIG = SIGKILL`` so that it dies with us.  Not
    ``trio.lowlevel.open_process``: that forks from a worker thread, and the death
    signal fires when the *thread* that forked exits, which trio's idle worker threads
    do after a few seconds.  Forking here ties it to the thread running trio.
    """

    def __init__(self, args: Sequence[str], *, stderr: int, sched_batch: bool = False) -> None:
        # setpriv (util-linux) sets PR_SET_PDEATHSIG and execs QEMU in place: no
        # Python code runs between fork and exec.
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        chrt = shutil.which("chrt") if sched_batch else None
        if chrt:
            # chrt (util-linux) execs QEMU as SCHED_BATCH, inherited by its threads.
            prefix += [chrt, "--batch", "0"]
        self._popen = subprocess.Popen(
            [*prefix, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # a Ctrl-C reaches us, and we stop QEMU in order
        )
        self.pid = self._popen.pid
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # kernels before 5.3: poll instead
            self._pidfd = None
        self._watching = False
        self._exited = trio.Event()

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def poll(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        """Wait for the exit (cancellable) and return the exit status.  Several tasks
        may wait: one watches the pidfd, the others its event (polling as a fallback
        in case that watcher is cancelled)."""
        while True:
            code = self._popen.poll()
            if code is not None:
                self._exited.set()
                return code
            if self._pidfd is not None and not self._watching:
                self._watching = True
                try:
                    await trio.lowlevel.wait_readable(self._pidfd)
                finally:
                    self._watching = False
            else:
                with trio.move_on_after(0.05):
                    await self._exited.wait()

    def send_signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Release the pidfd (after the process was reaped)."""
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def _stop_process(proc: QemuProcess) -> None:
    """Terminate ``proc`` (SIGTERM, then SIGKILL after 3 s) and reap it.  Shielded."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(3):
                await proc.wait()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def launch_qemu(
    disks: Sequence[QemuDisk],
    *,
    device: Literal["transitional", "modern"] = "transitional",
    ram_mib: int = 96,
    qemu_binary: str = QEMU_BINARY,
    start_timeout: float = 20.0,
    aio: Literal["auto", "threads", "io_uring"] = "auto",
    qmp: bool = False,
    sched_batch: bool = True,
) -> AsyncIterator[QtestBackend]:
    """Start and own a QEMU with a virtio-scsi controller at 04.0 and ``disks`` on it.

    ``qmp``: also connect to QEMU's monitor; ``backend.qmp`` is then a
    :class:`QmpClient` (hot-plug and fault injection in tests).
    ``sched_batch``: run QEMU as SCHED_BATCH (with util-linux ``chrt``, where it works):
    a kick then wakes QEMU without QEMU preempting us on our CPU (a unix-socket send
    is a "sync" wakeup, which pulls the woken task onto the sender's CPU); on a loaded
    machine that preemption held each kick's ``send`` for 80-400 µs (see docs/driver.md).

    ``device`` "transitional" is ``virtio-scsi-pci`` (legacy + modern, device id 0x1004),
    "modern" is ``virtio-scsi-pci-non-transitional`` (0x1048).  ``ram_mib`` is guest RAM;
    the DMA arena is all of it above 16 MiB.

    Raises NotAvailable when QEMU is not installed, DeviceGone (with QEMU's stderr) when
    it fails to start or does not connect within ``start_timeout`` seconds.  On exit
    (normal, error or cancellation) QEMU is stopped and the socket, the /dev/shm file and
    temporary files are removed.  ``aio`` "auto" uses io_uring when it works here
    (:func:`io_uring_usable`), else QEMU's thread pool.
    """
    binary = _find_qemu(qemu_binary)
    if aio == "auto":
        aio = "io_uring" if await io_uring_usable(binary) else "threads"
    if sched_batch:
        sched_batch = await sched_batch_usable()
    for disk in disks:
        if not disk.no_medium and not Path(disk.path).is_file():
            raise UsageError(f"disk image {disk.path} does not exist or is not a file")
    if ram_mib < 32:
        raise UsageError(f"ram_mib must be at least 32, got {ram_mib}")
    tmpdir = Path(tempfile.mkdtemp(prefix="amigafuse-qemu-"))
    shm_path: Path | None = None
    ram: mmap.mmap | None = None
    listener: socket.socket | None = None
    proc: QemuProcess | None = None
    backend: QtestBackend | None = None
    stderr_fd: int | None = None
    try:
        shm_path, ram = _make_shm(ram_mib << 20, "qemu")
        socket_path = tmpdir / "qtest.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(socket_path))
        listener.listen(1)
        listener.setblocking(False)
        cmd = qemu_command(
            disks,
            socket_path=str(socket_path),
            shm_path=str(shm_path),
            ram_mib=ram_mib,
            device=device,
            blkdebug_dir=str(tmpdir),
            qemu_binary=binary,
            aio=aio,
            qmp_path=str(tmpdir / "qmp.sock") if qmp else None,
        )
        stderr_path = tmpdir / "stderr.txt"
        with open(stderr_path, "wb") as stderr_file:
            proc = QemuProcess(cmd, stderr=stderr_file.fileno(), sched_batch=sched_batch)
        stderr_fd = os.open(stderr_path, os.O_RDONLY)
        conn = await _accept_or_fail(listener, proc, stderr_path, start_timeout)
        listener.close()
        listener = None
        socket_path.unlink(missing_ok=True)
        backend = QtestBackend(conn, ram, process=proc, stderr_fd=stderr_fd)
        backend.shm_path = shm_path
        backend.workdir = tmpdir
        if qmp:
            backend.qmp = await _connect_qmp(tmpdir / "qmp.sock", proc, start_timeout)
        # The body's exception is re-raised outside the nursery, so callers see it
        # as itself and not wrapped in an ExceptionGroup.
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend._reader)
            nursery.start_soon(backend._writer)
            nursery.start_soon(_watch_process, backend, proc)
            try:
                # The first reply also means QEMU has created the machine: it has the RAM
                # file mapped and the blkdebug configs read.  Remove every file now, so
                # that nothing is left behind even if we are killed.
                try:
                    with trio.fail_after(start_timeout):
                        await backend.sync()
                except trio.TooSlowError:
                    raise DeviceGone(
                        f"QEMU connected but did not answer within {start_timeout:g} s"
                    ) from None
                shm_path.unlink(missing_ok=True)
                shutil.rmtree(tmpdir, ignore_errors=True)
                yield backend
            except BaseException as exc:
                body_error = exc
            finally:
                if backend.qmp is not None:
                    with trio.CancelScope(shield=True):
                        await backend.qmp.aclose()
                await backend.aclose()
                await _stop_process(proc)
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
    finally:
        if listener is not None:
            listener.close()
        if proc is not None:
            await _stop_process(proc)
            proc.close()
        if backend is not None:
            backend._release_memory()
        elif ram is not None:
            with contextlib.suppress(BufferError):
                ram.close()
        if shm_path is not None:
            shm_path.unlink(missing_ok=True)
        shutil.rmtree(tmpdir, ignore_errors=True)
        if stderr_fd is not None:
            os.close(stderr_fd)


async def _watch_process(backend: QtestBackend, proc: QemuProcess) -> None:
    await proc.wait()
    backend._mark_dead("the QEMU process exited")


async def _accept_or_fail(
    listener: socket.socket, proc: QemuProcess, stderr_path: Path, timeout: float
) -> socket.socket:
    """Accept QEMU's qtest connection; fail with its stderr if it exits or times out."""

    def failure(what: str) -> DeviceGone:
        text = stderr_path.read_text(errors="replace").strip() if stderr_path.exists() else ""
        detail = f": {text}" if text else " (no output on stderr)"
        return DeviceGone(f"QEMU {what}{detail}")

    with trio.move_on_after(timeout):
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                if proc.returncode is not None or proc.poll() is not None:
                    raise failure(f"failed to start (exit status {proc.returncode})") from None
                with trio.move_on_after(0.05):
                    await trio.lowlevel.wait_readable(listener)
                continue
            conn.setblocking(False)
            return conn
    raise failure(f"did not connect to the qtest socket within {timeout:g} s")


@contextlib.asynccontextmanager
async def attach_qtest(
    socket_path: str | Path,
    shm_path: str | Path,
    ram_size: int | None = None,
    *,
    gsi: int = VIRTIO_SCSI_GSI,
) -> AsyncIterator[QtestBackend]:
    """Drive an already running QEMU through its qtest server socket.

    The user starts QEMU with the machine :func:`qemu_command` builds, except that the
    qtest chardev is a server we connect to and RAM is a file we can map::

        qemu-system-x86_64 -M q35,memory-backend=mem -m 256M \\
          -object memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/amiga,share=on \\
          -accel tcg -S -qtest unix:/run/amiga.sock,server=on,wait=off \\
          -qtest-log /dev/null -display none -nodefaults \\
          -device virtio-scsi-pci,id=scsi0,addr=04.0 \\
          -drive file=disk.img,if=none,id=vd0,format=raw,rerror=report,werror=report \\
          -device scsi-hd,drive=vd0,bus=scsi0.0,channel=0,scsi-id=0,lun=0

    ``ram_size`` is the size of the memory backend in bytes (default: the file's size).  The controller must be at
    04.0 (its INTA reaches IOAPIC input ``gsi`` = 20).  On exit only our connection and
    mapping are closed; QEMU and its files belong to the user.
    """
    try:
        fd = os.open(shm_path, os.O_RDWR)
    except OSError as exc:
        raise UsageError(f"cannot open QEMU's RAM file {shm_path}: {exc.strerror}") from exc
    try:
        if ram_size is None:
            ram_size = os.fstat(fd).st_size
        if ram_size <= ARENA_GUEST_OFFSET:
            raise UsageError(
                f"QEMU's RAM ({ram_size} bytes in {shm_path}) must exceed {ARENA_GUEST_OFFSET}"
            )
        if os.fstat(fd).st_size < ram_size:
            raise UsageError(f"QEMU's RAM file {shm_path} is smaller than {ram_size} bytes")
        ram = mmap.mmap(fd, ram_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    backend: QtestBackend | None = None
    try:
        try:
            await trio.to_thread.run_sync(sock.connect, str(socket_path))
        except OSError as exc:
            what = (
                "nothing listens"
                if exc.errno in (_errno.ECONNREFUSED, _errno.ENOENT)
                else exc.strerror
            )
            raise DeviceGone(
                f"cannot connect to QEMU's qtest socket {socket_path}: {what}"
            ) from exc
        sock.setblocking(False)
        backend = QtestBackend(sock, ram, gsi=gsi)
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend._reader)
            nursery.start_soon(backend._writer)
            try:
                await backend.sync()
                yield backend
            except BaseException as exc:
                body_error = exc
            finally:
                await backend.aclose()
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
    finally:
        sock.close()
        if backend is not None:
            backend._release_memory()
        else:
            with contextlib.suppress(BufferError):
                ram.close()


#: Short name for :func:`attach_qtest`.
attach = attach_qtest
