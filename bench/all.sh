#!/usr/bin/env bash
# Runs every benchmark in bench/ and prints their tables (see bench/README.md).
#
# Usage: bench/all.sh      (needs scripts/build.sh first; about 10 minutes under TCG)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/run.sh" "${N:-10}"
"$here/breakdown.sh" 3
"$here/boot-insns.sh"
"$here/stdio.sh" 1024
"$here/memory.sh" 2
"$here/rate.sh" 8 2
"$here/docker.sh" 5
"$here/net.sh" 200 3
"$here/shared_vm.sh" 5
"$here/containerd.sh" 5
# Last: it fills the machine (stops at 60 containers or a 90 s start).
"$here/density.sh" 60 90 1024
