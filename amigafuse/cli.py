"""The ``amigafuse`` command: the composition root that wires driver -> rdb -> fs -> fuse.

Each subcommand lives in ``amigafuse/commands/<name>.py`` and is listed in ``COMMANDS``.
Errors from the project's hierarchy end as one line on stderr and an exit status: 2 for
usage errors, 1 for everything else; tracebacks only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from amigafuse import __version__
from amigafuse.errors import AmigaFuseError, UsageError

# Subcommand modules under amigafuse.commands, in the order --help lists them.
COMMANDS: tuple[str, ...] = ("info", "list", "mkdisk", "format", "check", "mount", "umount", "install_helper", "vfio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amigafuse",
        description=(
            "Mount and manage AmigaOS hard disks (RDB; FFS DOS\\0-\\7, SFS\\0, SFS\\2) on Linux "
            "through amigafuse's own userspace VirtIO SCSI driver."
        ),
        epilog="Run 'amigafuse COMMAND --help' for a command's options; see amigafuse(1).",
    )
    parser.add_argument("--version", action="version", version=f"amigafuse {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"amigafuse.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        result: int = args.handler(args)
        return result
    except UsageError as exc:
        if args.debug:
            raise
        print(f"amigafuse {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except AmigaFuseError as exc:
        if args.debug:
            raise
        print(f"amigafuse {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into head & co: not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
