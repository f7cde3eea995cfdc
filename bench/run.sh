#!/usr/bin/env bash
# Benchmarks rootcell against runc on the same busybox bundle, side by side in one run, and
# prints a table (medians and spreads). Numbers are printed, never asserted.
#
# Usage: bench/run.sh [N]        (N runs per case, default 10; needs scripts/build.sh first)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-10}
# shellcheck disable=SC1091
source "$top/build/env"
command -v runc >/dev/null || { echo "bench: runc not found (scripts/install-deps.sh installs it)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$top/images/make-rootfs.sh" "$work/bundle/rootfs" >/dev/null
jq '.process.args = ["/bin/true"] | .process.terminal = false' "$top/build/bundle/config.json" > "$work/bundle/config.json"

# Runs "$@" N times and prints median, min, max wall-clock milliseconds.
measure() {
    local times=()
    for i in $(seq "$n"); do
        local t0 t1
        t0=$(date +%s%N)
        "$@" "bench-$$-$i" >/dev/null 2>&1 || { echo "bench: '$*' failed" >&2; return 1; }
        t1=$(date +%s%N)
        times+=($(( (t1 - t0) / 1000000 )))
    done
    printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%d %d %d\n", m, a[1], a[NR]}'
}

rc=$(measure "$ROOTCELL_BIN" --root "$work/rc" run --bundle "$work/bundle")
runc_t=$(measure runc --root "$work/runc" run --bundle "$work/bundle")
read -r rc_med rc_min rc_max <<<"$rc"
read -r ru_med ru_min ru_max <<<"$runc_t"
accel=tcg; grep -qE 'vmx|svm' /proc/cpuinfo && accel=kvm
printf '\nrun /bin/true in the busybox bundle, %d runs each (guest accel: %s, %s cores)\n' "$n" "$accel" "$(nproc)"
printf '%-10s %10s %10s %10s\n' runtime "median ms" "min ms" "max ms"
printf '%-10s %10d %10d %10d\n' rootcell "$rc_med" "$rc_min" "$rc_max"
printf '%-10s %10d %10d %10d\n' runc "$ru_med" "$ru_min" "$ru_max"
awk -v a="$rc_med" -v b="$ru_med" 'BEGIN { if (b > 0) printf "ratio rootcell/runc (median): %.1fx\n", a / b }'
