#!/usr/bin/env bash
# The cost of the VMM jail (issue 16): `run /bin/true` wall time, QEMU's time from spawn to
# agent ready as the sandbox logs it, and one idle container's QEMU PSS, with the jail
# (default, ROOTCELL_JAIL=1), with only QEMU's jail (=qemu), only the back ends' confinement
# (=backends) and without either (=0), alternating so machine load hits all alike.
# Prints figures; asserts nothing.
#
# Usage: bench/jail.sh [N]    (N runs of each, default 6)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
n=${1:-6}
make_bundle "$work/true" true
make_bundle "$work/idle" sleep 100000

kib() { awk -v f="$2:" '$1 == f {s += $2} END {print s + 0}' "$1"; }
# ms between two log lines of one run: "qemu started" and "agent ready".
boot_ms() {
    awk '/qemu started/ {s = $1} /agent ready/ {e = $1} END {print s, e}' "$1" | {
        read -r s e
        [ -n "$s" ] && [ -n "$e" ] || { echo -; return; }
        echo $(( ($(date -d "$e" +%s%N) - $(date -d "$s" +%s%N)) / 1000000 ))
    }
}

modes="1 qemu backends 0"
for mode in $modes; do : > "$work/wall-$mode"; : > "$work/boot-$mode"; : > "$work/spawn-$mode"; done
for i in $(seq "$n"); do
    for mode in $modes; do
        log="$work/log-$mode-$i"
        t0=$(now_ms)
        ROOTCELL_JAIL=$mode rc --log "$log" run --bundle "$work/true" "true-$$-$mode-$i" </dev/null >/dev/null
        echo $(( $(now_ms) - t0 )) >> "$work/wall-$mode"
        boot_ms "$log" >> "$work/boot-$mode"
        grep -o 'spawn_us=[0-9]*' "$log" | cut -d= -f2 >> "$work/spawn-$mode" || true
    done
done

printf '\nVMM jail cost, %d runs each (median min max)\nmachine: %s\n' "$n" "$(machine)"
for mode in $modes; do
    name="JAIL=$mode"
    printf '%-14s run /bin/true %s ms; qemu start -> agent ready %s ms; spawn (fork, jail, exec) %s us\n' "$name" \
        "$(stats < "$work/wall-$mode")" "$(grep -v - "$work/boot-$mode" | stats)" "$(stats < "$work/spawn-$mode")"
done
for mode in 1 0; do
    id="idle-$$-$mode"
    ROOTCELL_JAIL=$mode rc create --bundle "$work/idle" "$id" >/dev/null 2>"$work/err" </dev/null || { cat "$work/err" >&2; exit 1; }
    rc start "$id" >/dev/null
    sleep "${SETTLE:-3}"
    sb=$(rc state "$id" | jq -r .pid)
    q=$(pgrep -P "$sb" -f qemu-system | head -1)
    printf '%-14s idle QEMU: PSS %s KiB, RSS %s KiB; sandbox PSS %s KiB\n' "JAIL=$mode" \
        "$(kib "/proc/$q/smaps_rollup" Pss)" "$(kib "/proc/$q/smaps_rollup" Rss)" "$(kib "/proc/$sb/smaps_rollup" Pss)"
    rc delete --force "$id" >/dev/null 2>&1 || true
done
