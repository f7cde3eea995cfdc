#!/usr/bin/env bash
# Warm starts from the VM pool (issue 15), side by side in one run: `run /bin/true` warm (a VM
# taken from `rootcell pool serve`), cold (ROOTCELL_POOL=off: a VM booted for it), runc and gVisor's
# runsc; `docker run --rm IMAGE true` warm, cold and with runc; and the host memory of a ready
# pool VM. Before each warm run the pool is given time to refill, so each run measures a claim,
# not a wait for a boot. Prints medians, spreads and ratios; asserts nothing.
#
# Usage: bench/pool.sh [N]     (N runs per case, default 10; needs scripts/build.sh first)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
n=${1:-10}
command -v runc >/dev/null || { echo "bench: runc not found (scripts/install-deps.sh installs it)" >&2; exit 1; }
make_bundle "$work/bundle" /bin/true

# The pool: its own directory and config, 2 VMs of 512 MiB / 1 vCPU.
export ROOTCELL_POOL_DIR="$work/pool"
echo '{"pool": {"vms": [{"memory_mib": 512, "vcpus": 1, "count": 2}]}}' > "$work/pool-config.json"
ROOTCELL_CONFIG="$work/pool-config.json" "$ROOTCELL_BIN" --log "$work/pool.log" pool serve &
pool_pid=$!
stop_pool() { kill -TERM "$pool_pid" 2>/dev/null || true; wait "$pool_pid" 2>/dev/null || true; }
ready() { "$ROOTCELL_BIN" pool status 2>/dev/null | jq -r '.shapes[0].ready' 2>/dev/null || echo 0; }
wait_ready() {
    local i
    for i in $(seq 600); do [ "$(ready)" = 2 ] && return 0; sleep 0.5; done
    echo "bench: the pool did not get 2 VMs ready in 300 s; see $work/pool.log" >&2; return 1
}
# time_cmd CMD... : one wall-clock measurement in ms of "CMD... ID".
time_cmd() {
    local t0
    t0=$(now_ms)
    "$@" "bench-$$-$RANDOM$RANDOM" >/dev/null 2>"$work/err" || { echo "bench: '$*' failed: $(tail -3 "$work/err")" >&2; return 1; }
    echo $(( $(now_ms) - t0 ))
}
wait_ready
pool_boot_s=$(grep -o 'boot_ms=[0-9]*' "$work/pool.log" | head -1 | cut -d= -f2)

# Host memory of one ready VM: holder + hypervisor, RSS (the guest's touched RAM included).
mem_kib=0
for h in $(pgrep -f "pool vm --name" || true); do
    grep -q "$ROOTCELL_POOL_DIR" "/proc/$h/cmdline" 2>/dev/null || continue
    for p in "$h" $(pgrep -P "$h" || true); do
        mem_kib=$(( mem_kib + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
    done
done

warm=$(for _ in $(seq "$n"); do wait_ready >/dev/null; time_cmd "$ROOTCELL_BIN" --root "$work/state-rc" run --bundle "$work/bundle"; done | stats)
cold=$(for _ in $(seq "$n"); do ROOTCELL_POOL=off time_cmd "$ROOTCELL_BIN" --root "$work/state-rc" run --bundle "$work/bundle"; done | stats)
runc_t=$(for _ in $(seq "$n"); do time_cmd runc --root "$work/state-runc" run --bundle "$work/bundle"; done | stats)
if command -v runsc >/dev/null; then
    runsc_t=$(for _ in $(seq "$n"); do time_cmd runsc --root "$work/state-runsc" --network none run --bundle "$work/bundle"; done | stats)
else
    runsc_t="- - -"
fi
claims=$("$ROOTCELL_BIN" pool status | jq -r '.shapes[0].claims_total')

# Docker: the same daemon, rootcell warm (the pool's env reaches the runtime through dockerd),
# rootcell cold (a wrapper that turns the pool off), runc.
printf '#!/bin/sh\nROOTCELL_POOL=off exec %q "$@"\n' "$ROOTCELL_BIN" > "$work/rootcell-cold"
chmod +x "$work/rootcell-cold"
dockerd_extra_args="--add-runtime rootcell-cold=$work/rootcell-cold"
trap 'stop_pool' EXIT
# shellcheck source=bench/dockerd.sh
source "$(dirname "$0")/dockerd.sh"
trap 'stop_pool; stop_dockerd' EXIT
dk run --rm --runtime runc rootcell-bench:busybox true >/dev/null
dtime() { local t0; t0=$(now_ms); dk run --rm --runtime "$1" rootcell-bench:busybox true >/dev/null; echo $(( $(now_ms) - t0 )); }
d_warm=$(for _ in $(seq "$n"); do wait_ready >/dev/null; dtime rootcell; done | stats)
d_cold=$(for _ in $(seq "$n"); do dtime rootcell-cold; done | stats)
d_runc=$(for _ in $(seq "$n"); do dtime runc; done | stats)

echo
echo "VM pool: warm against cold starts, $n runs each"
echo "machine: $(machine)"
echo "pool: 2 VMs of 512 MiB / 1 vCPU, backend $("$ROOTCELL_BIN" pool status | jq -r .backend); first VM booted in ${pool_boot_s:-?} ms; $claims claims served"
printf 'host memory of a ready pool VM (holder + hypervisor RSS): %d MiB (both VMs: %d MiB)\n' $(( mem_kib / 2 / 1024 )) $(( mem_kib / 1024 ))
printf '%-28s %10s %10s %10s\n' case "median ms" "min ms" "max ms"
row() { read -r m lo hi <<<"$2"; printf '%-28s %10s %10s %10s\n' "$1" "$m" "$lo" "$hi"; }
row "run /bin/true warm" "$warm"
row "run /bin/true cold" "$cold"
row "run /bin/true runc" "$runc_t"
row "run /bin/true runsc" "$runsc_t"
row "docker run --rm true warm" "$d_warm"
row "docker run --rm true cold" "$d_cold"
row "docker run --rm true runc" "$d_runc"
ratio() { awk -v a="${2%% *}" -v b="${3%% *}" -v l="$1" 'BEGIN { if (b > 0 && a != "-") printf "%s: %.2fx\n", l, a / b }'; }
ratio "cold/warm (run)" "$cold" "$warm"
ratio "warm/runc (run)" "$warm" "$runc_t"
ratio "warm/runsc (run)" "$warm" "$runsc_t"
ratio "docker warm/runc" "$d_warm" "$d_runc"
ratio "docker cold/warm" "$d_cold" "$d_warm"
