#!/usr/bin/env bash
# Both backends on a real KVM, side by side in one L1 guest (scripts/l1.sh: QEMU TCG `-cpu max`,
# kvm_amd in L1): the built-in VMM against QEMU `-accel kvm`. Prints, per backend:
#   - VMM start to agent ready: the runtime's vm_start + agent_ready spans (`--debug`), median of N
#   - `run /bin/true` wall time, median (min-max) of N
#   - KVM exits during one boot to agent ready + container create, by reason (L1's KVM debugfs
#     counters of that VM, read while it idles)
#   - host memory of the container's processes (sandbox + VMM or QEMU): RSS beyond guest RAM
#     (RssAnon + RssFile) and guest RAM touched (RssShmem: guest RAM is a shared memfd)
# Figures only, nothing asserted. L1 runs on an emulated CPU: absolute times are far above what
# hardware gives; the comparison between backends in the same L1 is the point.
#
# Usage: bench/nested.sh [RUNS]     (default 3)
# Inside L1 (what scripts/l1.sh runs): bench/nested.sh --in-l1 RUNS
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "${1:-}" != --in-l1 ]; then
    runs=${1:-3}
    exec "$here/../scripts/l1.sh" --timeout 2400 -- "$here/nested.sh --in-l1 $runs"
fi
runs=${2:-3}
# shellcheck source=bench/lib.sh
source "$here/lib.sh"
make_bundle "$work/bundle" /bin/true
make_bundle "$work/idle" sleep 600

printf '\nboth backends on L1'"'"'s KVM (nested under QEMU TCG), %d runs each\nL1: %s\n' "$runs" "$(machine)"
declare -A res=()
for hv in builtin qemu; do
    for i in $(seq "$runs"); do
        log="$work/$hv-$i.log"
        t0=$(now_ms)
        rc --hypervisor "$hv" --debug --log "$log" run --bundle "$work/bundle" "nb-$hv-$i" >/dev/null 2>&1 ||
            { echo "bench: $hv run failed; log:" >&2; tail -5 "$log" >&2; exit 1; }
        echo "$(( $(now_ms) - t0 ))" >> "$work/$hv-wall"
        grep -oE 'span=(vm_start|agent_ready) elapsed_ms=[0-9.]+' "$log" | sed -E 's/.*=//' |
            awk '{s += $1} END {print s}' >> "$work/$hv-ready"
    done
    res[$hv-ready]=$(stats < "$work/$hv-ready")
    res[$hv-wall]=$(stats < "$work/$hv-wall")

    # One container idling: the VM's KVM counters and the processes' memory.
    id="ni-$hv"
    rc --hypervisor "$hv" create --bundle "$work/idle" "$id" >/dev/null 2>&1 < /dev/null ||
        { echo "bench: $hv create failed" >&2; exit 1; }
    pid=$(rc state "$id" | jq -r .pid)
    vmdirs=(/sys/kernel/debug/kvm/*-*/)
    [ ${#vmdirs[@]} = 1 ] && [ -d "${vmdirs[0]}" ] ||
        { echo "bench: expected one VM in L1's /sys/kernel/debug/kvm, found ${#vmdirs[@]}" >&2; exit 1; }
    for f in exits io_exits mmio_exits halt_exits irq_exits irq_window_exits nmi_window_exits \
             signal_exits request_irq_exits insn_emulation hypercalls; do
        [ -f "${vmdirs[0]}$f" ] && res[$hv-exit-$f]=$(cat "${vmdirs[0]}$f")
    done
    # The VMM (the built-in VMM's process, or QEMU) is the sandbox's child.
    pids="$pid $(pgrep -P "$pid" | tr '\n' ' ' || true)"
    anon=0 file=0 shmem=0
    for p in $pids; do
        read -r a f s < <(awk '/^RssAnon/ {a=$2} /^RssFile/ {f=$2} /^RssShmem/ {s=$2} END {print a+0, f+0, s+0}' "/proc/$p/status")
        anon=$((anon + a)) file=$((file + f)) shmem=$((shmem + s))
    done
    res[$hv-mem]="$(( (anon + file) / 1024 )) $(( shmem / 1024 )) $(echo "$pids" | wc -w)"
    rc delete --force "$id" >/dev/null 2>&1 || true
done

printf '\n%-44s %22s %22s\n' "" "builtin (rootcell VMM)" "qemu -accel kvm"
row() { printf '%-44s %22s %22s\n' "$1" "$2" "$3"; }
fmt() { read -r m lo hi <<<"$1"; echo "$m ($lo-$hi)"; }
row "VMM start -> agent ready, ms (median, min-max)" "$(fmt "${res[builtin-ready]}")" "$(fmt "${res[qemu-ready]}")"
row "run /bin/true wall, ms (median, min-max)" "$(fmt "${res[builtin-wall]}")" "$(fmt "${res[qemu-wall]}")"
for f in exits io_exits mmio_exits halt_exits irq_exits irq_window_exits nmi_window_exits signal_exits \
         request_irq_exits insn_emulation hypercalls; do
    row "KVM $f (one boot + create)" "${res[builtin-exit-$f]:--}" "${res[qemu-exit-$f]:--}"
done
read -r bm bs bn <<<"${res[builtin-mem]}"; read -r qm qs qn <<<"${res[qemu-mem]}"
row "host RSS beyond guest RAM, MiB (processes)" "$bm ($bn)" "$qm ($qn)"
row "guest RAM touched (RssShmem), MiB" "$bs" "$qs"
