#!/usr/bin/env bash
# Guest boot work in guest instructions, counted by a QEMU TCG plugin (bench/insn-count.c): a
# count that does not depend on host speed, so it carries over to hardware KVM far better than a
# TCG wall time does (see bench/README.md for what does not carry over). For each kernel and each
# set of extra kernel arguments it prints, as median (min-max) of N runs:
#   - bare: kernel entry to /init, with a busybox /init that only reboots (kernel work only);
#   - rootcell: `rootcell run /bin/true` through the runtime, with instructions at the end of the
#     bzImage decompressor, at /init, at the agent's first vsock accept (agent ready: it waits for
#     the host there), of which rep-string repeats, and the host wall time to agent ready;
# then the ratios of every row to the first one (our kernel as the runtime boots it).
# Kernels: ours ($ROOTCELL_KERNEL with $ROOTCELL_VMLINUX) and Debian's cloud config built by
# images/build-cloud-kernel.sh, if its cache entry exists (BUILD_CLOUD=1 builds it first: 1 h+).
#
# Usage: bench/boot-insns.sh [N]        (N runs per row, default 3)
# Env:   BOOT_ARGS="ARGS|ARGS..."  extra kernel argument sets to compare, each against none; e.g.
#        BOOT_ARGS="lpj=1000000" adds one row per kernel with lpj= (default: none)
#        CLOUD_KERNEL_DIR=DIR     the comparison kernel (bzImage + vmlinux) instead of the cache
#        PROFILE=K                also print the K costliest kernel functions of a bare boot
#        ICOUNT=shift=7,sleep=off (default) runs the guest clock off the instruction count, so the
#        kernel's timed busy-waits (delay-loop, APIC timer and TSC calibration) cost the same on
#        every host and the count repeats to 0.1 M; it needs microvm rtc=on (shift=0 stalls the
#        boot of these kernels in timer calibration, see bench/README.md). ICOUNT=none: plain TCG,
#        rtc=off as the runtime runs, and counts that grow with host speed.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
n=${1:-3}
cc -shared -fPIC -O2 -o "$work/insn-count.so" "$top/bench/insn-count.c"
make_bundle "$work/bundle" /bin/true

# A busybox initramfs whose /init only reboots, uncompressed like the runtime's: the kernel's own
# boot work, nothing else.
mkdir -p "$work/bb/bin" "$work/bb/dev" "$work/bb/proc"
cp /bin/busybox "$work/bb/bin/"
printf '#!/bin/busybox sh\n/bin/busybox reboot -f\n' > "$work/bb/init"
chmod +x "$work/bb/init"
(cd "$work/bb" && find . | cpio -o -H newc -R 0:0 --quiet) > "$work/bb.cpio"

kernels=("ours|$ROOTCELL_KERNEL|${ROOTCELL_VMLINUX:-$(dirname "$ROOTCELL_KERNEL")/vmlinux}")
cloud_dir=${CLOUD_KERNEL_DIR:-}
if [ -z "$cloud_dir" ] && [ "${BUILD_CLOUD:-0}" = 1 ]; then
    cloud_dir=$(nice -n 19 "$top/images/build-cloud-kernel.sh")
elif [ -z "$cloud_dir" ]; then
    cloud_dir=$(ls -td "${ROOTCELL_CACHE:-/var/cache/rootcell}"/cloud-kernel-*/ 2>/dev/null | grep -v /cloud-kernel-build- | head -1 || true)
fi
if [ -n "$cloud_dir" ] && [ -f "$cloud_dir/bzImage" ]; then
    kernels+=("debian-cloud|$cloud_dir/bzImage|$cloud_dir/vmlinux")
else
    echo "bench: no Debian cloud kernel built (BUILD_CLOUD=1 or images/build-cloud-kernel.sh); our kernel only" >&2
fi
arg_sets=("")
if [ -n "${BOOT_ARGS:-}" ]; then IFS='|' read -r -a more <<<"$BOOT_ARGS"; arg_sets+=("${more[@]}"); fi

# The runtime's microvm has rtc=off; -icount needs rtc=on (bench/README.md).
rtc=off icount=()
ICOUNT=${ICOUNT:-shift=7,sleep=off}
if [ "$ICOUNT" != none ]; then icount=(-icount "$ICOUNT"); rtc=on; else ICOUNT=""; fi

