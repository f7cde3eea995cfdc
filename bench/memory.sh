#!/usr/bin/env bash
# Host memory per idle container: PSS of the sandbox process (which also serves the vhost-user
# vsock and virtio-fs back ends) and of QEMU, split into the guest RAM actually touched (the
# memfd that backs guest memory, shared by both) and everything else (the per-container overhead).
#
# Usage: bench/memory.sh [N]    (N idle containers at once, default 2; the table shows each)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
n=${1:-2}
make_bundle "$work/idle" sleep 100000

# kib FILE FIELD: a kB field summed over an smaps-like file.
kib() { awk -v f="$2:" '$1 == f {s += $2} END {print s + 0}' "$1"; }
# memfd_rss PID: kB resident in PID's mappings of the guest-memory memfd.
memfd_rss() {
    awk '/^[0-9a-f]+-[0-9a-f]+ / {m = ($0 ~ /memfd:/)} m && $1 == "Rss:" {s += $2} END {print s + 0}' "/proc/$1/smaps"
}

ids=()
for i in $(seq "$n"); do
    id="idle-$$-$i"
    rc create --bundle "$work/idle" "$id" >/dev/null 2>"$work/err" </dev/null || { cat "$work/err" >&2; exit 1; }
    rc start "$id" >/dev/null
    ids+=("$id")
done
sleep "${SETTLE:-3}"   # let the guest go idle after the process started

printf '\nhost memory per idle container (`sleep` in the busybox bundle), %d at once\nmachine: %s\n' "$n" "$(machine)"
mem=$(jq -r '.linux.resources.memory.limit // empty' "$work/idle/config.json")
printf 'guest RAM configured: %s\n' "${mem:-runtime default}"
printf '%-16s %12s %12s %12s %14s %14s\n' container "sandbox PSS" "QEMU PSS" "total PSS" "guest touched" "overhead"
for id in "${ids[@]}"; do
    sb=$(rc state "$id" | jq -r .pid)
    q=$(pgrep -P "$sb" -f qemu-system | head -1)
    sb_pss=$(kib "/proc/$sb/smaps_rollup" Pss)
    q_pss=$(kib "/proc/$q/smaps_rollup" Pss)
    guest=$(memfd_rss "$q")
    total=$((sb_pss + q_pss))
    printf '%-16s %9s KiB %9s KiB %9s KiB %11s KiB %11s KiB\n' "$id" "$sb_pss" "$q_pss" "$total" "$guest" "$((total - guest))"
done
printf 'sandbox RSS %s KiB, QEMU RSS %s KiB (last container; RSS counts the shared guest memory twice)\n' \
    "$(kib "/proc/$sb/smaps_rollup" Rss)" "$(kib "/proc/$q/smaps_rollup" Rss)"
# Where QEMU's own memory goes (TCG's translated-code cache shows as a large anonymous mapping).
printf 'largest QEMU mappings by PSS (last container):\n'
awk '/^[0-9a-f]+-[0-9a-f]+ / {name = ($6 == "" ? "[anon]" : $6)} $1 == "Size:" {size = $2}
     $1 == "Pss:" && $2 > 0 {printf "  %8d KiB PSS  %10d KiB mapped  %s\n", $2, size, name}' "/proc/$q/smaps" | sort -rn | head -4
for id in "${ids[@]}"; do rc delete --force "$id" >/dev/null 2>&1 || true; done
