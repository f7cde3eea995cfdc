#!/usr/bin/env bash
# Start rate: N `rootcell run /bin/true` with P of them in flight at once (default 8 and 2), and
# the same with runc; prints containers per second.
#
# Usage: bench/rate.sh [N] [P]
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
n=${1:-8}
p=${2:-2}
make_bundle "$work/bundle" /bin/true

# burst CMD... : runs "CMD... ID" for N ids, P at a time; prints "containers/s seconds failures".
burst() {
    local t0 t1 fails
    t0=$(now_ms)
    fails=$(seq "$n" | xargs -P "$p" -I{} sh -c '"$@" "rate-$$-{}" >/dev/null 2>&1 || echo x' _ "$@" | wc -l)
    t1=$(now_ms)
    awk -v n="$n" -v ms="$((t1 - t0))" -v f="$fails" 'BEGIN { printf "%.2f %.1f %d\n", (n - f) * 1000 / ms, ms / 1000, f }'
}

printf '\n%d containers (`run /bin/true`), %d in parallel\nmachine: %s\n' "$n" "$p" "$(machine)"
printf '%-10s %14s %10s %9s\n' runtime "containers/s" seconds failures
read -r r s f < <(burst "$ROOTCELL_BIN" --root "$work/state-rc" run --bundle "$work/bundle")
printf '%-10s %14s %10s %9s\n' rootcell "$r" "$s" "$f"
if command -v runc >/dev/null; then
    read -r r s f < <(burst runc --root "$work/state-runc" run --bundle "$work/bundle")
    printf '%-10s %14s %10s %9s\n' runc "$r" "$s" "$f"
fi
