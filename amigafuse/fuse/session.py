"""The mount lifecycle: mount, serve, shut down cleanly; daemonizing; partition locks.

One mount per process: pyfuse3 keeps module globals, so :func:`serve` refuses to run
twice in one process.

Shutdown (SIGINT, SIGTERM, SIGHUP, or the kernel unmounting us):

1. On a signal, the mount is unmounted by ``fusermount3 -u`` run in a worker thread while
   the FUSE loop keeps serving, so the kernel can write back its dirty pages through us
   first.  If the mount is busy, the kernel's caches are synced (``syncfs``), the mount is
   detached lazily and the loop is stopped.  A second signal stops at once.
2. Once the loop has ended, every volume is closed (``Volume.close()``: flush, mark clean).
3. Only then does the process exit, so ``amigafuse umount`` (which waits for the process)
   returns when the volumes are clean on disk.

``auto_unmount`` (on by default) makes libfuse's fusermount3 helper unmount if this
process dies without doing the above (SIGKILL): no dead mount remains.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import trio

from amigafuse.errors import AmigaFuseError, Busy, NotAvailable
from amigafuse.fuse.ops import AmigaOperations

log = logging.getLogger("amigafuse.fuse")

RUN_DIR = Path(os.environ.get("AMIGAFUSE_RUN_DIR", "/run/amigafuse" if os.getuid() == 0 else
                              f"/run/user/{os.getuid()}/amigafuse"))

_served = False
CLOSE_TIMEOUT_S = 120.0  # a dead device must not keep a dead process around for ever


# --------------------------------------------------------------------------- helpers


def check_fuse_available() -> None:
    """Raise NotAvailable with what to do when FUSE cannot work here."""
    if not os.path.exists("/dev/fuse"):
        raise NotAvailable(
            "/dev/fuse does not exist: load the fuse module (modprobe fuse) or, in a "
            "container, pass the device through (--device /dev/fuse --cap-add SYS_ADMIN)"
        )
    if os.getuid() != 0 and shutil.which("fusermount3") is None:
        raise NotAvailable("fusermount3 not found: install the fuse3 package")


def mount_device_number(mountpoint: str) -> str | None:
    """``"0:N"`` of the mount at ``mountpoint`` from /proc/self/mountinfo (no stat: stat on a
    mount we serve ourselves would wait for our own loop)."""
    target = os.path.abspath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    found = fields[2]  # last one wins: the topmost mount
    except OSError:
        return None
    return found


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def set_read_ahead(mountpoint: str, kib: int) -> bool:
    """Raise the mount's readahead so page-cache reads reach us as big requests."""
    dev = mount_device_number(mountpoint)
    if dev is None:
        return False
    path = Path("/sys/class/bdi") / dev / "read_ahead_kb"
    try:
        path.write_text(f"{kib}\n")
    except OSError as exc:
        log.info("could not raise %s to %d KiB (%s); large reads will be slower", path, kib, exc.strerror)
        return False
    return True


FUSECTL = Path("/sys/fs/fuse/connections")


def fuse_connection_dir(mountpoint: str, *, mount_fusectl: bool = True) -> Path | None:
    """The fusectl directory of the FUSE connection behind ``mountpoint``
    (``/sys/fs/fuse/connections/N``, N the mount's device number), or None.

    fusectl is mounted there by systemd on most machines; when it is not (containers),
    root may mount it, as systemd would (``mount_fusectl``)."""
    dev = mount_device_number(mountpoint)
    if dev is None:
        return None
    try:
        major, minor = (int(x) for x in dev.split(":"))
    except ValueError:
        return None
    path = FUSECTL / str((major << 20) | minor)
    if path.is_dir():
        return path
    if mount_fusectl and os.getuid() == 0 and FUSECTL.is_dir() and not any(FUSECTL.iterdir()):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)],
                           capture_output=True, timeout=10, check=False)
            log.info("mounted fusectl on %s (to raise the mount's max_background)", FUSECTL)
        if path.is_dir():
            return path
    return None


