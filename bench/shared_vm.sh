#!/usr/bin/env bash
# A second container in an existing VM against a container in a VM of its own (issue 14): the
# wall time of `run /bin/true` both ways, and the host memory each adds, side by side in one run.
# Numbers are printed, never asserted.
#
# Usage: bench/shared_vm.sh [N]   (N runs per case, default 5; needs scripts/build.sh first)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
n=${1:-5}
make_bundle "$work/owner" sleep 100000
make_bundle "$work/own" /bin/true

kib() { awk -v f="$2:" '$1 == f {s += $2} END {print s + 0}' "$1"; }

rc create --bundle "$work/owner" owner >/dev/null 2>"$work/err" </dev/null || { cat "$work/err" >&2; exit 1; }
rc start owner >/dev/null
owner_pid=$(rc state owner | jq -r .pid)
# joined BUNDLE-DIR ARG...: a bundle that joins the owner's network (and so its VM).
joined() {
    local dir=$1; shift
    make_bundle "$dir" "$@"
    jq --arg p "/proc/$owner_pid/ns/net" \
        '.linux.namespaces = [.linux.namespaces[] | select(.type != "network")] + [{"type": "network", "path": $p}]' \
        "$dir/config.json" > "$dir/c.json" && mv "$dir/c.json" "$dir/config.json"
}
joined "$work/join" /bin/true
joined "$work/join-idle" sleep 100000

measure() {
    local i t0 t1
    for i in $(seq "$n"); do
        t0=$(now_ms)
        rc run --bundle "$1" "$2-$i" >/dev/null 2>"$work/err" </dev/null || { echo "bench: run $1 failed: $(tail -3 "$work/err")" >&2; return 1; }
        t1=$(now_ms)
        rc delete "$2-$i" >/dev/null 2>&1 || true
        echo $((t1 - t0))
    done | stats
}
read -r own_med own_min own_max < <(measure "$work/own" own)
read -r join_med join_min join_max < <(measure "$work/join" join)

# Memory: the owner's sandbox + QEMU (PSS) against what a joined idle container adds (its own sandbox
# process, and the growth of the VM's QEMU).
qemu=$(pgrep -P "$owner_pid" -f qemu-system | head -1 || true)
sleep "${SETTLE:-3}"
own_sb=$(kib "/proc/$owner_pid/smaps_rollup" Pss)
own_q=$( [ -n "$qemu" ] && kib "/proc/$qemu/smaps_rollup" Pss || echo 0)
q_rss=$( [ -n "$qemu" ] && kib "/proc/$qemu/smaps_rollup" Rss || echo 0)
rc create --bundle "$work/join-idle" joined >/dev/null 2>"$work/err" </dev/null || { cat "$work/err" >&2; exit 1; }
rc start joined >/dev/null
sleep "${SETTLE:-3}"
j_pid=$(rc state joined | jq -r .pid)
j_sb=$(kib "/proc/$j_pid/smaps_rollup" Pss)
q_after=$( [ -n "$qemu" ] && kib "/proc/$qemu/smaps_rollup" Rss || echo 0)

printf '\na container in a VM of its own against a second container in a running VM, %d runs each\nmachine: %s\n' "$n" "$(machine)"
printf '%-28s %10s %10s %10s\n' "run /bin/true" "median ms" "min ms" "max ms"
printf '%-28s %10s %10s %10s\n' "own VM (boots one)" "$own_med" "$own_min" "$own_max"
printf '%-28s %10s %10s %10s\n' "in the running VM" "$join_med" "$join_min" "$join_max"
awk -v a="$own_med" -v b="$join_med" 'BEGIN { if (b > 0) printf "ratio own/joined (median): %.1fx\n", a / b }'
printf '\nhost memory (PSS) of an idle container\n'
printf '%-28s %10s KiB (sandbox %s + QEMU %s)\n' "own VM" "$((own_sb + own_q))" "$own_sb" "$own_q"
printf '%-28s %10s KiB (its sandbox PSS %s + growth of QEMU RSS %s)\n' "in the running VM" "$((j_sb + q_after - q_rss))" "$j_sb" "$((q_after - q_rss))"
rc delete --force joined >/dev/null 2>&1 || true
rc delete --force owner >/dev/null 2>&1 || true
