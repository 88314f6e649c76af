"""``amigafuse install-helper``: make mount(8), fstab and man(1) find this installation."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from amigafuse.errors import NotAvailable

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MARK = "# installed by amigafuse install-helper"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "install-helper",
        help="install mount.amigafuse, an amigafuse wrapper and the man pages (for fstab)",
        description=(
            "Write small wrapper scripts that run this installation's Python: "
            "SBIN/mount.fuse.amigafuse and SBIN/mount.amigafuse (what mount(8) runs for "
            "'-t fuse.amigafuse' and '-t amigafuse', and for fstab lines of those types), "
            "PREFIX/bin/amigafuse (which also understands mount.fuse3's 'amigafuse SOURCE "
            "DIR -o OPTIONS'), and the man pages under PREFIX/share/man. Needs root."
        ),
    )
    p.add_argument("--prefix", default="/usr/local", help="where bin/ and share/man/ go (default /usr/local)")
    p.add_argument("--sbin", default="/sbin", help="where mount(8) looks for helpers (default /sbin)")
    p.add_argument("--uninstall", action="store_true", help="remove what install-helper wrote")
    p.add_argument("--dry-run", action="store_true", help="print what would be written")
    p.set_defaults(handler=run)


def _wrapper(module_call: str) -> str:
    py = shlex.quote(sys.executable)
    return (
        f"#!/bin/sh\n{MARK}\n"
        f"PATH={SAFE_PATH}${{PATH:+:$PATH}}\nexport PATH\n"
        f"exec {py} -c {shlex.quote(module_call)} \"$@\"\n"
    )


def planned(prefix: Path, sbin: Path) -> dict[Path, tuple[str, int]]:
    helper = "import sys; from amigafuse.fuse.helper import main; sys.exit(main())"
    front = "import sys; from amigafuse.fuse.helper import amigafuse_main; sys.exit(amigafuse_main())"
    files: dict[Path, tuple[str, int]] = {
        sbin / "mount.fuse.amigafuse": (_wrapper(helper), 0o755),
        sbin / "mount.amigafuse": (_wrapper(helper), 0o755),
        prefix / "bin" / "amigafuse": (_wrapper(front), 0o755),
    }
    man = Path(__file__).resolve().parent.parent.parent / "man"
    for page, section in (("amigafuse.1", "man1"), ("mount.amigafuse.8", "man8")):
        src = man / page
        if src.exists():
            files[prefix / "share" / "man" / section / page] = (src.read_text(), 0o644)
    return files


def run(args: argparse.Namespace) -> int:
    files = planned(Path(args.prefix), Path(args.sbin))
    if args.dry_run:
        for path in files:
            print(("remove " if args.uninstall else "write ") + str(path))
        return 0
    if os.geteuid() != 0:
        raise NotAvailable("install-helper writes to system directories: run it as root (sudo)")
    for path, (text, mode) in files.items():
        if args.uninstall:
            if path.exists() and (path.suffix in (".1", ".8") or MARK in path.read_text(errors="replace")):
                path.unlink()
                print(f"removed {path}")
            continue
        if path.exists() and path.suffix not in (".1", ".8") and MARK not in path.read_text(errors="replace"):
            raise NotAvailable(f"{path} exists and was not written by amigafuse; remove it first")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)
        print(f"wrote {path}")
    if not args.uninstall:
        print("mount -t fuse.amigafuse IMAGE DIR -o OPTIONS and fstab lines of type "
              "fuse.amigafuse now work; see 'man mount.amigafuse'")
    return 0
