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
docker_bin=/usr/bin/docker
[ -x /usr/sbin/dockerd ] && [ -x "$docker_bin" ] || { echo "bench: Debian's docker.io is needed (scripts/install-deps.sh)" >&2; exit 1; }

d="$work/docker"
mkdir -p "$d"
sock="$d/docker.sock"
/usr/sbin/dockerd --data-root "$d/data" --exec-root "$d/exec" --pidfile "$d/dockerd.pid" \
    --host "unix://$sock" --add-runtime "rootcell=$ROOTCELL_BIN" >"$d/dockerd.log" 2>&1 &
dockerd_pid=$!
stop_dockerd() {
    local ids
    ids=$("$docker_bin" --host "unix://$sock" ps -aq 2>/dev/null || true)
    [ -n "$ids" ] && "$docker_bin" --host "unix://$sock" rm -f $ids >/dev/null 2>&1 || true
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
    umount -R -l "$d/data" "$d/exec" 2>/dev/null || true
    bench_cleanup
}
trap stop_dockerd EXIT
dk() { "$docker_bin" --host "unix://$sock" "$@"; }
for _ in $(seq 300); do dk version >/dev/null 2>&1 && break; sleep 0.2; done
dk version >/dev/null 2>&1 || { echo "bench: dockerd did not start; see $d/dockerd.log" >&2; tail -5 "$d/dockerd.log" >&2; exit 1; }

"$top/images/make-rootfs.sh" "$d/rootfs" >/dev/null
tar -C "$d/rootfs" -c . | dk import - rootcell-bench:busybox >/dev/null

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
