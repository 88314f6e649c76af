"""``amigafuse info``: what this installation can do (engines, backends, tools found)."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from typing import Any

from amigafuse import __version__
from amigafuse.amiga.dostype import common_name, dostype_to_str
from amigafuse.fs import engines


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "info", help="show the filesystem engines and backends this installation has"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    print(f"amigafuse {__version__}")
    print("filesystem engines:")
    found = engines()
    if not found:
        print("  (none)")
    for engine in found:
        types = ", ".join(f"{dostype_to_str(t)} ({common_name(t)})" for t in sorted(engine.dostypes))
        print(f"  {engine.name}: {types}")
    qemu = shutil.which("qemu-system-x86_64")
    print(f"QEMU backend: {'qemu-system-x86_64 at ' + qemu if qemu else 'qemu-system-x86_64 not found (apt-get install qemu-system-x86)'}")
    has_fuse = importlib.util.find_spec("pyfuse3") is not None
    print(f"FUSE: {'pyfuse3 installed' if has_fuse else 'pyfuse3 not installed (pip install pyfuse3)'}")
    return 0
