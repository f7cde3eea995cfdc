# Shared helpers for the bench/ scripts (sourced, not run). Benchmarks print figures; they never
# assert timings.
#
# Env: ROOTCELL_ENV (default build/env, written by scripts/build.sh) supplies ROOTCELL_BIN,
#      ROOTCELL_KERNEL, ROOTCELL_VMLINUX, ROOTCELL_INITRD (any of them already set wins);
#      BENCH_WORK keeps the scratch directory if set.
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Values already in the environment win over the env file, so one run can swap a kernel or binary.
_bench_keep=$(for v in ROOTCELL_BIN ROOTCELL_KERNEL ROOTCELL_VMLINUX ROOTCELL_INITRD; do
    if [ -n "${!v:-}" ]; then printf '%s=%q\n' "$v" "${!v}"; fi; done)
# shellcheck disable=SC1090
source "${ROOTCELL_ENV:-$top/build/env}" || { echo "bench: run scripts/build.sh first (or set ROOTCELL_ENV)" >&2; exit 1; }
eval "$_bench_keep"
export ROOTCELL_KERNEL ROOTCELL_INITRD
command -v jq >/dev/null || { echo "bench: jq missing" >&2; exit 1; }

if [ -n "${BENCH_WORK:-}" ]; then
    work=$BENCH_WORK; mkdir -p "$work"
else
    work=$(mktemp -d /tmp/rootcell-bench.XXXXXX)
    trap 'bench_cleanup' EXIT
fi

# Deletes every container left in the bench state roots, then the scratch directory.
bench_cleanup() {
    local root id
    for root in "$work"/state-*; do
        [ -d "$root" ] || continue
        for id in $("$ROOTCELL_BIN" --root "$root" list -q 2>/dev/null); do
            "$ROOTCELL_BIN" --root "$root" delete --force "$id" >/dev/null 2>&1 || true
        done
    done
    rm -rf "$work"
}

# make_bundle DIR ARG... : the busybox bundle with process.args set to ARG...
make_bundle() {
    local dir=$1; shift
    [ -d "$work/rootfs.base" ] || "$top/images/make-rootfs.sh" "$work/rootfs.base" >/dev/null
    mkdir -p "$dir"
    [ -e "$dir/rootfs" ] || cp -a "$work/rootfs.base" "$dir/rootfs"
    [ -f "$work/bundle.tmpl/config.json" ] || "$top/images/make-bundle.sh" "$work/bundle.tmpl" >/dev/null
    # One --arg at a time: with --args, jq would take an argument such as "-c" for its own option.
    local args='[]' a
    for a in "$@"; do args=$(jq -c --arg x "$a" '. + [$x]' <<<"$args"); done
    jq --argjson a "$args" '.process.args = $a | .process.terminal = false' "$work/bundle.tmpl/config.json" > "$dir/config.json"
}

# stats: reads numbers (one a line) and prints "median min max".
stats() {
    sort -g | awk '{a[NR]=$1} END { if (NR == 0) { print "- - -"; exit }
        m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%g %g %g\n", m, a[1], a[NR] }'
}

# now_ms: wall clock in milliseconds.
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# machine: one line describing the host and its load right now.
machine() {
    local accel=tcg
    grep -qE 'vmx|svm' /proc/cpuinfo && accel=kvm
    printf '%s, %s cores, %s GiB, guest accel %s, load avg %s' \
        "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')" "$(nproc)" \
        "$(awk '/MemTotal/ {printf "%d", $2/1048576 + 0.5}' /proc/meminfo)" "$accel" \
        "$(cut -d' ' -f1-3 /proc/loadavg)"
}

# rc ARG... : the runtime with the bench state root.
rc() { "$ROOTCELL_BIN" --root "$work/state-rc" "$@"; }
