#!/bin/bash
# Runs every cargo-fuzz target for SECONDS each (default 60), one at a time, and prints one
# line per target: executions, executions per second, corpus size, and findings.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Targets (crate: target):
#   fuzz/              fs_request      FUSE requests through the virtio-fs device (a real share
#                                      in a private nodev tmpfs; needs root)
#                      guest_messages  agent frames, stream hellos, host messages, DNS relay
#   devices/vsock/fuzz packet_parse    vsock packet headers
#                      muxer_packets   the vsock muxer's guest-facing state machine
#   vmm/fuzz           virtio_mmio_registers, virtio_net_queues, page_walk (the triple-fault
#                      report's walk of guest page tables)
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Corpora grow in
# <crate>/corpus/<target> (not committed); seeds come from <crate>/seeds/<target> where there
# are any. A crash, leak, timeout or out-of-memory input lands in <crate>/artifacts/<target>/:
# copy it to fuzz/regressions/<target>/ (fs_request) or turn it into a #[test], fix, rerun.
# Logs: $FUZZ_LOGS (default /tmp/rootcell-fuzz). Exit status 1 if any target found anything.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
secs=${1:-60}
shift || true
logs=${FUZZ_LOGS:-/tmp/rootcell-fuzz}
mkdir -p "$logs"

all=(
    "fuzz fs_request"
    "fuzz guest_messages"
    "devices/vsock/fuzz packet_parse"
    "devices/vsock/fuzz muxer_packets"
    "vmm/fuzz virtio_mmio_registers"
    "vmm/fuzz virtio_net_queues"
    "vmm/fuzz page_walk"
)
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: FAIL: needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz)" >&2
    exit 2
fi

failed=0
printf '%-24s %10s %9s %8s  %s\n' target execs exec/s corpus findings
for entry in "${all[@]}"; do
    read -r crate target <<<"$entry"
    if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qx "$target"; then
        continue
    fi
    (cd "$crate" && cargo +nightly fuzz build -O "$target" >"$logs/$target.build.log" 2>&1) || {
        echo "fuzz: FAIL: building $target (see $logs/$target.build.log)" >&2
        failed=1
        continue
    }
    bin="$repo/$crate/target/x86_64-unknown-linux-gnu/release/$target"
    corpus="$repo/$crate/corpus/$target"
    artifacts="$repo/$crate/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    [ -d "$repo/$crate/seeds/$target" ] && seeds=("$repo/$crate/seeds/$target")
    before=$(find "$artifacts" -type f | wc -l)
    # -timeout: one input taking 10 s is a hang; the outer timeout bounds the whole run.
    set +e
    timeout --kill-after=30 $((secs + 120)) "$bin" -artifact_prefix="$artifacts/" \
        -max_total_time="$secs" -timeout=10 -max_len=16384 -print_final_stats=1 \
        "$corpus" "${seeds[@]}" >"$logs/$target.log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$target.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$target.log" | tail -1)
    size=$(find "$corpus" -type f | wc -l)
    found=$(($(find "$artifacts" -type f | wc -l) - before))
    what="none"
    if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
        what="exit $rc, $found new in $artifacts: $(grep -m1 -E 'ERROR|panicked' "$logs/$target.log" || true)"
        failed=1
    fi
    printf '%-24s %10s %9s %8s  %s\n' "$target" "${execs:-?}" "${rate:-?}" "$size" "$what"
done
exit $failed
