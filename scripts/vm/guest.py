"""Boot a throwaway Linux guest under QEMU TCG and run one shell command in it.

This is the harness for the VFIO tests (``tests/vm``) and ``benchmarks/vfio.py``: this
machine's kernel has no VFIO, and ``/dev/kvm`` cannot run a stock kernel, so a Debian
6.1 kernel is booted under TCG with a vIOMMU (intel-iommu, ``intel_iommu=on``) and the
VirtIO SCSI controllers under test.  Inside, the host's root file system is visible
read-only over 9p with a tmpfs overlay (so the repository, /usr/bin/python3 and the
venv's packages are all there); the command's stdout, stderr and exit status come back
through virtio-serial ports written to regular files.

Artifacts, all under ``cache/vm`` (gitignored), built once and reused:

* ``debs/``     ``linux-image-amd64`` and the versioned image it depends on (``apt-get download``)
* ``kpkg/``     the unpacked kernel package (``dpkg-deb -x``): vmlinuz, modules
* ``vmlinux``   the uncompressed ELF kernel, booted through its PVH entry (no decompression under TCG)
* ``initramfs.cpio``  busybox-static, ``scripts/vm/init.sh`` as /init, and the modules

Usage from Python::

    result = run_in_guest("lspci", controllers=[Controller(disks=[Disk(path)])])
    result.rc, result.stdout, result.stderr

From the shell: ``python3 scripts/vm/guest.py [--image PATH]... -- CMD...``.

Guest Python: ``/usr/bin/python3`` (Debian's 3.11, starts fast over 9p) with
``PYTHONPATH`` = the repository and the venv's site-packages (same 3.11 ABI), so trio,
pyfuse3 and amigafuse import exactly as on the host.
"""

from __future__ import annotations

import argparse
import fcntl
import lzma
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "cache" / "vm"
INIT_SCRIPT = Path(__file__).resolve().parent / "init.sh"
VENV_SITE = REPO / ".venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
GUEST_PYTHON = "/usr/bin/python3"
QEMU = "qemu-system-x86_64"

# Modules the guest may need, by module name.  BASE_MODULES are always loaded by init;
# the others are available under cache/vm/modules/<name>.ko for `insmod` (see
# `guest_modprobe`), with their dependencies resolved here from each .ko's .modinfo.
BASE_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay")
EXTRA_MODULES = (
    "vfio_pci",
    "vfio_iommu_type1",
    "affs",
    "fuse",
    "virtio_scsi",
    "sd_mod",
    "ahci",  # binds q35 SATA 00:1f.2: a driver-bound device in a shared IOMMU group (tests)
)


class GuestError(RuntimeError):
    """The guest could not be built or booted (not: the command failed).  ``qemu_pid``:
    the QEMU process involved, if one was started (it has been reaped)."""

    def __init__(self, message: str, qemu_pid: int | None = None) -> None:
        super().__init__(message)
        self.qemu_pid = qemu_pid


# --------------------------------------------------------------------------- kernel


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _kernel_package_dir() -> Path:
    """Download and unpack Debian's linux-image-amd64 (and its versioned image) once."""
    kpkg = CACHE / "kpkg"
    if (kpkg / "boot").is_dir() and any((kpkg / "boot").glob("vmlinuz-*")):
        return kpkg
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob("linux-image-amd64_*.deb")):
        _run(["apt-get", "download", "linux-image-amd64"], cwd=debs)
    meta = sorted(debs.glob("linux-image-amd64_*.deb"))[-1]
    depends = _run(["dpkg-deb", "-f", str(meta), "Depends"]).strip()
    image_pkg = depends.split(",")[0].split()[0]
    if not list(debs.glob(f"{image_pkg}_*.deb")):
        _run(["apt-get", "download", image_pkg], cwd=debs)
    deb = sorted(debs.glob(f"{image_pkg}_*.deb"))[-1]
    tmp = CACHE / "kpkg.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    shutil.rmtree(kpkg, ignore_errors=True)
    tmp.rename(kpkg)
    return kpkg


