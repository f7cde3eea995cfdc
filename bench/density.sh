#!/usr/bin/env bash
# Density: starts idle containers (`sleep`) one after another until something gives, and prints
# how many ran, what gave, and the host's memory and load along the way. Stops at the first of:
# a start fails, one start takes longer than MAX_START_S, MemAvailable drops under MIN_AVAIL_MIB,
# or CAP containers run. Everything is deleted at the end. Asserts nothing.
#
# Usage: bench/density.sh [CAP] [MAX_START_S] [MIN_AVAIL_MIB]   (default 300, 120, 1024)
# Env:   DENSITY_MEMORY_MIB guest RAM per container (default 128, the smallest rootcell boots)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
cap=${1:-300}
max_start=${2:-120}
min_avail=${3:-1024}
mem=${DENSITY_MEMORY_MIB:-128}
make_bundle "$work/bundle" sleep 1000000
# The runtime gives the VM 64 MiB more than the container's memory limit (spec::GUEST_OVERHEAD_MIB).
[ "$mem" -ge 128 ] || { echo "density: DENSITY_MEMORY_MIB must be at least 128" >&2; exit 2; }
jq --argjson m "$(((mem - 64) << 20))" '.linux.resources.memory.limit = $m' "$work/bundle/config.json" > "$work/c.json"
mv "$work/c.json" "$work/bundle/config.json"

avail_mib() { awk '/MemAvailable/ {printf "%d", $2 / 1024}' /proc/meminfo; }
echo
echo "density: idle containers (sleep), ${mem} MiB guest RAM each, one at a time"
echo "machine: $(machine)"
printf '%6s %10s %16s %14s\n' count "start s" "MemAvailable MiB" "load avg 1m"
start_avail=$(avail_mib)
count=0
why="reached the cap of $cap"
while [ "$count" -lt "$cap" ]; do
    t0=$(now_ms)
    if ! rc run -d --bundle "$work/bundle" "dens-$count" >/dev/null 2>"$work/err"; then
        why="start $((count + 1)) failed: $(tail -1 "$work/err")"
        break
    fi
    secs=$(awk -v ms="$(( $(now_ms) - t0 ))" 'BEGIN { printf "%.1f", ms / 1000 }')
    count=$((count + 1))
    avail=$(avail_mib)
    if [ $((count % 10)) -eq 0 ] || [ "$count" -le 3 ]; then
        printf '%6d %10s %16d %14s\n' "$count" "$secs" "$avail" "$(cut -d' ' -f1 /proc/loadavg)"
    fi
    if awk -v s="$secs" -v m="$max_start" 'BEGIN { exit !(s > m) }'; then why="start $count took ${secs} s (> ${max_start} s)"; break; fi
    if [ "$avail" -lt "$min_avail" ]; then why="MemAvailable $avail MiB < $min_avail MiB"; break; fi
done
end_avail=$(avail_mib)
echo "ran $count idle containers; stopped because: $why"
[ "$count" -gt 0 ] && echo "host memory used per container: $(( (start_avail - end_avail) / count )) MiB (MemAvailable before $start_avail, after $end_avail)"
t0=$(now_ms)
for i in $(seq 0 $((count - 1))); do rc delete --force "dens-$i" >/dev/null 2>&1 || true; done
echo "deleted $count containers in $(( ($(now_ms) - t0) / 1000 )) s"
