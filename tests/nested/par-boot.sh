#!/usr/bin/env bash
# Repro for issue 12 A: N built-in-VMM containers started at once, ROUNDS times; counts failures.
# Usage (in L1): tests/nested/par-boot.sh N ROUNDS [CMD]   (not part of any test run; by hand:
#   flock /tmp/nested.lock scripts/l1.sh -- "ROOTCELL_BOOT_TIMEOUT=400 tests/nested/par-boot.sh 10 3")
#   Also traces KVM shutdown exits in L1 (kvm_exit, exit_reason 127) and prints their guest RIP.
#   MODE=seq: like docker's ten `run -d`: create+start one after another, all left running
#   (CMD a sleep loop), then delete --force all.
set -u
cd "$(dirname "$0")/../.."
source build/env
n=${1:-10} rounds=${2:-3} cmd=${3:-true}
rc_bin=$ROOTCELL_BIN
out=/tmp/pb; mkdir -p $out
# The bundle: busybox root, the process just runs $cmd.
b=$out/bundle; rm -rf $b; cp -a build/bundle $b
python3 - "$b/config.json" "$cmd" <<'PY'
import json,sys
p=sys.argv[1]; c=json.load(open(p)); c["process"]["args"]=["sh","-c",sys.argv[2]]; json.dump(c,open(p,"w"))
PY
# Every guest shutdown (triple fault) with its guest RIP, as in-l1.sh traces them.
. tests/nested/shutdown-trace.sh
shutdown_trace_start
fails=0 total=0
for r in $(seq "$rounds"); do
  start=$(date +%s.%N)
  if [ "${MODE:-par}" = seq ]; then
    for i in $(seq "$n"); do
      ( timeout 400 "$rc_bin" --hypervisor builtin create --bundle "$b" "pb-$r-$i" && timeout 60 "$rc_bin" start "pb-$r-$i" ) > $out/$r-$i.out 2> $out/$r-$i.err < /dev/null
      echo $? > $out/$r-$i.rc
      echo "par-boot: $r-$i rc $(cat $out/$r-$i.rc) at $(echo "$(date +%s.%N) - $start" | bc) s"
    done
    for i in $(seq "$n"); do "$rc_bin" delete --force "pb-$r-$i" >/dev/null 2>&1 & done
    wait
  fi
  [ "${MODE:-par}" = seq ] || for i in $(seq "$n"); do
    ( timeout 400 "$rc_bin" --hypervisor builtin run --bundle "$b" "pb-$r-$i" > $out/$r-$i.out 2> $out/$r-$i.err; echo $? > $out/$r-$i.rc ) &
  done
  wait
  f=0
  for i in $(seq "$n"); do
    total=$((total+1))
    if [ "$(cat $out/$r-$i.rc)" != 0 ]; then
      f=$((f+1)); fails=$((fails+1))
      echo "=== round $r container $i rc $(cat $out/$r-$i.rc)"; tail -c 3000 $out/$r-$i.err
    fi
  done
  echo "par-boot: round $r: $f of $n failed ($(echo "$(date +%s.%N) - $start" | bc) s), load $(cut -d' ' -f1-3 /proc/loadavg)"
done
echo "par-boot: total $fails of $total failed"
shutdown_trace_report par-boot