def kernel_release() -> str:
    """The guest kernel's release string (e.g. ``6.1.0-56-amd64``)."""
    vmlinuz = sorted((_kernel_package_dir() / "boot").glob("vmlinuz-*"))[-1]
    return vmlinuz.name[len("vmlinuz-") :]


# Magic numbers of the payload compressors a bzImage may carry, with a decompressor.
def _try_xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _try_lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def _try_gzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


_PAYLOADS = (
    (b"\xfd7zXZ\x00", _try_xz),
    (b"\x1f\x8b\x08", _try_gzip),
    (b"\x5d\x00\x00", _try_lzma),
)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Find the compressed kernel inside a bzImage and return the ELF ``vmlinux``.

    Tries each known compression magic at each place it occurs; the first candidate that
    decompresses to an ELF file wins.  Raises GuestError when none does (e.g. zstd, for
    which Python 3.11 has no decoder).
    """
    for magic, decode in _PAYLOADS:
        start = 0
        while (pos := bzimage.find(magic, start)) >= 0:
            start = pos + 1
            try:
                out = decode(bzimage[pos:])
            except (lzma.LZMAError, zlib.error, EOFError):
                continue
            if out[:4] == b"\x7fELF":
                return out
    raise GuestError("no xz/gzip/lzma payload that decompresses to an ELF kernel in the bzImage")


def vmlinux_path() -> Path:
    """The uncompressed kernel (booted through its PVH ELF note), built once."""
    out = CACHE / "vmlinux"
    if out.exists():
        return out
    vmlinuz = _kernel_package_dir() / "boot" / f"vmlinuz-{kernel_release()}"
    elf = extract_vmlinux(vmlinuz.read_bytes())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------- modules


def _modinfo(ko: bytes) -> dict[str, str]:
    """The key=value strings of an ELF64 kernel module's ``.modinfo`` section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise GuestError("not an ELF64 kernel module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + i * shentsize
        )
        return name, offset, size

    _n, stroff, _s = section(shstrndx)
    info: dict[str, str] = {}
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = ko.index(b"\0", stroff + name_off)
        if ko[stroff + name_off : end] != b".modinfo":
            continue
        for item in ko[offset : offset + size].split(b"\0"):
            key, sep, value = item.partition(b"=")
            if sep:
                info.setdefault(key.decode(), value.decode(errors="replace"))
    return info


def _module_index() -> dict[str, Path]:
    """Module name (``-`` spelled ``_``) -> .ko path in the unpacked kernel package."""
    root = _kernel_package_dir() / "lib" / "modules" / kernel_release() / "kernel"
    return {p.name[: -len(".ko")].replace("-", "_"): p for p in root.rglob("*.ko")}


def resolve_modules(names: Iterable[str]) -> list[str]:
    """``names`` plus their dependencies, dependencies first (a load order)."""
    index = _module_index()
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in order:
            return
        if name in visiting:
            raise GuestError(f"module dependency loop at {name}")
        if name not in index:
            raise GuestError(f"module {name} is not in the guest kernel package")
        visiting.add(name)
        deps = _modinfo(index[name].read_bytes()).get("depends", "")
        for dep in filter(None, deps.split(",")):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for n in names:
        visit(n)
    return order


