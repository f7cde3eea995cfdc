#!/usr/bin/env bash
# Issue 12 B, by hand (not part of any test run): the docker ten-container test, then the pause
# test, twice, in L1 on the built-in VMM: flock /tmp/nested.lock scripts/l1.sh -- tests/nested/docker-pair.sh
# (after cargo test --release -p rootcell-e2e --test docker --no-run).
cd "$(dirname "$0")/../.."
source build/env
export ROOTCELL_E2E=1
b=$(ls -t target/release/deps/docker-* | grep -v '\.d$' | head -1)
for i in 1 2; do
  for t in rm_f_of_ten_running_containers_leaves_nothing top_pause_unpause_update_and_stats; do
    s=$(date +%s)
    timeout 280 "$b" --test-threads=1 --color never "$t" 2>&1 | grep -E "^test |panicked|left behind|not running|guest stopped|shut down|test result" | head -20
    echo "docker-pair: round $i $t: rc ${PIPESTATUS[0]} in $(( $(date +%s) - s )) s"
  done
done
