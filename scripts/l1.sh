#!/usr/bin/env bash
# The nested-KVM lane: runs a command inside an L1 Linux guest that has a real KVM.
#
# L1 is Debian 12's cloud kernel (images/build-l1.sh, cached) booted by QEMU TCG with `-cpu max`,
# which gives it AMD SVM with nested paging; its /init loads kvm_amd. L1's root file system is
# this host's root file system (virtio-fs from QEMU's virtiofsd, read-only, only the root mount,
# no submounts) under a tmpfs overlay, with fresh /tmp, /run, /proc, /sys, /dev and a cgroup v2
# hierarchy: the binaries, guest images and test binaries are at the same paths as on the host.
#
# Usage: scripts/l1.sh [options] -- COMMAND...
#   COMMAND runs in L1 as root (bash -c), in the current directory, with the caller's ROOTCELL_*,
#   RUST_* and TEST_* variables; its output streams to stdout. The exit status is COMMAND's.
# Options:
#   --timeout S        whole run, boot included (default 1800)
#   --boot-timeout S   until L1's /init speaks (default 120)
#   --smp N --mem MIB  L1's vCPUs and RAM (default 2, 3072)
#   --fault F          prove the lane's failure lines: no-svm (QEMU's CPU without SVM),
#                      no-kvm-amd, broken-kvm (/dev/kvm not a KVM), no-boot (L1 hangs before /init),
#                      freeze (L1's vCPUs stopped, from QEMU's monitor, once the command prints a
#                      line `freeze L1 now`), stuck-fs (virtiofsd stopped, SIGSTOP, once L1 has
#                      loaded its modules: L1's root file system never answers)
#   --console FILE     keep L1's console log there (default: a temporary file)
#   --silence S        L1's console silent that long, once its /init has spoken, means L1 has
#                      stopped (its /init prints a heartbeat every 30 s; default 180)
#   --init-timeout S   from /init's first line until it is ready to run the command (modules,
#                      the root file system, a /dev/kvm check; about 4 s here; default 240)
# Env: ROOTCELL_L1_QEMU (L0's QEMU binary; default: the host's if 8.1 or later, else Debian 13's
#      QEMU 10 from images/build-trixie-root.sh), ROOTCELL_L1_ACCEL (L0's -accel, default tcg; e.g.
#      tcg,thread=single to run L1's vCPUs on one host thread, for comparing L1's failure rates)
# When L1 cannot give COMMAND a working KVM, or does not come up, or runs out of time, the script
# prints one line `l1: FAIL ...` saying which (and where L1 got to), and exits with 125. It
# leaves no QEMU, virtiofsd or mount behind, also when it is killed (TERM/INT) or fails.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
timeout=1800 boot_timeout=120 init_timeout=240 smp=2 mem=3072 fault= console= silence=180
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) timeout=$2; shift 2 ;;
        --boot-timeout) boot_timeout=$2; shift 2 ;;
        --init-timeout) init_timeout=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --fault) fault=$2; shift 2 ;;
        --console) console=$2; shift 2 ;;
        --silence) silence=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "usage: scripts/l1.sh [--timeout S] [--boot-timeout S] [--init-timeout S] [--smp N] [--mem MIB] [--fault F] [--console FILE] [--silence S] -- COMMAND..." >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "l1: no command given" >&2; exit 2; }
lane_fail() { echo "l1: FAIL $*"; exit 125; }

