"""Mounting from fstab and mount(8), in a private mount namespace (``unshare -m``), with
the wrappers ``amigafuse install-helper`` writes.

Inside the namespace the install directories are bind-mounted over /usr/local/bin and
/usr/sbin (/sbin), so the host's system directories are never written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import shared_image
from tests.fuse.conftest import amigafuse

pytestmark = pytest.mark.fuse

NS_SCRIPT = r"""
set -u
inst="$1"; fstab="$2"; mnt="$3"; mode="$4"
cleanup() { "$inst/bin/amigafuse" umount "$mnt" >/dev/null 2>&1 || umount -l "$mnt" 2>/dev/null; }
trap cleanup EXIT
mount --make-rprivate / 2>/dev/null
mount --bind "$inst/bin" /usr/local/bin
if [ "$mode" = sbin ]; then
  # /usr/sbin = the real one plus our helpers (links into a second view of the real one)
  mkdir -p "$inst/orig" "$inst/sbinview"
  mount --bind /usr/sbin "$inst/orig"
  for f in "$inst"/orig/*; do ln -sf "$f" "$inst/sbinview/$(basename "$f")"; done
  cp "$inst"/sbin/mount.* "$inst/sbinview/"
  rm -f "$inst/sbinview/mount.fuse3" "$inst/sbinview/mount.fuse"   # prove the helper is used
  mount --bind "$inst/sbinview" /usr/sbin
fi
env -i mount -T "$fstab" -a || { echo "mount -a failed"; exit 3; }
ls -ln "$mnt" > "$inst/listing"
cat "$mnt/SDH0/README.txt" > "$inst/readme"
grep " $mnt " /proc/self/mounts > "$inst/mounts"
"$inst/bin/amigafuse" umount "$mnt" || exit 4
grep -q " $mnt " /proc/self/mounts && exit 5
trap - EXIT
exit 0
"""


@pytest.mark.parametrize(("mode", "backend"), [("sbin", "file"), ("mount.fuse3", "file"), ("sbin", "qemu")])
def test_fstab_mount_a_in_private_namespace(tmp_path: Path, mode: str, backend: str) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("this test needs root and unshare (util-linux)")
    image = tmp_path / "disk.hdf"
    shutil.copyfile(shared_image("handler/sfs0_v1277.hdf.gz"), image)
    inst = tmp_path / "inst"
    proc = amigafuse("install-helper", "--prefix", str(inst), "--sbin", str(inst / "sbin"))
    assert proc.returncode == 0, proc.stderr
    assert (inst / "sbin" / "mount.fuse.amigafuse").exists()
    assert (inst / "share" / "man" / "man8" / "mount.amigafuse.8").exists()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"# test fstab\n{image} {mnt} fuse.amigafuse "
        f"rw,backend={backend},uid=1000,gid=100,umask=022,nofail,x-systemd.automount,_netdev 0 0\n"
    )
    script = tmp_path / "ns.sh"
    script.write_text(NS_SCRIPT)
    run = subprocess.run(["unshare", "-m", "sh", str(script), str(inst), str(fstab), str(mnt), mode],
                         capture_output=True, text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    listing = (inst / "listing").read_text()
    assert "SDH0" in listing and " 1000 100 " in listing
    assert (inst / "readme").read_text().startswith("Test volume written by the real SmartFilesystem")
    assert "fuse.amigafuse" in (inst / "mounts").read_text()


def test_mount_helper_translates_mount_arguments() -> None:
    from amigafuse.fuse.helper import translate

    assert translate(["img", "/mnt", "-o", "rw,uid=5", "-n", "-sv"]) == [
        "mount", "-o", "rw,uid=5", "--", "img", "/mnt"]
    assert translate(["-f", "img", "/mnt", "-orw"]) == ["mount", "-f", "-o", "rw", "--", "img", "/mnt"]


def test_install_helper_writes_and_uninstalls_only_its_files(tmp_path: Path) -> None:
    inst = tmp_path / "inst"
    (inst / "bin").mkdir(parents=True)
    foreign = inst / "bin" / "other-tool"
    foreign.write_text("#!/bin/sh\n")
    assert amigafuse("install-helper", "--prefix", str(inst), "--sbin", str(inst / "sbin")).returncode == 0
    wrapper = inst / "bin" / "amigafuse"
    assert os.access(wrapper, os.X_OK)
    out = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("amigafuse ")
    helper = subprocess.run([str(inst / "sbin" / "mount.fuse.amigafuse"), "--help"],
                            capture_output=True, text=True, check=False)
    assert helper.returncode == 0 and "mount.amigafuse" in helper.stdout
    proc = amigafuse("install-helper", "--uninstall", "--prefix", str(inst), "--sbin", str(inst / "sbin"))
    assert proc.returncode == 0
    assert not wrapper.exists() and not (inst / "sbin" / "mount.amigafuse").exists()
    assert foreign.exists()  # not ours: left alone
    (inst / "bin" / "amigafuse").write_text("#!/bin/sh\necho someone else's\n")
    proc = amigafuse("install-helper", "--prefix", str(inst), "--sbin", str(inst / "sbin"))
    assert proc.returncode == 1 and "was not written by amigafuse" in proc.stderr
