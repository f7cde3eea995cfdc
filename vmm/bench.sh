#!/bin/sh
# Prints (does not assert) the built-in VMM's start-up cost and memory overhead:
#   launch (just before exec) -> first KVM_RUN, process CPU time at first KVM_RUN, and the
#   VMM's RSS excluding guest RAM (guest RAM is a shared memfd, counted as RssShmem).
# Runs each measurement without devices and with virtio-vsock + virtio-fs attached.
# Usage: vmm/bench.sh [KERNEL] [RUNS]   (KERNEL defaults to the newest cached vmlinux)
# Builds the release binary into target-vmm.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
kernel=${1:-$(ls -t /var/cache/rootcell/kernel-*/vmlinux 2>/dev/null | head -n1)}
runs=${2:-5}
[ -n "$kernel" ] || { echo "no kernel: pass one or run images/build-kernel.sh" >&2; exit 1; }
CARGO_TARGET_DIR="$here/../target-vmm" cargo build --release -q -p rootcell-vmm --bin rootcell-vmm
bin="$here/../target-vmm/release/rootcell-vmm"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/share"
for devices in none vsock+fs; do
    case $devices in
        none) extra= ;;
        *) extra="--vsock $work/vsock.sock --share $work/share" ;;
    esac
    echo "== devices: $devices"
    i=0
    while [ "$i" -lt "$runs" ]; do
        # shellcheck disable=SC2086 # $extra is a word list on purpose
        ROOTCELL_BENCH_T0_NS=$(date +%s%N) "$bin" --kernel "$kernel" --mem-mib 128 --timeout-secs 0 \
            --bench $extra 2>&1 | grep '^bench:' || true
        i=$((i + 1))
    done
done
