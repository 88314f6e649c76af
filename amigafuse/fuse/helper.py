"""Entry points for mount(8): ``mount.amigafuse``/``mount.fuse.amigafuse`` and the
mount.fuse3 calling convention of ``amigafuse``.

mount(8) runs ``/sbin/mount.fuse.amigafuse SOURCE DIR [-sfnv] [-o OPTIONS]`` (or, without
it, mount.fuse3, which runs ``amigafuse SOURCE DIR -o OPTIONS`` with PATH stripped).
Both end here and become ``amigafuse mount -o OPTIONS SOURCE DIR``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from amigafuse import cli


def translate(argv: Sequence[str]) -> list[str]:
    """mount(8)-style arguments -> ``amigafuse mount`` arguments.

    ``-n``, ``-s``, ``-v`` (no mtab, sloppy, verbose) are accepted and ignored; ``-o`` may
    come anywhere; ``-f``/``-d`` are kept.  ``-N NS`` (namespace) is refused: not supported.
    """
    out_opts: list[str] = []
    flags: list[str] = []
    positionals: list[str] = []
    i = 0
    args = list(argv)
    while i < len(args):
        a = args[i]
        if a == "-o" and i + 1 < len(args):
            out_opts += ["-o", args[i + 1]]
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            out_opts += ["-o", a[2:]]
        elif a in ("-f", "-d"):
            flags.append(a)
        elif a.startswith("-") and len(a) > 1 and set(a[1:]) <= set("nsvfd"):
            flags += [f"-{c}" for c in a[1:] if c in "fd"]
        elif a == "--":
            positionals += args[i + 1 :]
            break
        else:
            positionals.append(a)
        i += 1
    return ["mount", *flags, *out_opts, "--", *positionals]


def main(argv: Sequence[str] | None = None) -> int:
    """``mount.amigafuse SOURCE DIR [-o OPTIONS]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: mount.amigafuse SOURCE MOUNTPOINT [-o OPTIONS]\n"
              "Called by mount(8) for type fuse.amigafuse / amigafuse; see mount.amigafuse(8).")
        return 0 if args else 2
    return cli.main(translate(args))


def amigafuse_main(argv: Sequence[str] | None = None) -> int:
    """``amigafuse`` as installed by install-helper: a first argument that is not a
    command or an option (mount.fuse3's ``amigafuse SOURCE DIR -o OPTS``) means mount."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {c.replace("_", "-") for c in cli.COMMANDS} | set(cli.COMMANDS)
    if args and not args[0].startswith("-") and args[0] not in commands:
        return cli.main(translate(args))
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(amigafuse_main())
