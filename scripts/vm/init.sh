#!/bin/busybox sh
# amigafuse test-guest init (PID 1 inside the initramfs built by scripts/vm/guest.py).
#
# Kernel command line parameters it reads:
#   amigafuse.mods=a,b,c   modules to insmod from /lib/mod, in this order (dependencies first)
#   amigafuse.cmd=PATH     shell script on the host's file system (seen over 9p) to run
# It mounts the host root read-only over 9p with a tmpfs overlay on /newroot, runs the
# script chrooted there with stdout/stderr on the virtio-serial ports named "stdout" and
# "stderr", writes the exit status to the port "status", then powers the guest off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

mods=""
cmd=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        amigafuse.mods=*) mods="${arg#amigafuse.mods=}" ;;
        amigafuse.cmd=*) cmd="${arg#amigafuse.cmd=}" ;;
    esac
done

fail() {
    echo "amigafuse-init: $*" >/dev/console
    [ -e /dev/port-stderr ] && echo "amigafuse-init: $*" >/dev/port-stderr
    [ -e /dev/port-status ] && echo 255 >/dev/port-status
    sync
    poweroff -f
}

for m in $(echo "$mods" | tr ',' ' '); do
    insmod "/lib/mod/$m.ko" || fail "insmod $m failed"
done

# Name the virtio-serial ports (/dev/vportNpM, N depends on probe order).
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    ln -sf "/dev/${p##*/}" "/dev/port-$(cat "$p/name")"
done
[ -e /dev/port-status ] || fail "no virtio-serial port named status"

mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /lower \
    || fail "mounting the host root over 9p failed"
mount -t tmpfs -o size=256m tmpfs /upper || fail "tmpfs"
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot \
    || fail "overlay mount failed"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs run /newroot/run
for p in /dev/port-*; do ln -sf "$(readlink "$p")" "/newroot/dev/${p##*/}"; done

chroot /newroot /bin/sh "$cmd" </dev/null >/dev/port-stdout 2>/dev/port-stderr
echo "$?" >/dev/port-status
sync
poweroff -f
