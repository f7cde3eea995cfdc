#!/bin/sh
# /init of the nested-KVM lane's L1 guest (images/build-l1.sh packs it; scripts/l1.sh boots it).
#
# Stage 1 (busybox, in the initramfs): mounts the basics, checks that the CPU shows AMD SVM,
# loads the modules (kvm_amd among them), mounts the host's root file system (virtio-fs, tag
# `hostroot`, read-only) under a tmpfs overlay as the new root, and switches to it.
# Stage 2 (the same script, in the new root): checks that /dev/kvm really works, then runs the
# lane's command (/run/l1/cmd, from the per-run archive) and reports its exit status.
#
# Every line for scripts/l1.sh starts with `rootcell-l1:`. Exactly one of these ends a boot:
#   rootcell-l1: FAIL <one line saying what>      L1 could not give the command a working KVM
#   rootcell-l1: RESULT <exit status>              the command ran
# Faults to prove those lines (kernel parameter rootcell.l1fault=): no-kvm-amd (skip loading it),
# broken-kvm (replace /dev/kvm by a character device that is not KVM).
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

say() { echo "rootcell-l1: $*" > /dev/console; }
finish() {
    sync
    # -no-reboot on the QEMU side: a reboot ends L1.
    if [ -x /bin/busybox ]; then /bin/busybox reboot -f; else reboot -f; fi
    sleep 1000000
}
fail() { say "FAIL $*"; finish; }
param() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -1; }
# A line on the console every 30 s, whatever else runs: scripts/l1.sh takes a console that stays
# silent for minutes as L1 itself having stopped (no soft lockup report comes when every vCPU is
# stuck with interrupts off), not as a command or a step that is merely waiting.
# Its busybox is a copy in RAM (stage 2's, which is also stage 2's shell, is in /run/l1), so that
# a root file system that stops answering does not stop it too.
heartbeat() {
    ( while "$1" sleep 30; do
        say "alive: up $("$1" cut -d' ' -f1 /proc/uptime) s, load $("$1" cut -d' ' -f1-3 /proc/loadavg)"
    done ) &
    beat=$!
}

if [ "$1" != stage2 ]; then
    /bin/busybox --install -s /bin
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    fault=$(param rootcell.l1fault)
    say "init: L1 kernel $(uname -r) up after $(cut -d' ' -f1 /proc/uptime) s"
    # The heartbeat (see stage 2) from here on: an L1 whose every vCPU stops during init must
    # fall silent too (CI once saw an init that never finished, with nothing said why).
    heartbeat /bin/busybox
    grep -qw svm /proc/cpuinfo ||
        fail "no svm flag in L1's /proc/cpuinfo: this QEMU's -cpu max gives no AMD SVM on this host's CPU model, so L1 has no KVM"
    for m in $(cat /modules/order); do
        if [ "$m" = kvm-amd ] && [ "$fault" = no-kvm-amd ]; then continue; fi
        err=$(insmod "/modules/$m.ko" 2>&1) || fail "insmod $m failed: $err"
    done
    [ -d /sys/module/kvm_amd ] || fail "kvm_amd is not loaded in L1 (no /sys/module/kvm_amd), so L1 has no KVM"
    [ -c /dev/kvm ] || fail "kvm_amd loaded but /dev/kvm did not appear in L1"
    say "init: kvm_amd loaded ($(dmesg | grep -o 'Nested Virtualization enabled' | head -1)); $(dmesg | grep -o 'Nested Paging enabled' | head -1)"

    mkdir -p /lower /rw
    mount -t virtiofs -o ro hostroot /lower || fail "cannot mount the host's root file system (virtio-fs tag hostroot)"
    mount -t tmpfs -o mode=0755 tmpfs /rw
    mkdir -p /rw/upper /rw/work
    mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
        fail "cannot mount the overlay root (host root read-only + tmpfs)"
    for d in proc sys dev; do mount --move "/$d" "/newroot/$d"; done
    # Paths under /tmp or /run the command needs (scripts/l1.sh lists them) survive the fresh
    # tmpfs mounts: held aside as binds of the overlay's view, then moved back in place.
    n=0
    while read -r p; do
        [ -d "/newroot$p" ] || fail "$p (needed in L1) is not on the host's root file system"
        n=$((n + 1)); mkdir -p "/keep/$n"
        mount --bind "/newroot$p" "/keep/$n" || fail "cannot keep $p in L1"
    done < /l1/keep
    mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
    mount -t tmpfs -o mode=0755 tmpfs /newroot/run
    n=0
    while read -r p; do
        n=$((n + 1)); mkdir -p "/newroot$p"
        mount --move "/keep/$n" "/newroot$p" || fail "cannot put $p back in L1"
    done < /l1/keep
    mkdir -p /newroot/run/l1 /newroot/var/lib /newroot/var/tmp
    cp /init /newroot/run/l1/init
    cp /bin/busybox /newroot/run/l1/busybox
    cp /l1/cmd /l1/env /newroot/run/l1/ 2>/dev/null || fail "no command in the initramfs (/l1/cmd)"
    [ "$fault" = broken-kvm ] && { rm -f /newroot/dev/kvm; mknod /newroot/dev/kvm c 1 5; }
    say "init: root file system ready (the host's, read-only, under a tmpfs overlay)"
    # Stage 2 starts its own heartbeat (this one's files go with the initramfs).
    kill "$beat"
    exec switch_root /newroot /run/l1/busybox sh /run/l1/init stage2
    fail "switch_root failed"
