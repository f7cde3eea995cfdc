#!/usr/bin/env bash
# Breaks one `rootcell run /bin/true` down into the runtime's tracing spans (`--debug` logs one
# line per finished span with elapsed_ms) and prints them as a table in the order they happen.
#
# Usage: bench/breakdown.sh [RUNS]   (RUNS runs, default 3; the median of each span is printed)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
runs=${1:-3}
make_bundle "$work/bundle" /bin/true
for i in $(seq "$runs"); do
    log="$work/run-$i.log"
    t0=$(now_ms)
    rc --debug --log "$log" run --bundle "$work/bundle" "bd-$$-$i" >/dev/null 2>&1 || { echo "bench: run failed; log:" >&2; tail -5 "$log" >&2; exit 1; }
    echo "wall $(( $(now_ms) - t0 ))" >> "$work/spans-$i"
    grep -oE 'span=[a-z_]+ elapsed_ms=[0-9.]+' "$log" | sed -E 's/span=([a-z_]+) elapsed_ms=/\1 /' >> "$work/spans-$i"
done

printf '\none `rootcell run /bin/true`, span medians over %d runs\nmachine: %s\n' "$runs" "$(machine)"
printf '%-18s %10s %10s %10s  %s\n' span "median ms" "min ms" "max ms" "what it covers"
row() {
    local name=$1 what=$2
    read -r med min max < <(cat "$work"/spans-* | awk -v s="$name" '$1 == s {print $2}' | stats)
    printf '%-18s %10s %10s %10s  %s\n' "$name" "$med" "$min" "$max" "$what"
}
row host_setup "sandbox: share dir, config, accelerator choice"
row vm_start "spawn QEMU and the vhost-user back ends"
row agent_ready "guest kernel boot + agent start + vsock hello"
row container_create "stdio streams + Create (namespaces, mounts) in the guest"
row create "the whole \`create\` as the CLI sees it"
row container_start "Start request to the agent"
row start "the whole \`start\` as the CLI sees it"
row running "process runs and exits, then teardown"
row teardown "guest shutdown, QEMU exit, back ends stopped"
row wait "CLI waiting for the exit status"
row delete "state and run dir removal"
row wall "end to end, as the shell sees it"
