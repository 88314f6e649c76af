#!/usr/bin/env python3
"""Speed of the whole stack through a FUSE mount, with baselines measured in the same run.

    .venv/bin/python benchmarks/mount.py --json [--big-mib 256] [--small-files 5000]
                                         [--backends file,qemu] [--runs 3]

Workloads (each timed ``--runs`` times, the median reported):

* ``cat_big``: read a BIG file (cat > /dev/null) from a fresh mount;
* ``cp_big_in``: copy a BIG file into the mounted partition (then sync: ``sync -f``
  and an fsync of the partition's directory, which makes the engine write back);
* ``cp_small_in``: ``cp -a`` of a tree of SMALL files into it (then the same sync);
* ``ls_lR``: ``ls -lR`` of those small files on a fresh mount;

done through ``amigafuse mount`` for each backend (``file``: the image file; ``qemu``:
the VirtIO SCSI driver), and the same work on a plain directory; plus the raw image read
(``cat image``, from the page cache: the physical limit) and amitools' xdftool extracting
and inserting the same files.  The test disk is made by amitools (rdbtool + xdftool:
RDB, one DOS\\3 partition), independent of amigafuse's own writers.

Also, untimed: the FUSE requests per file that ``cp -a`` of one directory of the small
files makes reach amigafuse (``cp_small_in_requests``, from a ``-d`` mount's log).

The floor: ``pyfuse3_null_floor`` runs the same ``cp -a`` (and sync) into a *null*
pyfuse3 filesystem served by this script (``--serve-null``: attributes in a dict, data
dropped, the same writeback cache and xattr answers as amigafuse), so the kernel sends
it the same requests.  Its time and CPU are what pyfuse3, trio and the kernel cost
before any filesystem work: no pyfuse3 filesystem can copy these files faster.
``cp_small_in_per_file`` puts amigafuse's server CPU per file beside that floor's.
``pyfuse3_null_read_floor`` is the same for the large read: ``cat`` of a file of the
same size from a fresh null pyfuse3 mount (its reads answered from one buffer of
zeros, no device, no copy on the server's side) with amigafuse's readahead and
background-request limit: the fastest any pyfuse3 filesystem reads through this
kernel on this machine.  ``cat_big_vs_null_read_floor`` is amigafuse's share of it.

Each mount workload also reports ``server_cpu_seconds``: the CPU time the mount process
used during it (from /proc; QEMU's own time not included), a steadier measure than wall
time on a busy machine; ``qemu_cpu_seconds`` (the mount's QEMU), ``client_cpu_seconds``
(the workload's own ``cat``/``cp``/``ls``, whose kernel work such as filling the FUSE
page cache runs in it) and ``cpu_bound_seconds`` (all three over the machine's CPU
count: the wall time if the work overlapped perfectly).

Ratios printed: ``cat_big`` through the stack / raw image read (target >= 0.25; the
null floor's own ratio, ``pyfuse3_null_read_floor.cat_big_vs_raw_image_read``, is one
ceiling; ``cat_big_ceiling_vs_raw_image_read`` is a tighter one for a backend that costs
CPU of its own, QEMU: the null server's, cat's and QEMU's CPU time spread perfectly over
the machine's CPUs) and
amigafuse / amitools for each workload.  A workload that fails (say the engine mounts
read-only) is reported with its error, never silently dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
EXTRA_OPTIONS = ""  # ",opt=value..." from --mount-options
AMITOOLS_BIN = Path(PY).parent


def sh(cmd: list[str], *, timeout: float = 1800, **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(cmd, text=True, timeout=timeout, check=False, **kw)


def must(cmd: list[str], **kw: Any) -> None:
    proc = sh(cmd, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def children_cpu_seconds() -> float:
    """CPU (user + system) of this script's finished, waited-for children so far: a
    workload's ``cat`` or ``cp`` (whose kernel work, such as filling the FUSE page cache
    on a read, runs in that process)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def pid_cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) process ``pid`` has used so far; NaN if unknown."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_payload(work: Path, big_mib: int, small_files: int) -> tuple[Path, Path]:
    big = work / "big.bin"
    with open(big, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(big_mib):
            f.write(block[i % 7 :] + block[: i % 7])
    tree = work / "small"
    per_dir = 500
    for i in range(small_files):
        d = tree / f"d{i // per_dir:02d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        (d / f"f{i:05d}.txt").write_bytes(os.urandom(64 + (i * 37) % 4000))
    return big, tree


def make_disk(path: Path, size_mib: int, with_files: tuple[Path, Path] | None) -> None:
    """An RDB disk with one DOS\\3 partition DH0, made by amitools only."""
    if path.exists():
        path.unlink()
    must([str(AMITOOLS_BIN / "rdbtool"), str(path), "create", f"size={size_mib}M", "+", "init",
          "+", "add", "size=100%", "name=DH0", "dostype=ffs+intl"])
    xdf = [str(AMITOOLS_BIN / "xdftool"), str(path), "open", "part=DH0", "+"]
    must([*xdf, "format", "Bench", "ffs+intl"])
    if with_files:
        big, tree = with_files
        must([*xdf, "write", str(big)])
        must([*xdf, "write", str(tree)])
    # rdbtool makes sparse images; reading a hole costs nothing, so the raw-read
    # baseline would measure holes.  A fully written copy has the same bytes.
    dense = path.with_suffix(".dense")
    must(["cp", "--sparse=never", str(path), str(dense)])
    dense.replace(path)


def make_sfs_disk(path: Path, size_mib: int) -> None:
    """An RDB disk (rdbtool) with one SFS\\0 partition DH0 formatted by amigafuse's SFS engine:
    the write workloads' target while the FFS engine mounts read-only."""
    if path.exists():
        path.unlink()
    must([str(AMITOOLS_BIN / "rdbtool"), str(path), "create", f"size={size_mib}M", "+", "init",
          "+", "add", "size=100%", "name=DH0", "dostype=0x53465300"])
    code = (
        "import sys, trio\n"
        "from amigafuse.blockdev.file import FileBlockDevice\n"
        "from amigafuse.blockdev.window import PartitionDevice\n"
        "from amigafuse.fs import engine_for\n"
        "from amigafuse.rdb.scan import scan_device\n"
        "async def main():\n"
        "    dev = FileBlockDevice(sys.argv[1])\n"
        "    part = (await scan_device(dev)).partitions[0]\n"
        "    w = PartitionDevice(dev, part.first_lba, part.block_count)\n"
        "    await engine_for(part.dostype).format_volume(w, part.geometry, 'Bench')\n"
        "    await dev.flush()\n"
        "trio.run(main)\n"
    )
    must([PY, "-c", code, str(path)], cwd=REPO)


def ffs_writable(image: Path, work: Path) -> bool:
    mnt = work / "probe"
    mnt.mkdir(exist_ok=True)
    m = Mount(image, mnt, "file")
    try:
        return os.access(m.root, os.W_OK) and sh(["mkdir", str(m.root / "probe")]).returncode == 0
    finally:
        m.close()


class Mount:
    def __init__(self, image: Path, mnt: Path, backend: str, ro: bool = False) -> None:
        self.mnt = mnt
        opts = f"backend={backend}" + (",ro" if ro else "") + EXTRA_OPTIONS
        proc = sh([PY, "-m", "amigafuse", "mount", "-o", opts, str(image), str(mnt)], cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"mount failed: {proc.stderr.strip()}")
        self.root = mnt / "DH0"
        self.pid = self._server_pid()
        self.qemu_pid = self._qemu_pid()

    def _qemu_pid(self) -> int | None:
        """The QEMU the mount process runs (qemu backend), else None."""
        if self.pid is None:
            return None
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return None
        for child in children:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().startswith("qemu-system"):
                    return int(child)
        return None

    def _server_pid(self) -> int | None:
        """The mount process (its pid file, named as amigafuse.fuse.session.pid_file)."""
        run_dir = Path(os.environ.get("AMIGAFUSE_RUN_DIR", "/run/amigafuse" if os.getuid() == 0
                                      else f"/run/user/{os.getuid()}/amigafuse"))
        digest = hashlib.sha1(os.path.abspath(self.mnt).encode()).hexdigest()[:16]
        try:
            return int((run_dir / f"mount-{digest}.pid").read_text())
        except (OSError, ValueError):
            return None

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the mount process has used so far; NaN if unknown.
        Less disturbed by other load on the machine than wall time."""
        return pid_cpu_seconds(self.pid)

    def close(self) -> None:
        proc = sh([PY, "-m", "amigafuse", "umount", str(self.mnt)], cwd=REPO)
        if proc.returncode != 0:
            sh(["fusermount3", "-u", "-z", str(self.mnt)])
            raise RuntimeError(f"umount failed: {proc.stderr.strip()}")


def is_mounted(mnt: Path) -> bool:
    target = str(mnt.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def count_requests(empty_image: Path, src: Path, work: Path) -> dict[str, Any]:
    """FUSE requests reaching amigafuse per file for ``cp -a`` of ``src`` (then sync),
    counted from the ``-d`` log of a file-backend mount (not timed)."""
    mnt = work / "mnt_requests"
    mnt.mkdir(exist_ok=True)
    image = work / "requests.hdf"
    shutil.copyfile(empty_image, image)
    log = work / "requests.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([PY, "-m", "amigafuse", "mount", "-d", "-o", "backend=file", str(image), str(mnt)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the -d mount did not come up: {log.read_text()[-500:]}")
            time.sleep(0.05)
        before = log.read_text().count("\n")
        must(["cp", "-a", str(src), str(mnt / "DH0" / src.name)])
        must(["sync", "-f", str(mnt / "DH0")])
        lines = log.read_text().splitlines()[before:]
    finally:
        sh([PY, "-m", "amigafuse", "umount", str(mnt)], cwd=REPO)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    files = sum(1 for p in src.rglob("*") if p.is_file())
    ops: dict[str, int] = {}
    for line in lines:
        text = line.removeprefix("amigafuse: ")
        if " -> " in text or "(" not in text:
            continue  # a request's outcome, not a request
        op = text.split("(", 1)[0]
        ops[op] = ops.get(op, 0) + 1
    return {"files": files, "per_file": round(sum(ops.values()) / files, 2),
            "by_operation": {k: round(v / files, 2) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])}}


def serve_null(mountpoint: str, counts_path: str, big_bytes: int = 0) -> int:
    """A null pyfuse3 filesystem at ``mountpoint`` until unmounted; writes its request
    counts to ``counts_path`` (JSON) at the end.  Answers what ``cp -a`` asks as amigafuse
    does (writeback cache on, security.* and ACL xattrs ENOTSUP), does nothing else.
    With ``big_bytes``, its root holds ``big.bin`` of that size, read as zeros from one
    buffer (no copy on our side: the floor of a large read)."""
    import errno
    import stat as stat_mod

    import pyfuse3
    import trio

    counts: dict[str, int] = {}
    zeros = memoryview(bytes(1 << 20))  # a read is at most max_pages (256) pages

    def seen(op: str) -> None:
        counts[op] = counts.get(op, 0) + 1

    class Null(pyfuse3.Operations):
        enable_writeback_cache = True

        def __init__(self) -> None:
            super().__init__()
            self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
            self.names: dict[tuple[int, bytes], int] = {}
            self.next_inode = pyfuse3.ROOT_INODE + 1
            self._new(pyfuse3.ROOT_INODE, stat_mod.S_IFDIR | 0o755)
            if big_bytes:
                self._add(pyfuse3.ROOT_INODE, b"big.bin", stat_mod.S_IFREG | 0o644).st_size = big_bytes

        def _new(self, inode: int, mode: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            a.st_mode = mode
            a.st_nlink = 1
            a.st_blksize = 1 << 20
            a.entry_timeout = a.attr_timeout = 60.0
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = time.time_ns()
            self.attrs[inode] = a
            return a

        def _add(self, parent: int, name: bytes, mode: int) -> pyfuse3.EntryAttributes:
            inode = self.next_inode
            self.next_inode += 1
            self.names[(parent, name)] = inode
            return self._new(inode, mode)

        async def lookup(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
            seen("lookup")
            inode = self.names.get((parent_inode, name))
            if inode is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.attrs[inode]

        async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
            seen("getattr")
            return self.attrs[inode]

        async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
            seen("setattr")
            a = self.attrs[inode]
            if fields.update_mode:
                a.st_mode = attr.st_mode
            if fields.update_mtime:
                a.st_mtime_ns = attr.st_mtime_ns
            if fields.update_size:
                a.st_size = attr.st_size
            return a

        async def mkdir(self, parent_inode, name, mode, ctx):  # type: ignore[no-untyped-def]
            seen("mkdir")
            return self._add(parent_inode, name, stat_mod.S_IFDIR | (mode & 0o777))

        async def create(self, parent_inode, name, mode, flags, ctx):  # type: ignore[no-untyped-def]
            seen("create")
            a = self._add(parent_inode, name, stat_mod.S_IFREG | (mode & 0o777))
            return pyfuse3.FileInfo(fh=a.st_ino), a

        async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
            seen("open")
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
            seen("read")
            n = max(0, min(size, self.attrs[fh].st_size - off, len(zeros)))
            return zeros[:n]

        async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
            seen("write")
            a = self.attrs[fh]
            a.st_size = max(a.st_size, off + len(buf))
            return len(buf)

        async def release(self, fh):  # type: ignore[no-untyped-def]
            seen("release")

        async def getxattr(self, inode, name, ctx):  # type: ignore[no-untyped-def]
            seen("getxattr")
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR if name.startswith(b"user.") else errno.ENOTSUP)

        async def setxattr(self, inode, name, value, ctx):  # type: ignore[no-untyped-def]
            seen("setxattr")
            raise pyfuse3.FUSEError(errno.ENOTSUP)

        async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
            seen("opendir")
            return inode

        async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
            seen("readdir")

        async def releasedir(self, fh):  # type: ignore[no-untyped-def]
            seen("releasedir")

        async def fsync(self, fh, datasync):  # type: ignore[no-untyped-def]
            seen("fsync")

        async def fsyncdir(self, fh, datasync):  # type: ignore[no-untyped-def]
            seen("fsyncdir")

        async def forget(self, inode_list):  # type: ignore[no-untyped-def]
            seen("forget")

        async def statfs(self, ctx):  # type: ignore[no-untyped-def]
            seen("statfs")
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 512
            s.f_blocks = s.f_bfree = s.f_bavail = 1 << 20
            s.f_namemax = 107
            return s

    pyfuse3.init(Null(), mountpoint, {"fsname=nullfloor", "subtype=nullfloor"})
    print("READY", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
        Path(counts_path).write_text(json.dumps(counts))
    return 0


def null_read_floor(big_bytes: int, raw_bytes_per_s: float, work: Path, runs: int) -> dict[str, Any]:
    """``cat`` of a ``big_bytes`` file from a fresh null pyfuse3 mount, with the readahead
    and background-request limit amigafuse's mounts get: the most any pyfuse3 filesystem
    reads through this kernel here (no device, no copy on the server's side)."""
    from amigafuse.fuse.options import parse_options
    from amigafuse.fuse.session import set_max_background, set_read_ahead

    opts = parse_options([EXTRA_OPTIONS.lstrip(",")] if EXTRA_OPTIONS else [])
    mnt = work / "mnt_null"
    mnt.mkdir(exist_ok=True)
    times: list[float] = []
    server_cpu: list[float] = []
    client_cpu: list[float] = []
    for run in range(runs):
        counts_path = work / f"null_read_counts{run}.json"
        proc = subprocess.Popen([PY, str(Path(__file__).resolve()), "--serve-null", str(mnt), str(counts_path),
                                 "--null-big-bytes", str(big_bytes)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_null_mounted(proc, mnt)
            set_read_ahead(str(mnt), opts.read_ahead_kb)
            set_max_background(str(mnt), opts.max_background)
            s0, c0 = pid_cpu_seconds(proc.pid), children_cpu_seconds()
            times.append(timed(lambda: must(["cat", str(mnt / "big.bin")], stdout=subprocess.DEVNULL)))
            server_cpu.append(pid_cpu_seconds(proc.pid) - s0)
            client_cpu.append(children_cpu_seconds() - c0)
        finally:
            stop_null(proc, mnt)
    return {"cat_big_seconds": round(median(times), 4), "runs": [round(t, 4) for t in times],
            "server_cpu_seconds": round(median(server_cpu), 3), "client_cpu_seconds": round(median(client_cpu), 3),
            "MB_per_s": round(big_bytes / median(times) / 1e6, 1),
            "cat_big_vs_raw_image_read": round(big_bytes / median(times) / raw_bytes_per_s, 3),
            "read_ahead_kb": opts.read_ahead_kb, "max_background": opts.max_background}


def wait_null_mounted(proc: subprocess.Popen[str], mnt: Path) -> None:
    assert proc.stdout is not None
    if "READY" not in proc.stdout.readline():
        raise RuntimeError(f"the null filesystem did not start: {proc.stderr.read()[-400:]}")  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while not is_mounted(mnt):
        if time.monotonic() > deadline:
            raise RuntimeError("the null filesystem did not mount")
        time.sleep(0.02)


def stop_null(proc: subprocess.Popen[str], mnt: Path) -> None:
    sh(["fusermount3", "-u", str(mnt)])
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def null_floor(tree: Path, work: Path, runs: int) -> dict[str, Any]:
    """``cp -a`` of ``tree`` (then the same syncs) into the null pyfuse3 filesystem."""
    mnt = work / "mnt_null"
    mnt.mkdir(exist_ok=True)
    files = sum(1 for p in tree.rglob("*") if p.is_file())
    times, cpus = [], []
    counts: dict[str, int] = {}
    for run in range(runs):
        counts_path = work / f"null_counts{run}.json"
        proc = subprocess.Popen([PY, str(Path(__file__).resolve()), "--serve-null", str(mnt), str(counts_path)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_null_mounted(proc, mnt)

            def cpu(pid: int = proc.pid) -> float:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

            def copy() -> None:
                must(["cp", "-a", str(tree), str(mnt / tree.name)])
                must(["sync", "-f", str(mnt)])
                must(["sync", str(mnt)])

            cpu0 = cpu()
            times.append(timed(copy))
            cpus.append(cpu() - cpu0)
        finally:
            stop_null(proc, mnt)
        counts = json.loads(counts_path.read_text()) if counts_path.exists() else {}
    requests = sum(v for k, v in counts.items() if k != "forget")
    return {"seconds": round(median(times), 4), "runs": [round(t, 4) for t in times],
            "server_cpu_seconds": round(median(cpus), 3),
            "server_cpu_us_per_file": round(median(cpus) / files * 1e6, 1),
            "requests_per_file": round(requests / files, 2),
            "by_operation": {k: round(v / files, 2) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_mount(backend: str, full_image: Path, empty_image: Path, big: Path, tree: Path,
                work: Path, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mnt = work / f"mnt_{backend}"
    mnt.mkdir(exist_ok=True)
    size = big.stat().st_size

    def record(name: str, fn: Any, nbytes: int | None = None) -> None:
        times: list[float] = []
        cpus: dict[str, list[float]] = {"server": [], "qemu": [], "client": []}
        try:
            for _ in range(runs):
                wall, cpu = fn()
                times.append(wall)
                for k, v in cpu.items():
                    cpus[k].append(v)
            entry: dict[str, Any] = {"seconds": round(median(times), 4),
                                     "runs": [round(t, 4) for t in times],
                                     "server_cpu_seconds": round(median(cpus["server"]), 3)}
            if not any(math.isnan(v) for v in cpus["qemu"]):
                entry["qemu_cpu_seconds"] = round(median(cpus["qemu"]), 3)
            entry["client_cpu_seconds"] = round(median(cpus["client"]), 3)
            busy = [sum(v) for v in zip(*(c for c in cpus.values() if not any(map(math.isnan, c))), strict=True)]
            # the wall time this work would take if it were spread perfectly over the
            # machine's CPUs: how close the run came to being CPU-bound
            entry["cpu_bound_seconds"] = round(median(busy) / (os.cpu_count() or 1), 4)
            if nbytes:
                entry["MB_per_s"] = round(nbytes / median(times) / 1e6, 1)
            out[name] = entry
        except Exception as exc:  # a failed workload is reported, not dropped
            out[name] = {"error": str(exc)[:400]}

    def measured(m: Mount, fn: Any) -> tuple[float, dict[str, float]]:
        """(wall seconds, CPU seconds of the mount process, its QEMU, and the workload's
        own command) of ``fn``."""
        cpu0, q0, c0 = m.cpu_seconds(), pid_cpu_seconds(m.qemu_pid), children_cpu_seconds()
        wall = timed(fn)
        return wall, {"server": m.cpu_seconds() - cpu0, "qemu": pid_cpu_seconds(m.qemu_pid) - q0,
                      "client": children_cpu_seconds() - c0}

    def cat_big() -> tuple[float, dict[str, float]]:
        # A fresh mount has a cold FUSE page cache; the image itself stays in the host's
        # page cache, as for the raw image read it is compared with.
        m = Mount(full_image, mnt, backend, ro=True)
        try:
            return measured(m, lambda: must(["cat", str(m.root / big.name)], stdout=subprocess.DEVNULL))
        finally:
            m.close()

    def ls_lr() -> tuple[float, dict[str, float]]:
        m = Mount(full_image, mnt, backend, ro=True)
        try:
            return measured(m, lambda: must(["ls", "-lR", str(m.root / tree.name)], stdout=subprocess.DEVNULL))
        finally:
            m.close()

    def cp_in(src: Path, args: list[str]) -> tuple[float, dict[str, float]]:
        shutil.copyfile(empty_image, work / "scratch.hdf")
        m = Mount(work / "scratch.hdf", mnt, backend)
        try:
            def run() -> None:
                must(["cp", *args, str(src), str(m.root / src.name)])
                # syncfs writes the kernel's dirty pages to us but never reaches a FUSE
                # daemon (the kernel sends FUSE_SYNCFS only to virtiofs); fsync of the
                # directory does: the engine writes back everything and flushes
                must(["sync", "-f", str(m.root)])
                must(["sync", str(m.root)])

            return measured(m, run)
        finally:
            m.close()

    record("cat_big", cat_big, size)
    record("ls_lR", ls_lr)
    record("cp_big_in", lambda: cp_in(big, []), size)
    record("cp_small_in", lambda: cp_in(tree, ["-a"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--small-files", type=int, default=5000)
    ap.add_argument("--backends", default="file,qemu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mount-options", default="",
                    help="extra -o options for every amigafuse mount, e.g. read_ahead_kb=1024")
    ap.add_argument("--workdir", help="keep work files here (default: a temporary directory)")
    ap.add_argument("--serve-null", nargs=2, metavar=("MOUNTPOINT", "COUNTS_JSON"),
                    help="internal: serve the null pyfuse3 filesystem (the floor) there")
    ap.add_argument("--null-big-bytes", type=int, default=0, help="internal: with --serve-null, a big.bin of this size")
    args = ap.parse_args()
    if args.serve_null:
        mountpoint, counts_path = args.serve_null
        return serve_null(mountpoint, counts_path, big_bytes=args.null_big_bytes)
    global EXTRA_OPTIONS
    EXTRA_OPTIONS = "," + args.mount_options if args.mount_options else ""

    tmp = tempfile.TemporaryDirectory(prefix="amigafuse-bench-") if not args.workdir else None
    work = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"big_mib": args.big_mib, "small_files": args.small_files,
                              "runs": args.runs, "drop_caches": drop_caches(),
                              "mount_options": args.mount_options}
    try:
        big, tree = make_payload(work, args.big_mib, args.small_files)
        disk_mib = args.big_mib * 2 + 64 + args.small_files * 3 // 1024 * 2
        full, empty = work / "full.hdf", work / "empty.hdf"
        t_make = timed(lambda: make_disk(full, disk_mib, (big, tree)))
        make_disk(empty, disk_mib, None)
        result["disk_mib"] = disk_mib
        result["write_fs"] = "FFS (DOS\\3)"
        write_target = empty
        if not ffs_writable(empty, work):
            write_target = work / "empty_sfs.hdf"
            make_sfs_disk(write_target, disk_mib)
            result["write_fs"] = "SFS\\0 (the FFS engine mounts read-only in this build)"

        # baselines: raw image read, plain directory
        sh(["cat", str(full)], stdout=subprocess.DEVNULL)  # into the page cache
        raw = [timed(lambda: must(["cat", str(full)], stdout=subprocess.DEVNULL)) for _ in range(args.runs)]
        result["raw_image_read"] = {"seconds": round(median(raw), 4),
                                    "MB_per_s": round(full.stat().st_size / median(raw) / 1e6, 1)}
        plain = work / "plain"
        plain.mkdir()
        pl: dict[str, Any] = {}
        pl["cat_big"] = median([timed(lambda: must(["cat", str(big)], stdout=subprocess.DEVNULL)) for _ in range(args.runs)])
        pl["ls_lR"] = median([timed(lambda: must(["ls", "-lR", str(tree)], stdout=subprocess.DEVNULL)) for _ in range(args.runs)])

        def plain_cp(src: Path, extra: list[str]) -> float:
            dst = plain / src.name
            shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(missing_ok=True)
            def run() -> None:
                must(["cp", *extra, str(src), str(dst)])
                must(["sync", "-f", str(plain)])

            return timed(run)

        pl["cp_big_in"] = median([plain_cp(big, []) for _ in range(args.runs)])
        pl["cp_small_in"] = median([plain_cp(tree, ["-a"]) for _ in range(args.runs)])
        result["plain_directory"] = {k: round(v, 4) for k, v in pl.items()}

        # amitools (whole files in RAM; the peer users have today)
        xdf = [str(AMITOOLS_BIN / "xdftool"), str(full), "open", "part=DH0", "+"]
        out_dir = work / "amitools_out"
        am: dict[str, Any] = {"insert_all_seconds": round(t_make, 4)}

        def ami_read_big() -> float:
            (out_dir / big.name).unlink(missing_ok=True)
            out_dir.mkdir(exist_ok=True)
            return timed(lambda: must([*xdf, "read", big.name, str(out_dir / big.name)]))

        am["cat_big"] = median([ami_read_big() for _ in range(args.runs)])
        am["ls_lR"] = median([timed(lambda: must([*xdf, "list", tree.name])) for _ in range(args.runs)])

        def ami_insert(src: Path) -> float:
            shutil.copyfile(empty, work / "ami.hdf")
            cmd = [str(AMITOOLS_BIN / "xdftool"), str(work / "ami.hdf"), "open", "part=DH0", "+", "write", str(src)]
            return timed(lambda: must(cmd))

        am["cp_big_in"] = median([ami_insert(big) for _ in range(args.runs)])
        am["cp_small_in"] = median([ami_insert(tree) for _ in range(args.runs)])
        result["amitools"] = {k: round(v, 4) for k, v in am.items()}

        try:
            first_dir = sorted(p for p in tree.iterdir() if p.is_dir())[0]
            result["cp_small_in_requests"] = count_requests(write_target, first_dir, work)
        except Exception as exc:  # reported, not fatal
            result["cp_small_in_requests"] = {"error": str(exc)[:400]}

        try:
            result["pyfuse3_null_floor"] = null_floor(tree, work, args.runs)
        except Exception as exc:  # reported, not fatal
            result["pyfuse3_null_floor"] = {"error": str(exc)[:400]}
        floor = result["pyfuse3_null_floor"]
        files = args.small_files
        try:
            result["pyfuse3_null_read_floor"] = null_read_floor(
                big.stat().st_size, full.stat().st_size / median(raw), work, args.runs)
        except Exception as exc:  # reported, not fatal
            result["pyfuse3_null_read_floor"] = {"error": str(exc)[:400]}

        for backend in args.backends.split(","):
            res = bench_mount(backend, full, write_target, big, tree, work, args.runs)
            result[f"amigafuse_{backend}"] = res
            small = res.get("cp_small_in", {})
            if "server_cpu_seconds" in small:
                per_file: dict[str, Any] = {
                    "server_cpu_us": round(small["server_cpu_seconds"] / files * 1e6, 1),
                    "wall_us": round(small["seconds"] / files * 1e6, 1),
                    "amitools_wall_us": round(am["cp_small_in"] / files * 1e6, 1),
                }
                if "server_cpu_seconds" in floor:
                    per_file["null_floor_server_cpu_us"] = floor["server_cpu_us_per_file"]
                    per_file["null_floor_wall_us"] = round(floor["seconds"] / files * 1e6, 1)
                res["cp_small_in_per_file"] = per_file
            ratios: dict[str, Any] = {}
            cat = res.get("cat_big", {}).get("seconds")
            if cat:
                ratios["cat_big_vs_raw_image_read"] = round(
                    (big.stat().st_size / cat) / (full.stat().st_size / median(raw)), 3)
                nf = result["pyfuse3_null_read_floor"]
                if nf.get("cat_big_seconds"):
                    ratios["cat_big_vs_null_read_floor"] = round(nf["cat_big_seconds"] / cat, 3)
                    # The best ratio a pyfuse3 server that did no work of its own could
                    # reach here with this backend doing its part: the null server's and
                    # cat's CPU plus this backend's QEMU CPU, spread perfectly over the
                    # machine's CPUs (an upper bound: real runs never overlap perfectly).
                    busy = nf["server_cpu_seconds"] + nf["client_cpu_seconds"] + res["cat_big"].get("qemu_cpu_seconds", 0.0)
                    best = busy / (os.cpu_count() or 1)
                    if best > 0:
                        ratios["cat_big_ceiling_vs_raw_image_read"] = round(
                            (big.stat().st_size / best) / (full.stat().st_size / median(raw)), 3)
            for k in ("cat_big", "ls_lR", "cp_big_in", "cp_small_in"):
                s = res.get(k, {}).get("seconds")
                if s:
                    ratios[f"{k}_speedup_vs_amitools"] = round(am[k] / s, 2)
                    ratios[f"{k}_vs_plain_directory"] = round(pl[k] / s, 3)
            if res.get("cp_small_in", {}).get("seconds") and floor.get("seconds"):
                ratios["cp_small_in_null_floor_vs_amitools"] = round(am["cp_small_in"] / floor["seconds"], 2)
            result[f"ratios_{backend}"] = ratios
    finally:
        for m in work.glob("mnt_*"):
            sh(["fusermount3", "-u", "-z", str(m)])
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(json.dumps(result, indent=1))
        print("target: cat_big_vs_raw_image_read >= 0.25; speedups vs amitools > 1", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
