"""An image that cannot be written (on a read-only filesystem) mounts read-only, saying
why; writes fail with EROFS.  Runs in a private mount namespace (unshare -m) where the
image's directory is bind-mounted read-only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, shared_image

pytestmark = pytest.mark.fuse

SCRIPT = r"""
set -u
dir="$1"; mnt="$2"; py="$3"
mount --make-rprivate / 2>/dev/null
mount --bind "$dir" "$dir" && mount -o remount,bind,ro "$dir" || exit 9
"$py" -m amigafuse mount -o backend=file "$dir/disk.hdf" "$mnt" 2> "$mnt.err" || { cat "$mnt.err"; exit 3; }
trap '"$py" -m amigafuse umount "$mnt" >/dev/null 2>&1 || umount -l "$mnt"' EXIT
ls "$mnt/SDH0" > "$mnt.ls"
if ( echo x > "$mnt/SDH0/new" ) 2> "$mnt.werr"; then exit 4; fi
grep " $mnt " /proc/self/mounts > "$mnt.mounts"
"$py" -m amigafuse umount "$mnt" || exit 5
trap - EXIT
"""


def test_image_on_read_only_filesystem_mounts_read_only(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("this test needs root and unshare (util-linux)")
    d = tmp_path / "images"
    d.mkdir()
    shutil.copyfile(shared_image("handler/sfs0_v1277.hdf.gz"), d / "disk.hdf")
    before = (d / "disk.hdf").read_bytes()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["unshare", "-m", "sh", "-c", SCRIPT, "sh", str(d), str(mnt), sys.executable],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    err = Path(f"{mnt}.err").read_text()
    assert "mounted read-only" in err and "image is read-only" in err, err
    assert "README.txt" in Path(f"{mnt}.ls").read_text()
    assert "Read-only file system" in Path(f"{mnt}.werr").read_text()
    assert " ro," in Path(f"{mnt}.mounts").read_text()
    assert (d / "disk.hdf").read_bytes() == before
