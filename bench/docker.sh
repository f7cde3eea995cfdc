#!/usr/bin/env bash
# `docker run --rm IMAGE true` with --runtime rootcell against --runtime runc, side by side in one
# run, on a private dockerd (its own data-root, exec-root and socket in a scratch directory; stopped
# on exit). Prints medians, spreads and the ratio; asserts nothing.
#
# Usage: bench/docker.sh [N]      (N runs per runtime, default 5)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
n=${1:-5}
# shellcheck source=bench/dockerd.sh
source "$(dirname "$0")/dockerd.sh"

time_runs() {
    local runtime=$1 t0
    for _ in $(seq "$n"); do
        t0=$(now_ms)
        dk run --rm --runtime "$runtime" rootcell-bench:busybox true >/dev/null
        echo $(( $(now_ms) - t0 ))
    done | stats
}
dk run --rm --runtime runc rootcell-bench:busybox true >/dev/null   # warm the image layers
read -r rc_med rc_min rc_max <<<"$(time_runs rootcell)"
read -r ru_med ru_min ru_max <<<"$(time_runs runc)"

echo
echo "docker run --rm IMAGE true, $n runs each"
echo "machine: $(machine)"
printf '%-10s %10s %10s %10s\n' runtime "median ms" "min ms" "max ms"
printf '%-10s %10s %10s %10s\n' rootcell "$rc_med" "$rc_min" "$rc_max"
printf '%-10s %10s %10s %10s\n' runc "$ru_med" "$ru_min" "$ru_max"
awk -v a="$rc_med" -v b="$ru_med" 'BEGIN { if (b > 0) printf "ratio rootcell/runc (median): %.1fx\n", a / b }'
