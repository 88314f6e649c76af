#!/usr/bin/env bash
# amigafuse demo (run by ./bootstrap.sh demo, after setup):
#   1. makes a sample Amiga hard disk demo/sample.hdf: an RDB with an FFS+INTL partition
#      DH0 and an SFS partition DH1 (amigafuse mkdisk + format),
#   2. mounts it and copies some files in through the mount, unmounts (volumes marked clean),
#   3. mounts it again through amigafuse's VirtIO SCSI driver (QEMU backend) and shows it:
#      ls -lR, cat of a file, getfattr of the Amiga attributes.
# Run from a terminal, it leaves the disk mounted on demo/mnt and says how to unmount;
# run non-interactively (CI, a pipe), it unmounts at the end.  DEMO_KEEP=0/1 overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
AF=(.venv/bin/python -m amigafuse)
DEMO=demo
IMG="$DEMO/sample.hdf"
MNT="$DEMO/mnt"
if [ -t 1 ]; then keep="${DEMO_KEEP:-1}"; else keep="${DEMO_KEEP:-0}"; fi
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

mkdir -p "$DEMO" "$MNT"
mounted() { grep -q " $(realpath "$MNT") " /proc/self/mountinfo; }
on_exit() {
  status=$?
  if [ "$status" != 0 ] && mounted; then
    echo "demo: failed (status $status); unmounting $MNT" >&2
    "${AF[@]}" umount "$MNT" || fusermount3 -u -z "$MNT" || true
  fi
}
trap on_exit EXIT
if mounted; then "${AF[@]}" umount "$MNT" || true; fi

say "1. A sample disk: RDB, DH0 = FFS+INTL (DOS\\3), DH1 = SFS"
rm -f "$IMG"
if "${AF[@]}" mkdisk --help >/dev/null 2>&1; then
  run "${AF[@]}" mkdisk "$IMG" --size 64M --partition DH0:FFS+INTL:32M --partition DH1:SFS:rest
else
  echo "(amigafuse mkdisk is not in this build: using amitools' rdbtool and xdftool instead)"
  run .venv/bin/rdbtool "$IMG" create size=64M + init + add size=50% name=DH0 dostype=ffs+intl \
      + add size=50% name=DH1 dostype=0x53465300
  run .venv/bin/xdftool "$IMG" open part=DH0 + format Workbench ffs+intl
fi

if ! "${AF[@]}" mkdisk --help >/dev/null 2>&1; then
  if "${AF[@]}" format --help >/dev/null 2>&1; then
    run "${AF[@]}" format "$IMG" --partition DH1 --label Work
  else
    echo "(amigafuse format is not in this build: formatting DH1 with the SFS engine directly)"
    .venv/bin/python - "$IMG" <<'PY'
import sys, trio
from amigafuse.blockdev.file import FileBlockDevice
from amigafuse.blockdev.window import PartitionDevice
from amigafuse.fs import engine_for
from amigafuse.rdb.scan import scan_device
async def main() -> None:
    dev = FileBlockDevice(sys.argv[1])
    for part in (await scan_device(dev)).partitions:
        if part.drive_name == "DH1":
            window = PartitionDevice(dev, part.first_lba, part.block_count)
            await engine_for(part.dostype).format_volume(window, part.geometry, "Work")
    await dev.flush()
trio.run(main)
PY
  fi
fi

say "2. Copy files in through a mount"
backend=qemu
if ! run "${AF[@]}" mount -o "backend=$backend" "$IMG" "$MNT"; then
  echo "(the QEMU driver backend did not come up here: reading the image file directly)"
  backend=file
  run "${AF[@]}" mount -o "backend=$backend" "$IMG" "$MNT"
fi
run ls "$MNT"
part=""
for p in "$MNT"/DH0 "$MNT"/DH1; do
  [ -d "$p" ] || continue
  if ! mkdir "$p/S" 2>/dev/null; then echo "($p is read-only in this build: nothing copied there)"; continue; fi
  [ -n "$part" ] || part="$p"
  mkdir -p "$p/Docs"
  printf 'echo "Hello from Linux"\n' > "$p/S/Startup-Sequence"
  cp README.md "$p/Docs/ReadMe"
  mkdir "$p/Source" && cp -p amigafuse/amiga/*.py "$p/Source/"
  setfattr -n user.amiga.comment -v "written through amigafuse" "$p/Docs/ReadMe"
  setfattr -n user.amiga.protection -v "-s--rwed" "$p/S/Startup-Sequence"
  ln -s Docs/ReadMe "$p/ReadMe.link"
  echo "copied S/Startup-Sequence, Docs/ReadMe, Source/ and a soft link into $p"
done
[ -n "$part" ] || { echo "demo: no writable partition" >&2; exit 1; }
run "${AF[@]}" umount "$MNT"
if "${AF[@]}" check --help >/dev/null 2>&1; then
  for p in DH0 DH1; do run "${AF[@]}" check --backend "$backend" --partition "$p" "$IMG" || true; done
fi

say "3. Mount it again through the VirtIO SCSI driver (backend=$backend) and look"
run "${AF[@]}" mount -o "backend=$backend" "$IMG" "$MNT"
run ls -lR "$MNT"
run cat "$part/S/Startup-Sequence"
run getfattr -d "$part/Docs/ReadMe" "$part/S/Startup-Sequence"
run getfattr -d -m 'user\.amiga\.(volume|dostype)' "$part"
run df -h "$MNT"

if [ "$keep" = 1 ]; then
  say "Still mounted on $MNT.  Unmount (flushes, marks the volumes clean) with:"
  echo "  .venv/bin/amigafuse umount $MNT"
else
  say "Unmounting"
  run "${AF[@]}" umount "$MNT"
fi
