"""DosType values (the four-byte filesystem identifiers) and their common names."""

from __future__ import annotations

import struct


def dostype_from_str(text: str) -> int:
    """``"DOS\\3"`` or ``"0x444f5303"`` or ``"DOS3"`` -> int."""
    t = text.strip()
    if t.lower().startswith("0x"):
        return int(t, 16)
    if "\\" in t:
        head, _, tail = t.partition("\\")
        if len(head) == 3 and tail.isdigit():
            return int.from_bytes(head.encode("latin-1") + bytes([int(tail)]), "big")
    if len(t) == 4 and t[3].isdigit() and t[:3].isalpha():
        return int.from_bytes(t[:3].encode("latin-1") + bytes([int(t[3])]), "big")
    raise ValueError(f"not a DosType: {text!r}")


def dostype_to_str(dostype: int) -> str:
    """0x444f5303 -> ``DOS\\3``; printable prefix, then the last byte as a number."""
    raw = struct.pack(">I", dostype & 0xFFFFFFFF)
    head = raw[:3]
    if all(0x20 < b < 0x7F for b in head):
        return head.decode("ascii") + "\\" + str(raw[3])
    return f"0x{dostype:08x}"


DOS0 = 0x444F5300
DOS1 = 0x444F5301
DOS2 = 0x444F5302
DOS3 = 0x444F5303
DOS4 = 0x444F5304
DOS5 = 0x444F5305
DOS6 = 0x444F5306
DOS7 = 0x444F5307
SFS0 = 0x53465300
SFS2 = 0x53465302
PFS1 = 0x50465301
PFS2 = 0x50465302
PFS3 = 0x50465303
PDS3 = 0x50445303

COMMON_NAMES: dict[int, str] = {
    DOS0: "OFS",
    DOS1: "FFS",
    DOS2: "OFS+INTL",
    DOS3: "FFS+INTL",
    DOS4: "OFS+DC",
    DOS5: "FFS+DC",
    DOS6: "OFS+LNFS",
    DOS7: "FFS+LNFS",
    SFS0: "SFS",
    SFS2: "SFS2",
    PFS1: "PFS",
    PFS2: "PFS2",
    PFS3: "PFS3",
    PDS3: "PFS3 (direct SCSI)",
    0x4D534400: "MS-DOS (CrossDOS)",
    0x4E474653: "NGFS",
    0x4A584604: "JXFS",
    0x46415401: "FAT32",
    0x4C4E5800: "Linux native",
    0x53574150: "swap",
    0x42414400: "unused (BAD\\0)",
}

# Names users may type for ``--type``/``mkdisk`` (case-insensitive).
TYPE_ALIASES: dict[str, int] = {
    "OFS": DOS0,
    "FFS": DOS1,
    "OFS+INTL": DOS2,
    "FFS+INTL": DOS3,
    "OFS+DC": DOS4,
    "FFS+DC": DOS5,
    "OFS+LNFS": DOS6,
    "FFS+LNFS": DOS7,
    "SFS": SFS0,
    "SFS0": SFS0,
    "SFS2": SFS2,
}


def common_name(dostype: int) -> str:
    return COMMON_NAMES.get(dostype, "unknown")


def parse_type(text: str) -> int:
    """A user's filesystem type: alias (``FFS+INTL``), ``DOS3``, ``DOS\\3`` or hex."""
    alias = TYPE_ALIASES.get(text.strip().upper())
    if alias is not None:
        return alias
    return dostype_from_str(text)
