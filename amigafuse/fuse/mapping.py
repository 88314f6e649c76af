"""Pure translations between Amiga and Unix conventions (no I/O, no pyfuse3).

Protection bits <-> Unix modes (the table is in docs/mounting.md):

=========================  ==========================  =======================
Amiga bit                  Unix mode bit               notes
=========================  ==========================  =======================
r (FIBF_READ, inverted)    0400 (owner read)           bit clear = readable
w (FIBF_WRITE, inverted)   0200 (owner write)          bit clear = writable
e (FIBF_EXECUTE, inverted) 0100 (owner execute)        directories: always x
d (FIBF_DELETE, inverted)  --                          chmod keeps it
GRP_READ/WRITE/EXECUTE     0040/0020/0010              set bit = allowed
OTR_READ/WRITE/EXECUTE     0004/0002/0001              set bit = allowed
h, s, p, a                 --                          chmod keeps them
=========================  ==========================  =======================

A directory is shown searchable (x) wherever it is readable, as AmigaOS has no
"search" right.  The mount's ``umask=`` is applied last.

Names: Amiga names are Latin-1 bytes; the FUSE side speaks UTF-8.  A name from Linux
that is not valid UTF-8 or has characters outside Latin-1 is refused with EINVAL.

Soft links: Amiga paths are translated to Unix paths relative to the link's directory
(see :func:`amiga_link_to_unix` and :func:`unix_link_to_amiga`).
"""

from __future__ import annotations

import re
import stat as _stat
from collections.abc import Sequence

from amigafuse.errors import InvalidArgument, InvalidName, NameTooLong
from amigafuse.fs.api import (
    FIBF_ARCHIVE,
    FIBF_DELETE,
    FIBF_EXECUTE,
    FIBF_GRP_EXECUTE,
    FIBF_GRP_READ,
    FIBF_GRP_WRITE,
    FIBF_HOLD,
    FIBF_OTR_EXECUTE,
    FIBF_OTR_READ,
    FIBF_OTR_WRITE,
    FIBF_PURE,
    FIBF_READ,
    FIBF_SCRIPT,
    FIBF_WRITE,
    Kind,
)

# Unix permission bit -> (Amiga bit, inverted?)
_PERMISSION_MAP: tuple[tuple[int, int, bool], ...] = (
    (0o400, FIBF_READ, True),
    (0o200, FIBF_WRITE, True),
    (0o100, FIBF_EXECUTE, True),
    (0o040, FIBF_GRP_READ, False),
    (0o020, FIBF_GRP_WRITE, False),
    (0o010, FIBF_GRP_EXECUTE, False),
    (0o004, FIBF_OTR_READ, False),
    (0o002, FIBF_OTR_WRITE, False),
    (0o001, FIBF_OTR_EXECUTE, False),
)

_KIND_TYPE = {Kind.FILE: _stat.S_IFREG, Kind.DIR: _stat.S_IFDIR, Kind.SOFTLINK: _stat.S_IFLNK}


def protection_to_mode(protection: int, kind: Kind, umask: int = 0) -> int:
    """The st_mode (type and permission bits) for an object with Amiga ``protection``."""
    if kind is Kind.SOFTLINK:
        return _stat.S_IFLNK | 0o777
    perm = 0
    for unix_bit, amiga_bit, inverted in _PERMISSION_MAP:
        if bool(protection & amiga_bit) != inverted:
            perm |= unix_bit
    if kind is Kind.DIR:
        # No search right on AmigaOS: a readable directory is searchable.
        for read_bit, exec_bit in ((0o400, 0o100), (0o040, 0o010), (0o004, 0o001)):
            if perm & read_bit:
                perm |= exec_bit
    return _KIND_TYPE[kind] | (perm & ~umask & 0o777)


def mode_to_protection(mode: int, old_protection: int = 0) -> int:
    """The protection long after ``chmod(mode)`` of an object that had ``old_protection``.

    Changes r, w, e and the group/other bits; keeps d, h, s, p, a and unknown bits.
    """
    protection = old_protection & 0xFFFFFFFF
    for unix_bit, amiga_bit, inverted in _PERMISSION_MAP:
        allowed = bool(mode & unix_bit)
        if allowed != inverted:
            protection |= amiga_bit
        else:
            protection &= ~amiga_bit
    return protection


