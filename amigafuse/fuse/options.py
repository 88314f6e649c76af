"""``-o`` mount options: parsing and validation (pure).

Options that mount(8) and mount.fuse3 hand us but that mean nothing here are ignored
(``defaults``, ``auto``, ``noauto``, ``nofail``, ``user``, ``users``, ``_netdev``,
``x-*``, ``comment=*``).  ``uid=``, ``gid=`` and ``umask=`` are applied by amigafuse
itself (libfuse rejects them).  Kernel mount flags libfuse knows are passed through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from amigafuse.errors import UsageError

IGNORED = frozenset({"defaults", "auto", "noauto", "nofail", "user", "users", "_netdev", "owner", "group"})
# Flags passed to libfuse unchanged (mount flags the kernel understands).
PASSED = frozenset({"nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime",
                    "relatime", "norelatime", "strictatime", "nodiratime", "diratime",
                    "sync", "async", "dirsync"})
BACKENDS = ("qemu", "file")
TRANSPORTS = ("auto", "legacy", "modern")

KNOWN_HELP = (
    "ro, rw, uid=N, gid=N, umask=OCTAL, allow_other, allow_root, default_permissions, "
    "partition=NAME, backend=qemu|file, transport=auto|legacy|modern, fsname=NAME, "
    "auto_unmount, noauto_unmount, read_ahead_kb=N, max_background=N, commit=SECONDS, check, nocheck"
)


@dataclass
class MountOptions:
    read_only: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int = 0o022
    allow_other: bool = False
    allow_root: bool = False
    default_permissions: bool = False
    partition: str | None = None
    backend: str = "qemu"
    transport: str | None = None
    fsname: str | None = None
    auto_unmount: bool = True
    # 4 MiB: the kernel keeps four 1 MiB reads in flight on a sequential read, so the
    # device works on the next ones while we answer one (docs/performance.md)
    read_ahead_kb: int = 4096
    # FUSE requests the kernel keeps queued in the background (readahead among them);
    # the kernel's 12 (congestion at 9) stalls a 4 MiB readahead (docs/performance.md)
    max_background: int = 64
    # Seconds between write-backs of changes (0: only on fsync/umount), like ext4's commit=.
    commit_s: int = 5
    # Walk the whole filesystem (as ``amigafuse check``) before mounting a partition
    # read-write; errors make it mount read-only.
    check: bool = False
    passthrough: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def fuse_options(self, source: str) -> set[str]:
        """The option set for ``pyfuse3.init``."""
        opts = {"fsname=" + (self.fsname or source).replace(",", "_"), "subtype=amigafuse"}
        if self.read_only:
            opts.add("ro")
        if self.allow_other:
            opts.add("allow_other")
        if self.allow_root:
            opts.add("allow_root")
        if self.default_permissions or self.allow_other:
            # Shared with other users: let the kernel enforce the modes shown.
            opts.add("default_permissions")
        if self.auto_unmount:
            opts.add("auto_unmount")
        opts.update(self.passthrough)
        return opts


def _int(name: str, value: str, base: int = 10) -> int:
    try:
        n = int(value, base)
    except ValueError:
        raise UsageError(f"option {name}={value!r}: expected a number") from None
    if n < 0:
        raise UsageError(f"option {name}={value!r}: must not be negative")
    return n


def parse_options(texts: list[str], base: MountOptions | None = None) -> MountOptions:
    """Parse ``-o`` arguments (each a comma-separated list) into MountOptions.

    Later options win (``rw`` after ``ro``).  Raises UsageError naming an unknown option.
    """
    opts = base if base is not None else MountOptions()
    for text in texts:
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            if key in IGNORED or key.startswith("x-") or key == "comment":
                opts.ignored.append(item)
            elif key == "ro" and not eq:
                opts.read_only = True
            elif key == "rw" and not eq:
                opts.read_only = False
            elif key == "uid" and eq:
                opts.uid = _int(key, value)
            elif key == "gid" and eq:
                opts.gid = _int(key, value)
            elif key == "umask" and eq:
                opts.umask = _int(key, value, 8) & 0o777
            elif key == "allow_other" and not eq:
                opts.allow_other = True
            elif key == "allow_root" and not eq:
                opts.allow_root = True
            elif key == "default_permissions" and not eq:
                opts.default_permissions = True
            elif key == "partition" and eq:
                if not value:
                    raise UsageError("option partition= needs a DOS device name, e.g. partition=DH0")
                opts.partition = value.rstrip(":")
            elif key == "backend" and eq:
                if value not in BACKENDS:
                    raise UsageError(f"option backend={value!r}: use one of {', '.join(BACKENDS)}")
                opts.backend = value
            elif key == "transport" and eq:
                if value not in TRANSPORTS:
                    raise UsageError(f"option transport={value!r}: use one of {', '.join(TRANSPORTS)}")
                opts.transport = value
            elif key == "fsname" and eq:
                opts.fsname = value
            elif key == "auto_unmount" and not eq:
                opts.auto_unmount = True
            elif key == "noauto_unmount" and not eq:
                opts.auto_unmount = False
            elif key == "read_ahead_kb" and eq:
                opts.read_ahead_kb = _int(key, value)
            elif key == "max_background" and eq:
                opts.max_background = _int(key, value)
                if not 1 <= opts.max_background <= 65535:
                    raise UsageError(f"option max_background={value}: use 1 to 65535")
            elif key == "check" and not eq:
                opts.check = True
            elif key == "nocheck" and not eq:
                opts.check = False
            elif key == "commit" and eq:
                opts.commit_s = _int(key, value)
            elif key in PASSED and not eq:
                opts.passthrough.append(key)
            else:
                raise UsageError(f"unknown mount option {item!r}; known options: {KNOWN_HELP}")
    if opts.allow_other and opts.allow_root:
        raise UsageError("options allow_other and allow_root exclude each other")
    return opts
