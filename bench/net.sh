#!/usr/bin/env bash
# TCP throughput host -> container on Docker's default bridge: SIZE MiB sent from the host to a
# busybox `nc -l` in a container, with --runtime rootcell and --runtime runc side by side in one
# run on a private dockerd. Time runs from the connection to the container's exit (the receiver
# counted every byte). Prints MiB/s per run, medians and the ratio; asserts nothing.
#
# Usage: bench/net.sh [SIZE_MIB] [N]      (default 200 MiB, 3 runs per runtime)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
size=${1:-200}
n=${2:-3}
# shellcheck source=bench/dockerd.sh
source "$(dirname "$0")/dockerd.sh"
head -c "$((size << 20))" /dev/urandom > "$work/payload"

# one_run RUNTIME: prints MiB/s of one transfer.
one_run() {
    local runtime=$1 id ip t0 t1 got
    id=$(dk run -d --runtime "$runtime" rootcell-bench:busybox sh -c 'nc -l -p 5001 | wc -c')
    ip=$(dk inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id")
    # The guest may still be booting: retry until the listener takes the connection.
    for _ in $(seq 600); do
        if exec 3>"/dev/tcp/$ip/5001"; then break; fi 2>/dev/null
        sleep 0.1
    done
    t0=$(now_ms)
    cat "$work/payload" >&3
    exec 3>&-
    dk wait "$id" >/dev/null
    t1=$(now_ms)
    got=$(dk logs "$id" | tr -d ' ')
    dk rm -f "$id" >/dev/null
    [ "$got" = "$((size << 20))" ] || { echo "bench: $runtime received $got bytes, sent $((size << 20))" >&2; exit 1; }
    awk -v s="$size" -v ms="$((t1 - t0))" 'BEGIN { printf "%.1f\n", s * 1000 / (ms > 0 ? ms : 1) }'
}

declare -A med
for runtime in rootcell runc; do
    runs=$(for _ in $(seq "$n"); do one_run "$runtime"; done)
    echo "$runtime: $(echo $runs) MiB/s" >&2
    read -r m lo hi <<<"$(stats <<<"$runs")"
    med[$runtime]="$m $lo $hi"
done

echo
echo "TCP host -> container, ${size} MiB, $n runs each (default bridge)"
echo "machine: $(machine)"
printf '%-10s %12s %12s %12s\n' runtime "median MiB/s" "min" "max"
for runtime in rootcell runc; do
    read -r m lo hi <<<"${med[$runtime]}"
    printf '%-10s %12s %12s %12s\n' "$runtime" "$m" "$lo" "$hi"
done
read -r a _ _ <<<"${med[rootcell]}"
read -r b _ _ <<<"${med[runc]}"
awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "ratio rootcell/runc (median): %.2f\n", a / b }'
