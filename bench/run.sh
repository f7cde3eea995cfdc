#!/usr/bin/env bash
# Benchmarks rootcell against runc on the same busybox bundle, side by side in one run, and
# prints a table (medians and spreads). Numbers are printed, never asserted.
#
# Usage: bench/run.sh [N]        (N runs per case, default 10; needs scripts/build.sh first)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
n=${1:-10}
command -v runc >/dev/null || { echo "bench: runc not found (scripts/install-deps.sh installs it)" >&2; exit 1; }
make_bundle "$work/bundle" /bin/true

# measure NAME CMD... : runs "CMD... ID" N times, prints "median min max" wall-clock ms.
measure() {
    local i t0 t1
    for i in $(seq "$n"); do
        t0=$(date +%s%N)
        "$@" "bench-$$-$i" >/dev/null 2>"$work/err" || { echo "bench: '$*' failed: $(tail -3 "$work/err")" >&2; return 1; }
        t1=$(date +%s%N)
        echo $(( (t1 - t0) / 1000000 ))
    done | stats
}

load_before=$(cut -d' ' -f1 /proc/loadavg)
read -r rc_med rc_min rc_max < <(measure "$ROOTCELL_BIN" --root "$work/state-rc" run --bundle "$work/bundle")
read -r ru_med ru_min ru_max < <(measure runc --root "$work/state-runc" run --bundle "$work/bundle")
printf '\nrun /bin/true in the busybox bundle, %d runs each\nmachine: %s (1-min load before: %s)\n' "$n" "$(machine)" "$load_before"
printf '%-10s %10s %10s %10s\n' runtime "median ms" "min ms" "max ms"
printf '%-10s %10s %10s %10s\n' rootcell "$rc_med" "$rc_min" "$rc_max"
printf '%-10s %10s %10s %10s\n' runc "$ru_med" "$ru_min" "$ru_max"
awk -v a="$rc_med" -v b="$ru_med" 'BEGIN { if (b > 0) printf "ratio rootcell/runc (median): %.1fx\n", a / b }'
