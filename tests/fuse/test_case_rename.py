"""Changing only the case of a name on a real mount.

Linux never hands such a rename to the filesystem (the kernel finds one inode under both
spellings and does nothing; coreutils mv says "are the same file"): the stored spelling
is changed through the ``user.amiga.name`` attribute instead, as AmigaOS's Rename would."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_image
from tests.fuse.conftest import amigafuse, check_image

pytestmark = pytest.mark.fuse

XDFTOOL = str(Path(sys.executable).parent / "xdftool")


@pytest.mark.parametrize(("image_name", "part"), [("handler/ffs_dos3_v40.hdf.gz", "DH0"),
                                                  ("handler/ffs_dos7_v47.hdf.gz", "DH0"),
                                                  ("handler/sfs0_v1277.hdf.gz", "SDH0")])
def test_case_only_rename_through_user_amiga_name(  # type: ignore[no-untyped-def]
    cli_mount, tmp_path: Path, image_name: str, part: str
) -> None:
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image(image_name), image)
    mnt = cli_mount(image)
    root = mnt / part
    (root / "CaseDir").mkdir()
    (root / "CaseDir" / "Foo.txt").write_bytes(b"contents")
    (root / "Other").write_bytes(b"other")
    # what rename(2) does: nothing (the kernel sees the same inode), and mv refuses
    os.rename(root / "CaseDir" / "Foo.txt", root / "CaseDir" / "foo.TXT")
    assert os.listdir(root / "CaseDir") == ["Foo.txt"]
    mv = subprocess.run(["mv", str(root / "Other"), str(root / "OTHER")], capture_output=True, text=True)
    assert mv.returncode != 0 and "same file" in mv.stderr
    # the attribute shows and changes the stored spelling
    f = root / "CaseDir" / "Foo.txt"
    assert os.getxattr(f, "user.amiga.name") == b"Foo.txt"
    os.setxattr(f, "user.amiga.name", b"foo.TXT")
    assert os.listdir(root / "CaseDir") == ["foo.TXT"]
    assert (root / "CaseDir" / "foo.TXT").read_bytes() == b"contents"
    assert os.getxattr(root / "casedir" / "FOO.txt", "user.amiga.name") == b"foo.TXT"
    os.setxattr(root / "CaseDir", "user.amiga.name", b"casedir")  # directories too
    assert "casedir" in os.listdir(root) and "CaseDir" not in os.listdir(root)
    assert (root / "casedir" / "foo.TXT").read_bytes() == b"contents"
    assert "user.amiga.name" not in os.listxattr(root / "Other")  # cp -a does not copy it
    for target, value, err in (
        (root / "casedir" / "foo.TXT", b"Bar.txt", errno.EINVAL),  # another name: use mv
        (root / "casedir", b"other", errno.EEXIST),  # another entry's name
        (root / "casedir" / "foo.TXT", b"a:b", errno.EINVAL),  # not an Amiga name
    ):
        with pytest.raises(OSError) as exc:
            os.setxattr(target, "user.amiga.name", value)
        assert exc.value.errno == err, value
    with pytest.raises(OSError) as exc:
        os.setxattr(root, "user.amiga.name", b"x")  # the volume's top: user.amiga.volume
    assert exc.value.errno == errno.EPERM
    assert amigafuse("umount", str(mnt)).returncode == 0
    assert check_image(image) == {part: []}
    if part == "DH0":  # an independent reader sees the new spellings
        out = subprocess.run([XDFTOOL, str(image), "open", "part=DH0", "+", "list", "casedir"],
                             capture_output=True, text=True, check=True).stdout
        assert "foo.TXT" in out and "Foo.txt" not in out
    again = cli_mount(image, options="backend=file,ro")
    assert os.listdir(again / part / "casedir") == ["foo.TXT"]