# Letters as AmigaOS ``List`` prints them: h s p a are shown when set, r w e d when allowed
# (their bit clear).
_LETTERS: tuple[tuple[str, int, bool], ...] = (
    ("h", FIBF_HOLD, False),
    ("s", FIBF_SCRIPT, False),
    ("p", FIBF_PURE, False),
    ("a", FIBF_ARCHIVE, False),
    ("r", FIBF_READ, True),
    ("w", FIBF_WRITE, True),
    ("e", FIBF_EXECUTE, True),
    ("d", FIBF_DELETE, True),
)


def protection_to_string(protection: int) -> str:
    """``"----rwed"`` style, as AmigaOS ``List`` shows the low eight bits."""
    out = []
    for letter, bit, inverted in _LETTERS:
        shown = bool(protection & bit) != inverted
        out.append(letter if shown else "-")
    return "".join(out)


def string_to_protection(text: str, old_protection: int = 0) -> int:
    """Parse a protection string for the ``user.amiga.protection`` xattr.

    ``"hsparwed"`` letters (any order, ``-`` ignored) set the low eight bits and keep the
    group/other bits of ``old_protection``; ``"0x..."`` sets the whole long.
    Raises InvalidArgument for anything else.
    """
    t = text.strip()
    if t.lower().startswith("0x"):
        try:
            value = int(t, 16)
        except ValueError:
            raise InvalidArgument(f"bad protection value {text!r}: expected hex like 0x0000000f") from None
        if not 0 <= value <= 0xFFFFFFFF:
            raise InvalidArgument(f"protection value {text!r} does not fit in 32 bits")
        return value
    letters = t.lower().replace("-", "")
    known = {letter for letter, _, _ in _LETTERS}
    bad = sorted(set(letters) - known)
    if bad or len(set(letters)) != len(letters):
        raise InvalidArgument(
            f"bad protection string {text!r}: use the letters hsparwed (each once) or 0xNNNNNNNN"
        )
    protection = old_protection & ~0xFF & 0xFFFFFFFF
    for letter, bit, inverted in _LETTERS:
        present = letter in letters
        if present != inverted:
            protection |= bit
    return protection


# ------------------------------------------------------------------------- names


# what name_from_fuse refuses: control characters, ':' and '/', anything past Latin-1
_NAME_REFUSED = re.compile("[\x00-\x1f:/\u0100-\U0010ffff]")


def name_from_fuse(raw: bytes, max_length: int) -> str:
    """A name from the kernel (UTF-8 bytes) as the Amiga (Latin-1) string.

    Raises InvalidName (EINVAL) if it is not UTF-8, has characters outside Latin-1, ``:``
    or control characters; NameTooLong past ``max_length`` Latin-1 characters.
    """
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidName(f"name {raw!r} is not UTF-8; Amiga names are Latin-1 text") from None
    if not name or name in (".", ".."):
        raise InvalidName(f"name {name!r} is not allowed")
    if _NAME_REFUSED.search(name) is not None:  # one scan in C (this runs for every name)
        if any(ord(c) > 0xFF for c in name):
            raise InvalidName(f"name {name!r} has characters an Amiga name cannot hold (Latin-1 only)")
        raise InvalidName(f"name {name!r} contains ':', '/' or a control character")
    if len(name) > max_length:
        raise NameTooLong(f"name {name!r} is longer than {max_length} characters")
    return name