# L0 must be QEMU 8.1 or later. Before 8.1, multi-threaded TCG could keep running its translation
# of code that another vCPU had just rewritten (QEMU commit deba78709ae8, "accel/tcg: Always lock
# pages before translation"), and L1's kernel rewrites its own code all the time (static keys flip
# as KVM creates and ends guests). Seen here on Debian 12's 7.2.22: L1 looping for good on an int3
# in __schedule that text_poke had already replaced with a NOP (both vCPUs stuck, the lane's
# "stopped responding"). So with an older host QEMU, L1 runs under Debian 13's QEMU 10 from the
# trixie root (images/build-trixie-root.sh, cached); ROOTCELL_L1_QEMU names any other.
qemu_at_least_8_1() {
    local v; v=$("$1" --version 2>/dev/null | sed -n '1s/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [ -n "$v" ] && set -- $v && { [ "$1" -gt 8 ] || { [ "$1" = 8 ] && [ "$2" -ge 1 ]; }; }
}
if [ -n "${ROOTCELL_L1_QEMU:-}" ]; then
    qemu=$ROOTCELL_L1_QEMU
elif qemu_at_least_8_1 qemu-system-x86_64; then
    qemu=qemu-system-x86_64
else
    echo "l1: the host's $(qemu-system-x86_64 --version 2>/dev/null | head -1) is older than 8.1: L0 is the trixie root's QEMU"
    root=$("$top/images/build-trixie-root.sh") ||
        lane_fail "could not build the trixie root for its QEMU 10 (images/build-trixie-root.sh); the host's QEMU is older than 8.1, whose TCG runs stale code in L1 (set ROOTCELL_L1_QEMU to use it anyway)"
    qemu=$root/rootcell-qemu
fi
accel=${ROOTCELL_L1_ACCEL:-tcg}
virtiofsd=${ROOTCELL_L1_VIRTIOFSD:-/usr/lib/qemu/virtiofsd}
command -v "$qemu" >/dev/null || lane_fail "$qemu not found (scripts/install-deps.sh installs qemu-system-x86)"
[ -x "$virtiofsd" ] || lane_fail "$virtiofsd not found (part of qemu-system-common)"
echo "l1: L0 is $("$qemu" --version 2>/dev/null | head -1) ($qemu, -accel $accel)"
l1=$("$top/images/build-l1.sh") || lane_fail "could not build the L1 kernel and initramfs (images/build-l1.sh)"

tmp=$(mktemp -d /tmp/rootcell-l1.XXXXXX)
echo "l1: work dir $tmp"
qemu_pid= fsd_pid=
cleanup() {
    local p
    for p in $qemu_pid $fsd_pid; do kill -KILL "$p" 2>/dev/null || true; done
    for p in $qemu_pid $fsd_pid; do wait "$p" 2>/dev/null || true; done
    # The share's bind mount lived in virtiofsd's own mount namespace: gone with it.
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "l1: FAIL interrupted; last console lines:"; tail -n 20 "$log" 2>/dev/null | sed "s/^/l1:   /"; exit 125' INT TERM HUP
log=${console:-$tmp/console.log}
: > "$log"

# The per-run archive: the command and its environment, appended to the cached initramfs.
mkdir -p "$tmp/run/l1"
{
    printf 'cd %q 2>/dev/null || cd /\n' "$PWD"
    printf 'exec bash -c %q\n' "$*"
} > "$tmp/run/l1/cmd"
env | grep -E '^(ROOTCELL_|RUST_|TEST_|CARGO_TERM_)' | grep -v '^ROOTCELL_L1_' |
    while IFS='=' read -r k v; do printf '%s=%q\n' "$k" "$v"; done > "$tmp/run/l1/env"
# L1 mounts a fresh /tmp and /run: paths the command needs that live there (a checkout cloned
# under /tmp, the guest images it built) are kept, bound over from L1's view of the host's root.
for p in "$top" "$PWD" "${ROOTCELL_BIN:-}" "${ROOTCELL_KERNEL:-}" "${ROOTCELL_VMLINUX:-}" "${ROOTCELL_INITRD:-}"; do
    [ -n "$p" ] || continue
    [ -d "$p" ] || p=$(dirname "$p")
    case $p in /tmp/*|/run/*) echo "$p" ;; esac
done | sort -u > "$tmp/run/l1/keep"
mv "$tmp/run/l1" "$tmp/l1" && rmdir "$tmp/run"
install -m 0755 "$top/images/l1-init.sh" "$tmp/init"
(cd "$tmp" && { echo init; find l1; } | cpio -o -H newc -R 0:0 --quiet) > "$tmp/run.cpio"
cat "$l1/initramfs.cpio" "$tmp/run.cpio" > "$tmp/initramfs.cpio"

# virtiofsd in a mount namespace of its own, sharing a read-only bind of / (the root mount only).
mkdir -p "$tmp/root"
unshare --mount --propagation private -- sh -c '
    mount --bind / "$1" && mount -o remount,bind,ro "$1" || exit 1
    exec "$2" --socket-path="$3" -o source="$1" -o cache=always -o sandbox=chroot -o log_level=err
' sh "$tmp/root" "$virtiofsd" "$tmp/fs.sock" > "$tmp/virtiofsd.log" 2>&1 &
fsd_pid=$!
for _ in $(seq 100); do [ -S "$tmp/fs.sock" ] && break; sleep 0.1; done
[ -S "$tmp/fs.sock" ] || lane_fail "virtiofsd did not start: $(tail -n 3 "$tmp/virtiofsd.log" | tr '\n' ' ')"

cpu=max append_fault=
case "$fault" in
    '') ;;
    no-svm) cpu=max,svm=off ;;
    no-kvm-amd|broken-kvm) append_fault="rootcell.l1fault=$fault" ;;
    no-boot) append_fault="rdinit=/nonexistent panic=0" ;;
    freeze|stuck-fs) ;;
    *) lane_fail "unknown --fault $fault" ;;
esac
# L1 ending itself: with -no-reboot a reset of L1's (its kernel's reboot, reboot=t: a triple fault,
# also after a panic) is a shutdown, and -no-shutdown makes that a pause that keeps L1's vCPU
# state, so the lane can say where L1 was; QEMU's `-d cpu_reset` log says "Triple fault" when the
# emulated CPU takes one (L1 once ended without a word on its console: nothing said where).
# QEMU's monitor on a pair of FIFOs (QEMU opens both read-write, so neither side blocks): when
# L1 stops responding, it tells where L1's vCPUs are.
mkfifo "$tmp/mon.in" "$tmp/mon.out"
# L1's second serial port takes its kernel symbols (L1 writes them once it is up), to name
# those places; nokaslr keeps L1's addresses the ones the symbols say.
: > "$tmp/syms"
start=$(date +%s.%N)
"$qemu" -nodefaults -no-user-config -M q35,memory-backend=mem -accel "$accel" -cpu "$cpu" -smp "$smp" -m "${mem}M" \
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" \
    -chardev "socket,id=fs,path=$tmp/fs.sock" -device vhost-user-fs-pci,chardev=fs,tag=hostroot \
    -kernel "$l1/vmlinuz" -initrd "$tmp/initramfs.cpio" \
    -append "console=ttyS0 quiet loglevel=3 reboot=t panic=-1 unknown_nmi_panic tsc=reliable nokaslr rootcell.syms=ttyS1 $append_fault" \
    -chardev "pipe,id=mon,path=$tmp/mon" -mon chardev=mon,mode=readline \
    -display none -serial "file:$log" -serial "file:$tmp/syms" -no-reboot -no-shutdown \
    -d cpu_reset -D "$tmp/qemu-debug.log" > "$tmp/qemu.log" 2>&1 &
qemu_pid=$!

# Follows the console until a RESULT or FAIL line, QEMU's exit, or a deadline.
last_lines() {
    if [ -s "$log" ]; then tail -n "${1:-20}" "$log" | tr -d '\r' | sed 's/^/l1:   /'; else echo "l1:   (nothing on L1's console)"; fi
}
# A monitor command's answer (QEMU's FIFO never ends: read for a bounded while).
monitor() {
    timeout 0.5 cat "$tmp/mon.out" > /dev/null 2>&1 || true
    echo "$1" > "$tmp/mon.in"
    { timeout 2 cat "$tmp/mon.out" 2>/dev/null || true; } | tr -d '\r'
}
# Where each vCPU of L1 is, sampled three times a second apart: its RIP, privilege level and
# halt state, and the nearest L1 kernel symbol at or below the RIP (from L1's /proc/kallsyms,
# if L1 got to write them). A vCPU running L1's own guest shows that guest's RIP instead.
where_cpus() {
    local i regs
    for i in $(seq "${1:-3}"); do
        regs=$(monitor "info registers -a")
        if ! grep -q RIP= <<< "$regs"; then
            # QEMU's main loop is blocked (seen: waiting on virtiofsd's vhost-user socket, which
            # freezes every vCPU too); its threads' kernel wait channels say where.
            echo "l1:   QEMU's monitor did not answer; QEMU (pid $qemu_pid) threads: $(ps -L -o stat=,wchan:24= -p "$qemu_pid" 2>/dev/null | tr -s ' ' | sort | uniq -c | tr -s ' ' | paste -sd';')"
            return
        fi
        awk -v syms="$tmp/syms" -v sample="$i" '
            BEGIN {
                while ((getline line < syms) > 0) {
                    split(line, f, " ")
                    if (length(f[1]) == 16 && f[2] ~ /^[tT]$/) { n++; addr[n] = f[1]; name[n] = f[3] (f[4] != "" ? " " f[4] : "") }
                }
            }
            /^CPU#[0-9]+/ { cpu = $1 }
            /RIP=/ { match($0, /RIP=[0-9a-f]+/); rip = substr($0, RSTART + 4, RLENGTH - 4) }
            / CPL=[0-9]/ {
                match($0, /CPL=[0-9]/); cpl = substr($0, RSTART + 4, 1)
                match($0, /HLT=[0-9]/); hlt = substr($0, RSTART + 4, 1)
                best = ""; bestname = ""
                for (k = 1; k <= n; k++) if (addr[k] <= rip && addr[k] > best) { best = addr[k]; bestname = name[k] }
                printf "l1:   sample %d %s rip=%s cpl=%s hlt=%s%s\n", sample, cpu, rip, cpl, hlt, (bestname != "" && cpl == "0" ? " (L1 symbol, if in L1: " bestname ")" : "")
            }' <<< "$regs"
        sleep 1
    done
}
# What stopped L1 is best told by where its vCPUs are, and what virtiofsd (its root file
# system) is doing.
stopped_report() {
    local before
    before=$(wc -l < "$log")
    where_cpus
    if kill -0 "$fsd_pid" 2>/dev/null; then
        echo "l1:   virtiofsd (pid $fsd_pid) is running: $(ps -o stat=,wchan:32= -p "$fsd_pid" | tr -s ' ')"
    else
        echo "l1:   virtiofsd (pid $fsd_pid) has exited"
    fi
    if [ -s "$tmp/virtiofsd.log" ]; then tail -n 5 "$tmp/virtiofsd.log" | sed 's/^/l1:   virtiofsd: /'; fi
    echo "l1: last console lines:"
    head -n "$before" "$log" | tail -n 30 | tr -d '\r' | sed 's/^/l1:   /'
    # Which lock or wait: an NMI from the monitor reaches a vCPU even with its interrupts off,
    # and L1 (booted with unknown_nmi_panic) panics on it with that vCPU's stack (TCG gives L1
    # no NMI watchdog to do it by itself). `cont` first, for a VM stopped from the monitor.
    kill -0 "$qemu_pid" 2>/dev/null || return 0
    monitor cont > /dev/null
    monitor nmi > /dev/null
    for _ in $(seq 20); do
        tail -n +"$((before + 1))" "$log" | grep -aq 'Kernel panic' && break
        sleep 0.5
    done
    sleep 1
    if tail -n +"$((before + 1))" "$log" | grep -aq 'NMI'; then
        echo "l1: L1's kernel on an NMI sent then (the stack is what that vCPU was doing):"
        tail -n +"$((before + 1))" "$log" | tr -d '\r' | grep -av '^rootcell-l1: alive' | head -n 60 | sed 's/^/l1:   /'
    else
        echo "l1: no answer from L1's kernel to an NMI sent then (its vCPUs do not run)"
    fi
}
# Where L1 was when it reset itself: each vCPU's RIP by L1 kernel symbol, then QEMU's full
# register dump (CR2, CR3, RSP, segment bases: the stack-guard crash had a GS base not L1's own).
reset_report() {
    local regs
    where_cpus 1
    regs=$(monitor "info registers -a")
    echo "$regs" | grep -aE '^(CPU#|RAX|RSI|R8|R12|RIP|ES|CS|SS|DS|FS|GS|LDT|TR|GDT|IDT|CR0|DR[0-3]|EFER)' | sed 's/^/l1:   /'
    echo "l1: last console lines:"
    last_lines 30
}
printed=0 phase="booting L1 (no line from its /init yet)" booted= heard=$(date +%s) ready=
while :; do
    now=$(date +%s.%N)
    elapsed=$(echo "$now - $start" | bc)
    n=$(wc -l < "$log")
    if [ "$n" -gt "$printed" ]; then
        sed -n "$((printed + 1)),${n}p" "$log" | tr -d '\r'
        printed=$n heard=$(date +%s)
    fi
    if [ -z "$booted" ] && grep -q '^rootcell-l1: init:' "$log"; then
        booted=$(date +%s); phase="L1 init (modules, root file system, /dev/kvm check)"
    fi
    if [ "$fault" = stuck-fs ] && grep -q '^rootcell-l1: init: kvm_amd loaded' "$log"; then
        kill -STOP "$fsd_pid"; fault=stopped-fs
    fi
    if [ -z "$ready" ] && grep -q '^rootcell-l1: ready' "$log"; then
        ready=1; phase="running the command in L1"
    fi
    if [ "$fault" = freeze ] && grep -q '^freeze L1 now' "$log"; then
        monitor stop > /dev/null; fault=frozen
    fi
    if line=$(grep -a -m1 '^rootcell-l1: FAIL' "$log"); then
        lane_fail "${line#rootcell-l1: FAIL }"
    fi
    if line=$(grep -a -m1 '^rootcell-l1: RESULT' "$log"); then
        rc=${line#rootcell-l1: RESULT }
        rc=${rc%%[!0-9]*}
        echo "l1: command exited with $rc after $(printf '%.1f' "$elapsed") s in L1 (QEMU -accel $accel, -cpu max, -smp $smp)"
        exit "$rc"
    fi
    # A soft lockup in L1's kernel that lasts (seen: its KVM's kvm-pit worker and a vCPU thread
    # both stuck for good, reported every 28 s) stops everything in L1, the command's own bounds
    # included: say so once it is reported a third time, with the traces L1 prints (its /init
    # raises the console log level for them), rather than wait for --timeout. One report alone
    # may be L1 starved by a loaded host.
    if [ "$(grep -ac 'BUG: soft lockup' "$log")" -ge 3 ]; then
        line=$(grep -a 'BUG: soft lockup' "$log" | tail -1 | tr -d '\r' | sed 's/^\[ *[0-9.]*\] //')
        echo "l1: FAIL L1's kernel locked up while $phase ($line); L1 stopped; last console lines:"
        last_lines 60; exit 125
    fi
    # L1 ended itself (a triple fault: its kernel's reboot, after a panic or not) and is paused,
    # or QEMU exited. After its RESULT or FAIL line L1 always reboots: one written since the
    # checks above is for the next round.
    if { grep -aqs 'Triple fault' "$tmp/qemu-debug.log" || ! kill -0 "$qemu_pid" 2>/dev/null; } &&
        grep -aqE '^rootcell-l1: (RESULT|FAIL)' "$log"; then
        continue
    fi
    if grep -aqs 'Triple fault' "$tmp/qemu-debug.log"; then
        if line=$(grep -a -m1 -E 'Kernel panic|BUG: TASK stack guard' "$log"); then
            line=$(echo "$line" | tr -d '\r' | sed 's/^\[ *[0-9.]*\] //')
            echo "l1: FAIL L1's kernel crashed while $phase ($line); last console lines:"
            last_lines 40; exit 125
        fi
        echo "l1: FAIL L1 reset itself (a triple fault of L1's, no panic on its console) while $phase; L1's vCPUs at the fault:"
        reset_report; exit 125
    fi
    if ! kill -0 "$qemu_pid" 2>/dev/null; then
        wait "$qemu_pid" 2>/dev/null && qrc=0 || qrc=$?
        qemu_pid=
        # A panic of L1's kernel ends QEMU too (panic=-1 reboots, -no-reboot exits). Seen once:
        # `BUG: TASK stack guard page was hit` in a vcpu thread, page faults recursing on a %gs
        # access (a GS base not L1's own after leaving its guest), then `corrupted stack end`.
        if line=$(grep -a -m1 -E 'Kernel panic|BUG: TASK stack guard page' "$log"); then
            line=$(echo "$line" | tr -d '\r' | sed 's/^\[ *[0-9.]*\] //')
            echo "l1: FAIL L1's kernel crashed while $phase ($line); last console lines:"
            last_lines 40; exit 125
        fi
        echo "l1: FAIL QEMU exited ($qrc) while $phase: $(tail -n 2 "$tmp/qemu.log" | tr '\n' ' ')"
        last_lines; exit 125
    fi
    # Every vCPU of L1 stuck with interrupts off reports nothing (TCG gives L1 no NMI watchdog):
    # the heartbeat stops. Say where the vCPUs are, rather than wait for --timeout.
    if [ -n "$booted" ] && [ $(( $(date +%s) - heard )) -ge "$silence" ]; then
        echo "l1: FAIL L1 stopped responding: nothing on its console, its 30 s heartbeat included, for $silence s while $phase; where its vCPUs are:"
        stopped_report; exit 125
    fi
    # CI once saw L1's init stop after loading kvm_amd, for 900 s, with no line why. Init takes
    # seconds: one that still runs after minutes is stuck (a heartbeat alone means L1's kernel
    # still runs, so a step waits, on the root file system for one).
    if [ -n "$booted" ] && [ -z "$ready" ] && [ $(( $(date +%s) - booted )) -ge "$init_timeout" ]; then
        echo "l1: FAIL L1 init stuck: not ready to run the command $init_timeout s after its /init started; where its vCPUs are:"
        stopped_report; exit 125
    fi
    if [ -z "$booted" ] && [ "$(echo "$elapsed > $boot_timeout" | bc)" = 1 ]; then
        echo "l1: FAIL L1 did not come up: no line from its /init within ${boot_timeout} s; last console lines:"
        last_lines; exit 125
    fi
    if [ "$(echo "$elapsed > $timeout" | bc)" = 1 ]; then
        echo "l1: FAIL timed out after ${timeout} s while $phase; L1 stopped; last console lines:"
        last_lines 30; exit 125
    fi
    sleep 0.5
done
