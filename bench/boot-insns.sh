#!/usr/bin/env bash
# Guest boot work in guest instructions, counted by a QEMU TCG plugin (bench/insn-count.c): a
# count that does not depend on host speed or load, so it carries over to hardware KVM (at roughly
# 1-3 instructions per ns there). For each kernel it prints:
#   - bare: kernel entry to /init, with a one-line busybox /init (kernel work only);
#   - rootcell: one `rootcell run /bin/true` through the runtime, with instructions at /init,
#     at the agent's first vsock accept (agent ready: it waits for the host), at the container
#     process's exec, and in total up to QEMU's exit.
# Kernels: ours ($ROOTCELL_KERNEL with $ROOTCELL_VMLINUX) and Debian's cloud config built by
# images/build-cloud-kernel.sh, if its cache entry exists (BUILD_CLOUD=1 builds it first: 20+ min).
#
# Usage: bench/boot-insns.sh
# Env:   ICOUNT=shift=3,sleep=off adds -icount (guest clock counts instructions; shift=0 stalls the
#        boot of these kernels in timer calibration under microvm, see bench/README.md).
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
cc -shared -fPIC -O2 -o "$work/insn-count.so" "$top/bench/insn-count.c"
make_bundle "$work/bundle" /bin/true

# A busybox initramfs whose /init only reboots: the kernel's own boot work, nothing else.
mkdir -p "$work/bb/bin" "$work/bb/dev" "$work/bb/proc"
cp /bin/busybox "$work/bb/bin/"
printf '#!/bin/busybox sh\n/bin/busybox reboot -f\n' > "$work/bb/init"
chmod +x "$work/bb/init"
(cd "$work/bb" && find . | cpio -o -H newc -R 0:0 --quiet | gzip) > "$work/bb.cpio.gz"

kernels=("ours|$ROOTCELL_KERNEL|$ROOTCELL_VMLINUX")
cloud_dir=""
if [ "${BUILD_CLOUD:-0}" = 1 ]; then
    cloud_dir=$("$top/images/build-cloud-kernel.sh")
else
    cloud_dir=$(ls -d "${ROOTCELL_CACHE:-/var/cache/rootcell}"/cloud-kernel-*/ 2>/dev/null | grep -v build- | head -1 || true)
fi
[ -n "$cloud_dir" ] && [ -f "$cloud_dir/bzImage" ] && kernels+=("debian-cloud|$cloud_dir/bzImage|$cloud_dir/vmlinux")

# marks VMLINUX: the plugin's mark= arguments for the kernel functions used as fixed points, and
# the kernel's entry after the bzImage decompressor (startup_64, still at its physical address).
marks() {
    nm "$1" | awk '$3 == "run_init_process" || $3 == "vsock_accept" || $3 == "bprm_execve" {printf ",mark=%s@%s", $3, $1}'
    local entry
    entry=$(nm "$1" | awk '$3 == "startup_64" {print $1; exit}')
    if [ -n "$entry" ]; then printf ',mark=kernel_entry@%x' $(( 0x$entry - 0xffffffff80000000 )); fi
}
# hit FILE NAME N: instruction count at the Nth entry of NAME ("-" if never reached).
hit() { awk -v m="$2" -v n="$3" '$1 == "mark" && $2 == m && $3 == n {print $4; f=1} END {if (!f) print "-"}' "$1"; }
total() { awk '$1 == "total" {print $2}' "$1"; }
mega() { awk -v x="$1" 'BEGIN { if (x == "-" || x == "") print "-"; else printf "%.1f", x / 1e6 }'; }
icount=()
[ -n "${ICOUNT:-}" ] && icount=(-icount "$ICOUNT")

printf '\nguest instructions (millions) to fixed points of the boot, counted by a TCG plugin%s\nmachine: %s\n' \
    "${ICOUNT:+ with -icount $ICOUNT}" "$(machine)"
printf '%-13s %-9s %10s %10s %10s %10s %10s %12s\n' kernel guest decompress "to /init" "agent rdy" "container" total "bzImage KiB"
for k in "${kernels[@]}"; do
    IFS='|' read -r name bz vml <<<"$k"
    [ -f "$vml" ] || { echo "bench: $vml missing (needed for symbol addresses)" >&2; continue; }
    m=$(marks "$vml")
    size=$(( $(stat -c %s "$bz") / 1024 ))

    out="$work/$name-bare.txt"
    timeout 600 qemu-system-x86_64 -M microvm,acpi=off,x-option-roms=off,rtc=on -accel tcg -cpu max -smp 1 -m 512M \
        -nodefaults -no-user-config -nographic -no-reboot -serial "file:$work/$name-bare.console" \
        -kernel "$bz" -initrd "$work/bb.cpio.gz" -append "console=ttyS0 reboot=t panic=-1 quiet nokaslr" \
        "${icount[@]}" -plugin "$work/insn-count.so$m,out=$out" >/dev/null 2>&1 || true
    printf '%-13s %-9s %10s %10s %10s %10s %10s %12s\n' "$name" bare "$(mega "$(hit "$out" kernel_entry 1)")" \
        "$(mega "$(hit "$out" run_init_process 1)")" - - "$(mega "$(total "$out")")" "$size"

    out="$work/$name-rootcell.txt"
    ROOTCELL_KERNEL=$bz ROOTCELL_KERNEL_ARGS="nokaslr" ROOTCELL_QEMU="$top/bench/qemu-wrap.sh" BENCH_RTC_ON=1 \
        BENCH_QEMU_EXTRA="${icount[*]} -plugin $work/insn-count.so$m,out=$out" \
        timeout 600 "$ROOTCELL_BIN" --root "$work/state-rc" run --bundle "$work/bundle" "insn-$name-$$" >/dev/null 2>"$work/err" \
        || { echo "bench: rootcell run with $name failed: $(tail -3 "$work/err")" >&2; }
    # bprm_execve: the 1st is the agent as /init; the last one before exit is the container process.
    last_exec=$(awk '$1 == "mark" && $2 == "bprm_execve" {x = $4} END {print x}' "$out")
    printf '%-13s %-9s %10s %10s %10s %10s %10s\n' "$name" rootcell "$(mega "$(hit "$out" kernel_entry 1)")" "$(mega "$(hit "$out" run_init_process 1)")" \
        "$(mega "$(hit "$out" vsock_accept 1)")" "$(mega "$last_exec")" "$(mega "$(total "$out")")"
done
echo "(millions of instructions since reset, cumulative; rootcell rows run with microvm rtc=on, see bench/README.md)"