# marks VMLINUX: the plugin's mark= arguments for the kernel functions used as fixed points, and
# the kernel's entry after the bzImage decompressor (startup_64, still at its physical address).
marks() {
    nm "$1" | awk '$3 == "run_init_process" || $3 == "vsock_accept" || $3 == "bprm_execve" {printf ",mark=%s@%s", $3, $1}'
    local entry
    entry=$(nm "$1" | awk '$3 == "startup_64" {print $1; exit}')
    if [ -n "$entry" ]; then printf ',mark=kernel_entry@%x' $(( 0x$entry - 0xffffffff80000000 )); fi
}
# field FILE NAME N COL: column COL (4 = instructions, 5 = host ms, 6 = rep-string repeats) of
# the Nth entry of mark NAME, empty if never reached.
field() { awk -v m="$2" -v n="$3" -v c="$4" '$1 == "mark" && $2 == m && $3 == n {print $c}' "$1"; }
mega() { awk '{printf "%.1f\n", $1 / 1e6}'; }
# col NAME N COL FILTER FILE...: field NAME N COL of every FILE, through FILTER (mega or cat).
col() { local f; for f in "${@:5}"; do field "$f" "$1" "$2" "$3"; done | "$4"; }
# summary: reads numbers, prints "median (min-max)" or "-".
summary() { stats | awk '$1 == "-" {print "-"; next} {printf "%s (%s-%s)\n", $1, $2, $3}'; }
median() { stats | cut -d' ' -f1; }

# boot_bare BZ MARKS ARGS OUT [PROFILE]: one bare boot under the plugin.
boot_bare() {
    local prof=""
    [ -n "${5:-}" ] && prof=",profile=$5"
    timeout 600 qemu-system-x86_64 -M "microvm,acpi=off,x-option-roms=off,rtc=$rtc" -accel tcg -cpu max -smp 1 -m 512M \
        -nodefaults -no-user-config -nographic -no-reboot -serial "file:$4.console" \
        -kernel "$1" -initrd "$work/bb.cpio" -append "console=ttyS0 reboot=t panic=-1 quiet nokaslr $3" \
        "${icount[@]}" -plugin "$work/insn-count.so$2,out=$4$prof" >/dev/null 2>&1 || true
}

# boot_rootcell BZ MARKS ARGS OUT: one `rootcell run /bin/true` under the plugin.
boot_rootcell() {
    local rtc_on=0
    [ "$rtc" = on ] && rtc_on=1
    ROOTCELL_KERNEL=$1 ROOTCELL_KERNEL_ARGS="nokaslr $3" ROOTCELL_QEMU="$top/bench/qemu-wrap.sh" ROOTCELL_JAIL=0 BENCH_RTC_ON=$rtc_on \
        BENCH_QEMU_EXTRA="${icount[*]} -plugin $work/insn-count.so$2,out=$4" \
        timeout 600 "$ROOTCELL_BIN" --root "$work/state-rc" run --bundle "$work/bundle" "insn-$$-$RANDOM" >/dev/null 2>"$work/err" \
        || echo "bench: rootcell run with $1 $3 failed: $(tail -3 "$work/err")" >&2
}

# profile VMLINUX OUT K: the K costliest functions of a profile=... run, with their rep-string share.
profile() {
    { nm "$1" | awk '$2 ~ /^[tTwW]$/ {print $1, "S", $3}'
      awk '$1 == "block" {a = $2; while (length(a) < 16) a = "0" a; print a, "B", $3, $4}' "$2"; } |
    LC_ALL=C sort -k1,1 -k2,2r | awk -v k="$3" '
        $2 == "S" {fn = $3; next}
        {f = ($1 < "ffffffff00000000") ? "(decompressor, physical addresses)" : fn; c[f] += $3; if ($4 == 1) r[f] += $3}
        END {for (f in c) printf "%10.2f %10.2f  %s\n", c[f] / 1e6, r[f] / 1e6, f}' | sort -rn | awk -v k="$3" 'NR <= k'
}

printf '\nguest instructions (millions) to fixed points of the boot, counted by a TCG plugin%s; median (min-max) of %s runs\nmachine: %s\n' \
    "${ICOUNT:+ with -icount $ICOUNT}" "$n" "$(machine)"
