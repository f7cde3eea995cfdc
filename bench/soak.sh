#!/usr/bin/env bash
# The long form of the soak and fault test (tests/e2e/soak.rs; its short form runs in
# scripts/test.sh): N sequential `run`s and M concurrent ones with mixed exit codes, exec storms
# of 10 concurrent execs into one container, and SIGKILL of the sandbox, the VMM and an exec
# relay at random points of create/start/exec, each followed by `delete --force` and a check
# that nothing is left (processes, mounts, run and state dirs, sockets, host cgroups, taps).
#
# Usage: bench/soak.sh [SEQUENTIAL] [CONCURRENT] [STORMS] [FAULT_ROUNDS]   (default 200 20 10 5)
# ROOTCELL_SOAK_SEED=N repeats the random kill points of an earlier run (it prints its seed).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
# shellcheck disable=SC1090
source "${ROOTCELL_ENV:-build/env}"
export ROOTCELL_E2E=1
export ROOTCELL_SOAK_SEQUENTIAL=${1:-200}
export ROOTCELL_SOAK_CONCURRENT=${2:-20}
export ROOTCELL_SOAK_STORMS=${3:-10}
export ROOTCELL_SOAK_FAULTS=${4:-5}
# M guests booting at once under TCG on 2 cores take far longer than one.
export ROOTCELL_BOOT_TIMEOUT=${ROOTCELL_BOOT_TIMEOUT:-300}
# The test's own bounds (tests/support/lib.rs), widened for the long form.
export ROOTCELL_E2E_TEST_TIMEOUT=${ROOTCELL_E2E_TEST_TIMEOUT:-10800}
export ROOTCELL_E2E_BINARY_TIMEOUT=${ROOTCELL_E2E_BINARY_TIMEOUT:-11000}
echo "soak: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $ROOTCELL_SOAK_SEQUENTIAL sequential, $ROOTCELL_SOAK_CONCURRENT concurrent, $ROOTCELL_SOAK_STORMS storms, $ROOTCELL_SOAK_FAULTS fault rounds"
start=$(date +%s)
cargo test --release --quiet -p rootcell-e2e --test soak -- --nocapture 2>&1 | grep -E '^soak:|panicked|left behind|test result'
echo "soak: wall time $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