def modules_dir() -> Path:
    """``cache/vm/modules``: every BASE/EXTRA module and dependency as ``<name>.ko``,
    plus ``order``: the load order of all of them (readable from the guest over 9p)."""
    out = CACHE / "modules"
    order_file = out / "order"
    wanted = "\n".join((*BASE_MODULES, *EXTRA_MODULES)) + "\n"
    stamp = out / "wanted"
    if order_file.exists() and stamp.exists() and stamp.read_text() == wanted:
        return out
    index = _module_index()
    order = resolve_modules((*BASE_MODULES, *EXTRA_MODULES))
    tmp = CACHE / "modules.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in order:
        shutil.copyfile(index[name], tmp / f"{name}.ko")
    (tmp / "order").write_text("\n".join(order) + "\n")
    (tmp / "wanted").write_text(wanted)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def guest_modprobe(*names: str) -> str:
    """A shell snippet that loads ``names`` (and dependencies) in the guest, skipping
    modules already loaded.  Exits the guest script with status 97 if one fails."""
    prepare()  # builds modules_dir() under the lock
    mdir = modules_dir()
    lines = []
    for name in resolve_modules(names):
        lines.append(
            f"[ -d /sys/module/{name} ] || busybox insmod {mdir}/{name}.ko "
            f"|| {{ echo 'insmod {name} failed' >&2; exit 97; }}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- initramfs


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    """One ``newc`` cpio record (header, NUL-terminated name, data; 4-byte aligned)."""
    namez = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
    header = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    rec = header + namez
    rec += b"\0" * (-len(rec) % 4)
    rec += data
    rec += b"\0" * (-len(rec) % 4)
    return rec


def build_initramfs(busybox: Path = Path("/bin/busybox")) -> bytes:
    """The initramfs: busybox-static, /init, /dev/console, base modules in /lib/mod."""
    if not busybox.exists():
        raise GuestError(f"{busybox} is missing: apt-get install busybox-static")
    mdir = modules_dir()
    base = resolve_modules(BASE_MODULES)
    entries: list[bytes] = []
    ino = 1

    def add(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal ino
        entries.append(_cpio_entry(name, mode, data, rdev, ino))
        ino += 1

    for d in ("bin", "dev", "proc", "sys", "lib", "lib/mod", "lower", "upper", "newroot"):
        add(d, 0o040755)
    add("dev/console", 0o020600, rdev=(5, 1))
    add("bin/busybox", 0o100755, busybox.read_bytes())
    add("bin/sh", 0o120777, b"busybox")
    init = INIT_SCRIPT.read_text().replace(
        "mods=\"\"", f"mods=\"{','.join(base)}\"", 1
    )
    add("init", 0o100755, init.encode())
    for name in base:
        add(f"lib/mod/{name}.ko", 0o100644, (mdir / f"{name}.ko").read_bytes())
    entries.append(_cpio_entry("TRAILER!!!", 0))
    return b"".join(entries)


def initramfs_path() -> Path:
    """The cached initramfs, rebuilt when init.sh changes."""
    out = CACHE / "initramfs.cpio"
    if out.exists() and out.stat().st_mtime >= INIT_SCRIPT.stat().st_mtime:
        return out
    data = build_initramfs()
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def prepare() -> tuple[Path, Path]:
    """Build (once) and return ``(vmlinux, initramfs)``.  Serialised across processes
    (an flock on ``cache/vm/.lock``): parallel test runs build once and never see a
    half-built artifact."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return vmlinux_path(), initramfs_path()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- guest run


@dataclass(frozen=True)
class Disk:
    """One scsi-hd on a controller.

    ``blkdebug``: path of a QEMU blkdebug config file (injects I/O errors, reported as
    MEDIUM ERROR since the drive has ``rerror=report,werror=report``).
    """

    path: Path
    target: int = 0
    lun: int = 0
    readonly: bool = False
    logical_block_size: int = 512
    blkdebug: Path | None = None


@dataclass(frozen=True)
class Controller:
    """A virtio-scsi controller at ``0000:00:<addr>`` in the guest.

    ``modern``: ``virtio-scsi-pci-non-transitional`` with ``iommu_platform=on`` (what VFIO
    needs behind the vIOMMU); otherwise the transitional ``virtio-scsi-pci`` (QEMU 7.2
    refuses ``iommu_platform`` on it, so its DMA bypasses the vIOMMU).
    ``msix_vectors``: QEMU's ``vectors`` property (None: QEMU's default, MSI-X with
    num_queues + 3 vectors; 0: no MSI-X capability at all, INTx only).
    """

    disks: tuple[Disk, ...] = ()
    addr: str = "04.0"
    modern: bool = True
    msix_vectors: int | None = None

    @property
    def bdf(self) -> str:
        return f"0000:00:{self.addr}"


@dataclass
class GuestResult:
    rc: int
    stdout: str
    stderr: str
    console: str
    seconds: float
    qemu_rc: int | None = None
    qemu_stderr: str = ""


@dataclass
class _Argv:
    args: list[str] = field(default_factory=list)

    def add(self, *a: str) -> None:
        self.args.extend(a)


def qemu_available() -> str | None:
    """Path of qemu-system-x86_64, or None."""
    return shutil.which(QEMU)


def _drive_args(argv: _Argv, ctl_id: str, n: int, disk: Disk) -> None:
    drive_id = f"{ctl_id}d{n}"
    if disk.blkdebug is not None:
        file_spec = f"blkdebug:{disk.blkdebug}:{disk.path}"
    else:
        file_spec = str(disk.path)
    opts = [
        f"file={file_spec}",
        "if=none",
        f"id={drive_id}",
        "format=raw",
        "cache=writeback",
        "rerror=report",
        "werror=report",
    ]
    if disk.blkdebug is None:
        opts.append("file.locking=off")  # the same image may sit on two controllers
    if disk.readonly:
        opts.append("readonly=on")
    argv.add("-drive", ",".join(opts))
    dev = [
        "scsi-hd",
        f"drive={drive_id}",
        f"bus={ctl_id}.0",
        "channel=0",
        f"scsi-id={disk.target}",
        f"lun={disk.lun}",
    ]
    if disk.logical_block_size != 512:
        dev += [f"logical_block_size={disk.logical_block_size}", f"physical_block_size={disk.logical_block_size}"]
    argv.add("-device", ",".join(dev))


def guest_env_script(cmd: str) -> str:
    """The script the guest runs: environment for the repository, then ``cmd``."""
    pythonpath = f"{REPO}:{VENV_SITE}"
    return (
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        f"export PYTHONPATH={shlex.quote(pythonpath)}\n"
        "export PYTHONDONTWRITEBYTECODE=1 HOME=/root LANG=C.UTF-8\n"
        f"export AMIGAFUSE_GUEST=1 AMIGAFUSE_GUEST_PYTHON={GUEST_PYTHON}\n"
        f"cd {shlex.quote(str(REPO))}\n"
        f"{cmd}\n"
    )


def run_in_guest(
    cmd: str,
    *,
    images: Sequence[Path] = (),
    controllers: Sequence[Controller] = (),
    memory_mb: int = 768,
    timeout: float = 300.0,
    extra_qemu_args: Sequence[str] = (),
) -> GuestResult:
    """Boot the guest, run the shell command ``cmd`` (as root, in the repository
    directory, ``/usr/bin/python3`` with the repo importable) and return its exit status
    and output.

    ``images`` is a shortcut for one modern controller at 00:04.0 holding them as
    targets 0, 1, ...; ``controllers`` gives full control.  Raises GuestError when QEMU
    cannot start or the guest never reports a status within ``timeout`` seconds (QEMU
    is killed; ``console`` in the message tail helps).  The command's own failure is
    ``rc != 0``, not an exception.
    """
    if not qemu_available():
        raise GuestError(f"{QEMU} not found (apt-get install qemu-system-x86)")
    if images and controllers:
        raise ValueError("give images or controllers, not both")
    if images:
        controllers = (Controller(disks=tuple(Disk(Path(p), target=i) for i, p in enumerate(images))),)
    vmlinux, initrd = prepare()
    runs = CACHE / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    try:
        script = workdir / "cmd.sh"
        script.write_text(guest_env_script(cmd))
        out = {name: workdir / name for name in ("stdout", "stderr", "status", "console")}
        for p in out.values():
            p.write_bytes(b"")
        append = " ".join(
            [
                "console=ttyS0",
                "quiet",
                "loglevel=4",
                "panic=-1",
                "intel_iommu=on",
                "mitigations=off",
                "tsc=reliable",
                "nokaslr",
                # The boot-time check that the timer IRQ arrives through the IO-APIC
                # waits a fixed number of loops: on a loaded host, TCG is too slow and
                # the kernel panics ("timer doesn't work through Interrupt-remapped
                # IO-APIC"). The timer works; skip the check.
                "no_timer_check",
                "rdinit=/init",
                f"amigafuse.cmd={script}",
            ]
        )
        argv = _Argv()
        argv.add(
            QEMU,
            "-M", "q35,kernel-irqchip=split",
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", "1",
            "-m", str(memory_mb),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-device", "intel-iommu,intremap=on,caching-mode=on",
            "-kernel", str(vmlinux),
            "-initrd", str(initrd),
            "-append", append,
            "-serial", f"file:{out['console']}",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,addr=02.0",
            "-device", "virtio-serial-pci,id=vser,addr=03.0",
        )
        for nr, name in enumerate(("stdout", "stderr", "status"), start=1):
            argv.add("-chardev", f"file,id=c{name},path={out[name]}")
            argv.add("-device", f"virtserialport,bus=vser.0,nr={nr},chardev=c{name},name={name}")
        for ci, ctl in enumerate(controllers):
            ctl_id = f"scsi{ci}"
            vectors = "" if ctl.msix_vectors is None else f",vectors={ctl.msix_vectors}"
            if ctl.modern:
                argv.add("-device", f"virtio-scsi-pci-non-transitional,id={ctl_id},addr={ctl.addr},iommu_platform=on{vectors}")
            else:
                argv.add("-device", f"virtio-scsi-pci,id={ctl_id},addr={ctl.addr}{vectors}")
            for n, disk in enumerate(ctl.disks):
                _drive_args(argv, ctl_id, n, disk)
        argv.add(*extra_qemu_args)
        start = time.monotonic()
        proc = subprocess.Popen(
            argv.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
            console = out["console"].read_text(errors="replace")
            raise GuestError(
                f"guest did not finish within {timeout:.0f} s; console tail:\n{console[-3000:]}",
                qemu_pid=proc.pid,
            ) from None
        seconds = time.monotonic() - start
        status = out["status"].read_text().strip()
        console = out["console"].read_text(errors="replace")
        if not status:
            raise GuestError(
                f"guest exited (QEMU status {proc.returncode}) without reporting a status; "
                f"QEMU stderr: {err.decode(errors='replace').strip()[-2000:]}\n"
                f"console tail:\n{console[-3000:]}"
            )
        return GuestResult(
            rc=int(status.splitlines()[-1]),
            stdout=out["stdout"].read_text(errors="replace"),
            stderr=out["stderr"].read_text(errors="replace"),
            console=console,
            seconds=seconds,
            qemu_rc=proc.returncode,
            qemu_stderr=err.decode(errors="replace"),
        )
    finally:
        if not os.environ.get("AMIGAFUSE_VM_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a shell command in the amigafuse VFIO test guest (Linux 6.1 under TCG)."
    )
    parser.add_argument("--image", action="append", default=[], type=Path, help="disk image for the modern controller at 00:04.0 (repeat for targets 1, 2...)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--console", action="store_true", help="print the guest's serial console afterwards")
    parser.add_argument("command", nargs="+", help="the shell command (after --)")
    args = parser.parse_args(argv)
    try:
        res = run_in_guest(" ".join(args.command), images=args.image, timeout=args.timeout)
    except GuestError as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return 125
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if args.console:
        sys.stderr.write(res.console)
    print(f"guest: exit {res.rc} after {res.seconds:.1f} s", file=sys.stderr)
    return res.rc


if __name__ == "__main__":
    sys.exit(main())