def set_max_background(mountpoint: str, requests: int) -> bool:
    """Let the kernel queue up to ``requests`` background FUSE requests (readahead among
    them) for this mount, congestion at three quarters of that.  The kernel's default,
    12 with congestion at 9, stops a sequential read's readahead while 9 reads wait, so
    the device idles while we answer (docs/performance.md).  Needs root (fusectl's files
    are root's); returns False, with a log line, when it cannot."""
    conn = fuse_connection_dir(mountpoint)
    if conn is None:
        log.info("no fusectl directory for %s (is fusectl mounted on %s?); "
                 "large reads will be slower", mountpoint, FUSECTL)
        return False
    try:
        (conn / "max_background").write_text(f"{requests}\n")
        (conn / "congestion_threshold").write_text(f"{max(1, requests * 3 // 4)}\n")
    except OSError as exc:
        log.info("could not raise %s/max_background to %d (%s); large reads will be slower",
                 conn, requests, exc.strerror)
        return False
    return True


def unmount(mountpoint: str, *, lazy: bool = False) -> tuple[bool, str]:
    """Unmount a FUSE mount (fusermount3, else umount).  Returns (done, message)."""
    tool = shutil.which("fusermount3")
    if tool is not None:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [mountpoint]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()


def syncfs(mountpoint: str) -> None:
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    except (OSError, AttributeError):
        os.sync()
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- locks