def name_to_fuse(name: str) -> bytes | None:
    """An Amiga name as UTF-8 bytes for the kernel; None when Linux cannot show it
    (``/``, NUL, empty, ``.``/``..`` — only on damaged or hostile disks)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return None
    return name.encode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------- soft links


def amiga_link_to_unix(
    target: str,
    *,
    depth: int,
    volume_names: Sequence[str],
    other_volumes: dict[str, str] | None = None,
) -> str:
    """Translate a soft link's Amiga target into a Unix path relative to the link's directory.

    ``depth`` is the number of directories between the volume root and the link's
    directory (0 when the link is in the root).  ``volume_names`` are the names that mean
    this volume (label, device name; compared case-insensitively).  ``other_volumes``
    maps other names (upper-cased) to a Unix path of that volume relative to this volume's
    root (``"../DH1"`` in a whole-disk mount).

    * ``a/b`` stays ``a/b``; a leading ``/`` (or an empty component) means the parent:
      ``/x`` -> ``../x``, ``a//b`` -> ``a/../b``.
    * ``:x`` and ``VOL:x`` (VOL naming this volume) -> the path from the link to ``x`` in
      the volume root (``../`` * depth + ``x``).
    * ``OTHER:x`` of a volume in ``other_volumes`` -> through that volume's directory.
    * any other ``NAME:x`` is left as it is (a dangling link, as on an Amiga without NAME).
    """
    device, colon, rest = target.partition(":")
    up = "../" * depth
    if colon:
        key = device.upper()
        if device == "" or key in (n.upper() for n in volume_names):
            prefix = up
        elif other_volumes and key in other_volumes:
            prefix = up + other_volumes[key].rstrip("/") + "/"
        else:
            return target
        tail = _amiga_relative(rest)
        result = (prefix + tail).rstrip("/")
        return result or "."
    return _amiga_relative(target) or "."


def _amiga_relative(path: str) -> str:
    """Amiga relative path -> Unix: a ``/`` right after a name separates, any other ``/``
    (leading, or following another ``/``) means the parent directory."""
    comps: list[str] = []
    name = ""
    after_name = False
    for ch in path:
        if ch == "/":
            if name:
                comps.append(name)
                name = ""
                after_name = True
            if after_name:
                after_name = False
            else:
                comps.append("..")
        else:
            name += ch
    if name:
        comps.append(name)
    return "/".join(comps)


def unix_link_to_amiga(target: str, *, volume_label: str, mount_prefixes: Sequence[str] = ()) -> str:
    """Translate a Unix soft-link target to an Amiga one.

    Relative paths: ``..`` components become empty ones (``../x`` -> ``/x``), ``.`` is
    dropped.  Absolute paths under one of ``mount_prefixes`` (the volume root as Linux
    sees it) become ``LABEL:rest``.  Other absolute paths cannot be expressed on the Amiga
    volume: InvalidArgument.
    """
    if not target:
        raise InvalidArgument("empty soft link target")
    if target.startswith("/"):
        for prefix in mount_prefixes:
            p = prefix.rstrip("/")
            if target == p or target.startswith(p + "/"):
                rest = target[len(p) :].strip("/")
                return f"{volume_label}:{_unix_relative(rest)}"
        raise InvalidArgument(
            f"soft link target {target!r} is outside the Amiga volume; use a relative path"
        )
    return _unix_relative(target)


def _unix_relative(path: str) -> str:
    out = ""
    prev: str | None = None  # None, "name" or "parent"
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            out += "//" if prev == "name" else "/"
            prev = "parent"
        else:
            out += ("/" + part) if prev == "name" else part
            prev = "name"
    return out


def cross_volume_link(target: str, *, depth: int, volume_dirs: Sequence[str]) -> str | None:
    """In a whole-disk mount, a relative Unix link that leaves its volume through the top
    directory into another partition's directory (``../DH1/x`` from a volume root) becomes
    ``DH1:x``.  ``depth`` is the link directory's depth below its volume root.  Returns None
    when the target stays inside the volume or goes anywhere else."""
    if target.startswith("/"):
        return None
    level = depth
    parts = [p for p in target.split("/") if p not in ("", ".")]
    for index, part in enumerate(parts):
        if part == "..":
            level -= 1
            if level < 0:
                rest = parts[index + 1 :]
                if not rest:
                    return None
                wanted = rest[0].upper()
                for name in volume_dirs:
                    if name.upper() == wanted:
                        return f"{name}:{_unix_relative('/'.join(rest[1:]))}"
                return None
        else:
            level += 1
    return None
