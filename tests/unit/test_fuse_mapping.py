"""Pure translations of the FUSE layer: protection <-> mode, names, soft links, options, inodes."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.errors import InvalidArgument, InvalidName, NameTooLong, UsageError
from amigafuse.fs.api import (
    FIBF_ARCHIVE,
    FIBF_DELETE,
    FIBF_EXECUTE,
    FIBF_GRP_READ,
    FIBF_OTR_READ,
    FIBF_READ,
    FIBF_SCRIPT,
    FIBF_WRITE,
    Kind,
)
from amigafuse.fuse import mapping
from amigafuse.fuse.inodes import ROOT_INODE, InodeTable
from amigafuse.fuse.options import parse_options

# ------------------------------------------------------------------ protection


def test_default_protection_is_owner_rwx() -> None:
    assert mapping.protection_to_mode(0, Kind.FILE) == stat.S_IFREG | 0o700
    assert mapping.protection_to_mode(0, Kind.DIR) == stat.S_IFDIR | 0o700


def test_inverted_owner_bits_and_plain_group_other_bits() -> None:
    prot = FIBF_WRITE | FIBF_EXECUTE | FIBF_GRP_READ | FIBF_OTR_READ
    assert mapping.protection_to_mode(prot, Kind.FILE) == stat.S_IFREG | 0o444
    # a readable directory is searchable
    assert mapping.protection_to_mode(prot, Kind.DIR) == stat.S_IFDIR | 0o555
    assert mapping.protection_to_mode(FIBF_READ | FIBF_WRITE | FIBF_EXECUTE, Kind.FILE) == stat.S_IFREG


def test_umask_applies_and_links_are_0777() -> None:
    assert mapping.protection_to_mode(FIBF_GRP_READ, Kind.FILE, 0o077) == stat.S_IFREG | 0o700
    assert mapping.protection_to_mode(0xFF, Kind.SOFTLINK) == stat.S_IFLNK | 0o777


def test_chmod_keeps_delete_and_hspa() -> None:
    old = FIBF_DELETE | FIBF_ARCHIVE | FIBF_SCRIPT
    new = mapping.mode_to_protection(0o644, old)
    assert new & (FIBF_DELETE | FIBF_ARCHIVE | FIBF_SCRIPT) == old
    assert not new & FIBF_READ and not new & FIBF_WRITE and new & FIBF_EXECUTE
    assert new & FIBF_GRP_READ and new & FIBF_OTR_READ


@given(st.integers(0, 0o777), st.integers(0, 0xFFFFFFFF))
def test_chmod_round_trips_through_mode(mode: int, old: int) -> None:
    prot = mapping.mode_to_protection(mode, old)
    assert mapping.protection_to_mode(prot, Kind.FILE) & 0o777 == mode
    changed = 0xEE0E  # r/w/e of owner, group and other
    assert prot & ~changed == old & ~changed


@given(st.integers(0, 0xFFFFFFFF))
def test_protection_string_round_trip(prot: int) -> None:
    text = mapping.protection_to_string(prot)
    assert len(text) == 8
    assert mapping.string_to_protection(text, prot) == prot


def test_protection_strings() -> None:
    assert mapping.protection_to_string(0) == "----rwed"
    assert mapping.protection_to_string(FIBF_ARCHIVE | FIBF_DELETE) == "---arwe-"
    assert mapping.string_to_protection("rw") == FIBF_EXECUTE | FIBF_DELETE
    assert mapping.string_to_protection("0x10") == 0x10
    with pytest.raises(InvalidArgument):
        mapping.string_to_protection("rwx")
    with pytest.raises(InvalidArgument):
        mapping.string_to_protection("rr")


# ------------------------------------------------------------------ names


def test_names_latin1_and_utf8() -> None:
    assert mapping.name_from_fuse("Grüße".encode(), 30) == "Grüße"
    assert mapping.name_to_fuse("Grüße") == "Grüße".encode()
    with pytest.raises(InvalidName):
        mapping.name_from_fuse("€uro".encode(), 30)
    with pytest.raises(InvalidName):
        mapping.name_from_fuse(b"\xff\xfe", 30)
    with pytest.raises(InvalidName):
        mapping.name_from_fuse(b"a:b", 30)
    with pytest.raises(NameTooLong):
        mapping.name_from_fuse(b"x" * 31, 30)
    assert mapping.name_from_fuse("ü".encode() * 30, 30) == "ü" * 30  # characters, not bytes
    assert mapping.name_to_fuse("a/b") is None
    assert mapping.name_to_fuse("..") is None


# ------------------------------------------------------------------ soft links


@pytest.mark.parametrize(
    ("amiga", "depth", "unix"),
    [
        ("file", 0, "file"),
        ("dir/file", 2, "dir/file"),
        ("/x", 1, "../x"),
        ("//x", 2, "../../x"),
        ("a//b", 0, "a/../b"),
        ("a/", 0, "a"),
        (":c/Dir", 2, "../../c/Dir"),
        ("Work:c/Dir", 1, "../c/Dir"),
        ("dh0:c", 0, "c"),
        ("Work:", 2, "../.."),
        ("Other:c/Dir", 1, "Other:c/Dir"),
        ("DH1:s/x", 1, "../../DH1/s/x"),
    ],
)
def test_amiga_link_to_unix(amiga: str, depth: int, unix: str) -> None:
    out = mapping.amiga_link_to_unix(
        amiga, depth=depth, volume_names=["DH0", "Work"], other_volumes={"DH1": "../DH1"}
    )
    assert out == unix


@pytest.mark.parametrize(
    ("unix", "amiga"),
    [("a/b", "a/b"), ("../x", "/x"), ("../../x", "//x"), ("a/../b", "a//b"), ("./x", "x"),
     ("..", "/"), ("/mnt/amiga/c/d", "Work:c/d"), ("/mnt/amiga", "Work:")],
)
def test_unix_link_to_amiga(unix: str, amiga: str) -> None:
    assert mapping.unix_link_to_amiga(unix, volume_label="Work", mount_prefixes=["/mnt/amiga"]) == amiga


def test_unix_absolute_link_outside_volume_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        mapping.unix_link_to_amiga("/usr/bin", volume_label="Work", mount_prefixes=["/mnt/amiga"])


_component = st.text(alphabet="abcXYZ09_. ", min_size=1, max_size=5).filter(lambda s: s not in (".", ".."))


@given(st.lists(st.one_of(st.just(".."), _component), min_size=1, max_size=6))
def test_relative_links_round_trip(parts: list[str]) -> None:
    unix = "/".join(parts)
    amiga = mapping.unix_link_to_amiga(unix, volume_label="V")
    back = mapping.amiga_link_to_unix(amiga, depth=0, volume_names=["V"])
    assert back == unix


# ------------------------------------------------------------------ options


def test_options_parse_and_ignore() -> None:
    o = parse_options(["rw,uid=1000,gid=100,umask=027,defaults,nofail,x-systemd.automount,_netdev",
                       "partition=DH1:,backend=file,transport=modern,allow_other,nosuid"])
    assert (o.uid, o.gid, o.umask, o.partition, o.backend, o.transport) == (1000, 100, 0o027, "DH1", "file", "modern")
    assert o.allow_other and not o.read_only
    assert "nosuid" in o.fuse_options("img") and "allow_other" in o.fuse_options("img")
    assert "default_permissions" in o.fuse_options("img")
    assert not any(x.startswith("uid") for x in o.fuse_options("img"))
    assert parse_options(["rw,ro"]).read_only and "ro" in parse_options(["ro"]).fuse_options("x")
    assert (parse_options([]).max_background, parse_options(["max_background=200"]).max_background) == (64, 200)
    assert not any(x.startswith("max_background") for x in parse_options(["max_background=9"]).fuse_options("x"))
    assert (parse_options([]).check, parse_options(["check"]).check, parse_options(["check,nocheck"]).check) == (
        False, True, False)
    assert "check" not in parse_options(["check"]).fuse_options("x")


@pytest.mark.parametrize("bad", ["bogus", "uid=abc", "backend=tape", "transport=x", "umask=9", "partition=",
                                 "max_background=0", "max_background=70000", "max_background=x",
                                 "check=1"])
def test_bad_options_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_options([bad])


# ------------------------------------------------------------------ inode table


def test_inode_table_counts_and_forgets() -> None:
    t = InodeTable()
    assert t.pin_root(0, 880) == ROOT_INODE
    a = t.ref(0, 5, parent=ROOT_INODE)
    assert t.ref(0, 5) == a and a != ROOT_INODE
    t.forget(a, 1)
    assert t.resolve(a) is not None
    t.forget(a, 1)
    assert t.resolve(a) is None
    b = t.ref(0, 5)
    assert b != a  # never reused
    t.forget(ROOT_INODE, 10)
    assert t.resolve(ROOT_INODE) is not None  # pinned


def test_inode_depth() -> None:
    t = InodeTable()
    t.pin_root(0, 1)
    d1 = t.ref(0, 2, parent=ROOT_INODE)
    d2 = t.ref(0, 3, parent=d1)
    assert t.depth(d2, {ROOT_INODE}) == 2
    assert t.depth(ROOT_INODE, {ROOT_INODE}) == 0
    loop = t.ref(0, 4)
    t.resolve(loop).parent = loop  # type: ignore[union-attr]
    assert t.depth(loop, {ROOT_INODE}, limit=10) is None


def test_cross_volume_links() -> None:
    assert mapping.cross_volume_link("../DH1/s/x", depth=0, volume_dirs=["DH1"]) == "DH1:s/x"
    assert mapping.cross_volume_link("../../dh1", depth=1, volume_dirs=["DH1"]) == "DH1:"
    assert mapping.cross_volume_link("../x", depth=1, volume_dirs=["DH1"]) is None
    assert mapping.cross_volume_link("../DH2/x", depth=0, volume_dirs=["DH1"]) is None