class PartitionLocks:
    """Locks under RUN_DIR, one per (image, partition): exclusive for read-write mounts,
    shared for read-only ones.  A lock file also records the pid and mount point of its
    holder.  Locks go away with the process (flock), so a crash leaves none behind."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    @staticmethod
    def lock_path(image: str, partition: str) -> Path:
        try:
            st = os.stat(image)
            ident = f"{st.st_dev}:{st.st_ino}"
        except OSError:
            ident = os.path.abspath(image)
        digest = hashlib.sha1(f"{ident}:{partition.upper()}".encode()).hexdigest()[:16]
        return RUN_DIR / f"{digest}.lock"

    def acquire(self, image: str, partition: str, *, exclusive: bool, mountpoint: str,
                shown: str | None = None) -> None:
        """Raises Busy if another process holds a conflicting lock."""
        RUN_DIR.mkdir(parents=True, exist_ok=True, mode=0o755)
        path = self.lock_path(image, partition)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            how = "read-write" if not exclusive else "already"
            raise Busy(
                f"{image} partition {shown or partition} is {how} mounted by another amigafuse "
                f"({holder or 'unknown process'}); unmount it first (amigafuse umount), "
                "or mount it read-only (-o ro) when the other mount is read-only"
            ) from None
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} at {mountpoint}\n".encode(), 0)
        self._fds.append(fd)

    def release(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def pid_file(mountpoint: str) -> Path:
    digest = hashlib.sha1(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return RUN_DIR / f"mount-{digest}.pid"


# --------------------------------------------------------------------------- serving


async def serve(
    ops: AmigaOperations,
    mountpoint: str,
    fuse_options: set[str],
    *,
    read_ahead_kb: int = 4096,
    max_background: int = 64,
    commit_s: int = 5,
    on_ready: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> list[str]:
    """Mount ``ops`` at ``mountpoint`` and serve until unmounted or signalled.

    Every ``commit_s`` seconds (0: never) changed volumes are written back
    (``ops.commit_changed``).  Calls ``on_ready`` once the mount is live (the kernel has had its FUSE_INIT answer).  Returns problems met while closing the
    volumes (empty when they were all closed cleanly).  Raises NotAvailable if the mount
    itself fails.  Cancellation: stops serving, still closes the volumes (shielded) and
    unmounts.
    """
    global _served
    if _served:
        raise RuntimeError("one FUSE mount per process (pyfuse3 keeps module globals)")
    _served = True
    mountpoint = os.path.abspath(mountpoint)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options)
    except RuntimeError as exc:
        raise NotAvailable(
            f"could not mount on {mountpoint}: {exc} (is it an existing directory you may "
            "mount on, and not already mounted? allow_other needs user_allow_other in /etc/fuse.conf)"
        ) from None
    unmounted_by_us = False
    problems: list[str] = []
    pid_path = pid_file(mountpoint)
    try:
        with contextlib.suppress(OSError):
            RUN_DIR.mkdir(parents=True, exist_ok=True)
            pid_path.write_text(f"{os.getpid()}\n")
        async with trio.open_nursery() as nursery:

            async def when_live() -> None:
                # The kernel sends requests only after FUSE_INIT is answered, and it caps
                # the readahead at that moment: a stat that returns proves both happened.
                with contextlib.suppress(OSError):
                    await trio.to_thread.run_sync(os.stat, mountpoint)
                await trio.to_thread.run_sync(set_read_ahead, mountpoint, read_ahead_kb)
                await trio.to_thread.run_sync(set_max_background, mountpoint, max_background)
                if on_ready is not None:
                    on_ready()
                task_status.started()

            stop = trio.Event()

            async def watch_signals() -> None:
                nonlocal unmounted_by_us
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                    async for signum in signals:
                        if stop.is_set():
                            log.warning("second signal: stopping at once")
                            pyfuse3.terminate()
                            return
                        stop.set()
                        log.info("signal %d: unmounting %s", signum, mountpoint)
                        nursery.start_soon(shutdown)

            async def shutdown() -> None:
                nonlocal unmounted_by_us
                done, message = await trio.to_thread.run_sync(unmount, mountpoint)
                if done:
                    unmounted_by_us = True
                    return  # the kernel ends the session; main() returns
                log.warning("unmount of %s failed (%s); syncing and detaching lazily", mountpoint, message)
                await trio.to_thread.run_sync(syncfs, mountpoint)
                await trio.to_thread.run_sync(lambda: unmount(mountpoint, lazy=True))
                unmounted_by_us = True
                pyfuse3.terminate()

            async def run_main() -> None:
                try:
                    await pyfuse3.main()
                finally:
                    nursery.cancel_scope.cancel()

            async def commit_periodically() -> None:
                while True:
                    await trio.sleep(commit_s)
                    await ops.commit_changed()

            nursery.start_soon(watch_signals)
            nursery.start_soon(run_main)
            if commit_s > 0:
                nursery.start_soon(commit_periodically)
            nursery.start_soon(when_live)
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
            problems = await ops.close_volumes()
        if scope.cancelled_caught:
            problems.append(f"closing the volumes took longer than {CLOSE_TIMEOUT_S:.0f} s; gave up")
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=not unmounted_by_us)
        with contextlib.suppress(OSError):
            pid_path.unlink()
    return problems


# --------------------------------------------------------------------------- daemon


@contextlib.contextmanager
def daemon_pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)


def daemonize(child: Callable[[Callable[[], None], Callable[[str], None]], int]) -> int:
    """Fork; the child runs ``child(ready, fail)`` in a new session, the parent waits until
    the child calls ``ready()`` (then exits 0: the mount is live, as mount(8) expects) or
    ``fail(message)``/exits (then prints the message and exits 1).

    Must be called before any thread or trio loop exists in this process.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        chunks = []
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\n" in chunk and chunks[0].startswith(b"OK"):
                break
        os.close(r)
        text = b"".join(chunks).decode(errors="replace")
        if text.startswith("OK"):
            return 0
        _, status = os.waitpid(pid, 0)
        message = text.removeprefix("ERR ").strip()
        code = os.waitstatus_to_exitcode(status)
        if not message:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            message = f"amigafuse mount: the mount process {how} before the mount was live"
        print(message, file=sys.stderr)
        return code if code > 0 else 1
    # child
    os.close(r)
    os.setsid()
    reported = False

    def ready() -> None:
        nonlocal reported
        reported = True
        with contextlib.suppress(OSError):
            os.write(w, b"OK\n")
            os.close(w)
        _detach_stdio()
        os.chdir("/")  # hold no directory busy (everything was opened by absolute path)

    def fail(message: str) -> None:
        nonlocal reported
        if reported:
            log.error("%s", message)
            return
        reported = True
        with contextlib.suppress(OSError):
            os.write(w, f"ERR {message}\n".encode())
            os.close(w)

    code = 1
    try:
        code = child(ready, fail)
    except BaseException as exc:  # the daemon must always report and exit
        fail(f"amigafuse mount: {exc!r}")
    finally:
        os._exit(code)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    os.close(devnull)


def errno_of(exc: BaseException) -> int:
    if isinstance(exc, AmigaFuseError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
