"""Mounter rules: deterministic names, duplicates, withdrawal, mountability."""

from __future__ import annotations

from amigafuse.rdb.mounter import Mounter, judge, sanitize_name
from amigafuse.rdb.scan import DiskLayout, Partition, bare_partition

DOS3 = 0x444F5303
PFS3 = 0x50465303


def engines(dostype: int) -> str | None:
    return "ffs" if dostype >> 8 == 0x444F53 else None


def part(index: int, name: str, *, issues: tuple[str, ...] = (), no_automount: bool = False) -> Partition:
    base = bare_partition(512, 2048, DOS3)
    from dataclasses import replace

    return replace(base, index=index, drive_name=name, issues=issues, no_automount=no_automount)


def layout(*parts: Partition) -> DiskLayout:
    return DiskLayout(kind="rdb", block_size=512, block_count=4096, partitions=parts)


def test_duplicate_names_across_units_get_suffixes_in_unit_order() -> None:
    m = Mounter(engines)
    a = m.add_unit("disk0", layout(part(0, "DH0"), part(1, "dh1")), {0: DOS3, 1: DOS3})
    b = m.add_unit("disk1", layout(part(0, "DH0"), part(1, "DH1"), part(2, "DH0")), {0: DOS3, 1: DOS3, 2: DOS3})
    assert [x.dos_name for x in a] == ["DH0", "dh1"]
    assert [x.dos_name for x in b] == ["DH0.1", "DH1.1", "DH0.2"]
    # Withdrawing disk0 frees DH0 for the next unit; disk1 keeps its names.
    w = m.remove_unit("disk0")
    assert [x.dos_name for x in w] == ["DH0", "dh1"]
    c = m.add_unit("disk2", layout(part(0, "DH0")), {0: DOS3})
    assert [x.dos_name for x in c] == ["DH0"]
    assert [x.dos_name for x in m.announcements()] == ["DH0.1", "DH1.1", "DH0.2", "DH0"]
    assert m.remove_unit("nope") == []


def test_same_disks_same_order_same_names() -> None:
    def run() -> list[str]:
        m = Mounter(engines)
        names = []
        for u in ("a", "b", "c"):
            names += [x.dos_name for x in m.add_unit(u, layout(part(0, "DH0"), part(1, "WORK")), {0: DOS3, 1: DOS3})]
        return names

    assert run() == run() == ["DH0", "WORK", "DH0.1", "WORK.1", "DH0.2", "WORK.2"]


def test_sanitize() -> None:
    assert sanitize_name("a/b:c\x00", 0) == "a_b_c_"
    assert sanitize_name("", 3) == "PART3"
    assert sanitize_name("..", 1) == "PART1"
    assert sanitize_name("OFS INTL", 1) == "OFS INTL"


def test_mountability_rules() -> None:
    m = Mounter(engines)
    anns = m.add_unit(
        "u",
        layout(
            part(0, "OK"),
            part(1, "PFS"),
            part(2, "EMPTY"),
            part(3, "BAD", issues=("overlaps 'OK'",)),
            part(4, "HIDDEN", no_automount=True),
            part(5, "UNREAD"),
        ),
        {0: 0x444F5301, 1: PFS3, 2: 0, 3: DOS3, 4: DOS3, 5: None},
    )
    ok, pfs, empty, bad, hidden, unread = anns
    assert ok.mountable and ok.automount and ok.engine == "ffs"
    # The volume's own type decides and goes into the geometry; the PART's is kept.
    assert ok.volume_dostype == 0x444F5301 and ok.part_dostype == DOS3
    assert ok.geometry.dostype == 0x444F5301
    assert not pfs.mountable and pfs.reason is not None and "no engine for PFS\\3" in pfs.reason
    assert not empty.mountable and empty.reason is not None and "no filesystem" in empty.reason
    assert not bad.mountable and bad.reason == "overlaps 'OK'"
    assert hidden.mountable and not hidden.automount and "no-automount" in (hidden.reason or "")
    assert not unread.mountable
    assert judge(part(0, "X"), DOS3, engines)[2] is True
