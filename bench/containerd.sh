#!/usr/bin/env bash
# Pods through containerd's CRI plugin (issue 18): pod start (RunPodSandbox) to its first container
# running, and a second container added to the running pod, with the `rootcell` runtime handler
# against `runc`, through one private containerd (Debian's 1.6) driven over CRI gRPC by the
# e2e harness's client. Numbers are printed, never asserted.
#
# Usage: bench/containerd.sh [N]   (N pods per handler, default 3; needs scripts/build.sh first)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
# shellcheck disable=SC1091
source "${ROOTCELL_ENV:-build/env}" || { echo "bench: run scripts/build.sh first" >&2; exit 1; }
export ROOTCELL_BIN ROOTCELL_KERNEL ROOTCELL_VMLINUX ROOTCELL_INITRD ROOTCELL_KERNEL_RELEASE
echo "containerd CRI pods, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
BENCH_N=${1:-3} ROOTCELL_E2E=1 cargo test --release --quiet -p rootcell-e2e --test containerd \
    -- --ignored --exact cri_bench --nocapture 2>&1 | grep '^containerd CRI'