printf '%-13s %-28s %-9s %7s %20s %20s %20s %18s %16s\n' kernel "extra args" guest decomp "to /init" "agent ready" \
    "of which rep-str" "wall ms to ready" "bzImage KiB"
ref_ready="" ref_norep="" ref_wall=""
declare -A row_ready row_norep row_wall
for k in "${kernels[@]}"; do
    IFS='|' read -r name bz vml <<<"$k"
    [ -f "$vml" ] || { echo "bench: $vml missing (needed for symbol addresses)" >&2; continue; }
    m=$(marks "$vml")
    size=$(( $(stat -c %s "$bz") / 1024 ))
    for a in "${!arg_sets[@]}"; do
        args=${arg_sets[$a]} label=${arg_sets[$a]:--}
        bare=() rc=()
        for i in $(seq "$n"); do
            # The plugin appends to its output file: a fresh name for every run.
            out="$work/$name-$a-bare-$i.txt"; rm -f "$out"
            boot_bare "$bz" "$m" "$args" "$out"
            bare+=("$out")
            out="$work/$name-$a-rc-$i.txt"; rm -f "$out"
            boot_rootcell "$bz" "$m" "$args" "$out"
            rc+=("$out")
        done
        printf '%-13s %-28s %-9s %7s %20s %20s %20s %18s %16s\n' "$name" "$label" bare \
            "$(col kernel_entry 1 4 mega "${bare[@]}" | median)" "$(col run_init_process 1 4 mega "${bare[@]}" | summary)" \
            - - - "$size"
        ready=$(col vsock_accept 1 4 cat "${rc[@]}" | median)
        norep=$(for f in "${rc[@]}"; do awk '$1 == "mark" && $2 == "vsock_accept" && $3 == 1 {print $4 - $6}' "$f"; done | median)
        wall=$(col vsock_accept 1 5 cat "${rc[@]}" | median)
        printf '%-13s %-28s %-9s %7s %20s %20s %20s %18s\n' "$name" "$label" rootcell \
            "$(col kernel_entry 1 4 mega "${rc[@]}" | median)" "$(col run_init_process 1 4 mega "${rc[@]}" | summary)" \
            "$(col vsock_accept 1 4 mega "${rc[@]}" | summary)" "$(col vsock_accept 1 6 mega "${rc[@]}" | summary)" \
            "$(col vsock_accept 1 5 cat "${rc[@]}" | summary)"
        key="$name $label"
        row_ready[$key]=$ready row_norep[$key]=$norep row_wall[$key]=$wall
        [ -z "$ref_ready" ] && { ref_ready=$ready ref_norep=$norep ref_wall=$wall ref_key=$key; }
    done
done
[ "${#row_ready[@]}" -gt 1 ] &&
    printf '\nagainst %s (medians):  %-22s %-22s %-22s\n' "$ref_key" "instructions to ready" "without rep-str repeats" "wall time to ready"
for key in "${!row_ready[@]}"; do
    [ "$key" = "$ref_key" ] && continue
    awk -v k="$key" -v a="${row_ready[$key]}" -v b="$ref_ready" -v c="${row_norep[$key]}" -v d="$ref_norep" \
        -v e="${row_wall[$key]}" -v f="$ref_wall" 'function r(x, y) {return (x == "" || y == "" || x == "-" || y == "-" || y == 0) ? "-" : sprintf("%.2fx (%+.1f M)", x / y, (x - y) / 1e6)}
        BEGIN {w = (e == "" || f == "" || e == "-" || f == "-" || f == 0) ? "-" : sprintf("%.2fx (%+d ms)", e / f, e - f)
               printf "  %-41s %-22s %-22s %-22s\n", k, r(a, b), r(c, d), w}'
done | sort
echo "(millions of instructions since reset, cumulative; wall ms: host time from QEMU start under TCG with the plugin, load-dependent)"

if [ -n "${PROFILE:-}" ]; then
    for k in "${kernels[@]}"; do
        IFS='|' read -r name bz vml <<<"$k"
        rm -f "$work/$name-prof.txt"
        boot_bare "$bz" "$(marks "$vml")" "${arg_sets[-1]}" "$work/$name-prof.txt" 200000
        printf '\n%s, bare boot with "%s": costliest functions (millions of instructions, of which rep-string repeats)\n' \
            "$name" "${arg_sets[-1]}"
        profile "$vml" "$work/$name-prof.txt" "$PROFILE"
    done
fi