fi

# --- stage 2: the host's user space on an overlay, as PID 1 ---
heartbeat /run/l1/busybox
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Every controller for child cgroups, as systemd would.
ctrls=$(sed 's/[^ ][^ ]*/+&/g' /sys/fs/cgroup/cgroup.controllers)
[ -n "$ctrls" ] && echo "$ctrls" > /sys/fs/cgroup/cgroup.subtree_control
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ln -sf /proc/self/fd /dev/fd
# `quiet` keeps the boot cheap; from here on, warnings reach the console too (level < 5), so a
# soft lockup in L1's kernel comes with its stack traces, of every CPU (scripts/l1.sh stops L1
# on one and shows them).
echo 5 > /proc/sys/kernel/printk
echo 1 > /proc/sys/kernel/softlockup_all_cpu_backtrace
ip link set lo up
hostname rootcell-l1

# /dev/kvm must answer: API version 12 and a VM created.
kvm_check=$(python3 -c '
import fcntl, os, sys
try:
    fd = os.open("/dev/kvm", os.O_RDWR)
except OSError as e:
    sys.exit("cannot open /dev/kvm: %s" % e.strerror)
try:
    v = fcntl.ioctl(fd, 0xAE00)
except OSError as e:
    sys.exit("/dev/kvm does not answer KVM_GET_API_VERSION: %s" % e.strerror)
if v != 12:
    sys.exit("/dev/kvm reports KVM API version %d, not 12" % v)
try:
    fcntl.ioctl(fd, 0xAE01, 0)
except OSError as e:
    sys.exit("/dev/kvm cannot create a VM (KVM_CREATE_VM): %s" % e.strerror)
' 2>&1) || fail "/dev/kvm in L1 does not work: $kvm_check"
# L1's kernel symbols (its modules' included) to the second serial port, for scripts/l1.sh to
# name where L1's vCPUs are if L1 stops responding. In the background: the command need not wait.
syms=$(param rootcell.syms)
[ -n "$syms" ] && [ -c "/dev/$syms" ] &&
    ( stty -F "/dev/$syms" raw -echo 2>/dev/null; grep ' [tT] ' /proc/kallsyms > "/dev/$syms" ) &
say "ready: /dev/kvm works, $(nproc) vCPU(s), $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB, uptime $(cut -d' ' -f1 /proc/uptime) s"

set -a
. /run/l1/env
set +a
/bin/bash /run/l1/cmd < /dev/null &
pid=$!
# ash's wait reaps every child meanwhile (orphans of the command are reparented to us).
wait $pid
rc=$?
kill "$beat" 2>/dev/null
say "RESULT $rc"
finish
