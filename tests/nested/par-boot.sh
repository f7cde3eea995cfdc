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
# What a hung container's VM is doing: its VMM's threads (state, CPU time, wait channel), its
# console's last lines, and one second of its vCPUs' KVM exits and page faults in L1 (reasons
# and guest RIPs, named from the guest kernel's symbols), then the VMM's report as it stops the
# VM. Clears the shutdown trace's buffer.
hang_report() { # id
  local pid t tids filt
  pid=$(pgrep -f "builtin-vmm --for [^ ]*/$1( |\$)" | head -1)
  echo "=== hang: $1 still running after ${HANG:-90} s; VMM pid ${pid:-none}"
  [ -n "$pid" ] || return 0
  for t in /proc/$pid/task/*; do
    printf '   %s %-16s state=%s utime+stime=%s wchan=%s\n' "${t##*/}" "$(cat $t/comm)" \
      "$(cut -d' ' -f3 $t/stat)" "$(awk '{print $14+$15}' $t/stat)" "$(cat $t/wchan 2>/dev/null)"
  done
  find /run/rootcell -path "*$1*" -name console.log 2>/dev/null | while read -r c; do
    echo "   console ($c): $(tail -n 3 "$c" | tr '\n' '|')"
  done
  [ -d $tr/events/kvm/kvm_exit ] || return 0
  tids=$(for t in /proc/$pid/task/*; do case "$(cat $t/comm)" in vcpu*) echo "${t##*/}" ;; esac; done)
  filt=$(for t in $tids; do printf 'common_pid == %s || ' "$t"; done)
  echo 0 > $tr/tracing_on; echo > $tr/trace
  echo "${filt}exit_reason == 127" > $tr/events/kvm/kvm_exit/filter
  [ -d $tr/events/kvm/kvm_page_fault ] && { echo "${filt% || }" > $tr/events/kvm/kvm_page_fault/filter; echo 1 > $tr/events/kvm/kvm_page_fault/enable; }
  echo 1 > $tr/tracing_on; sleep 1; echo 0 > $tr/tracing_on
  local snap; snap=$(grep -v '^#' $tr/trace)
  echo "   in 1 s: $(grep -c 'kvm_exit:' <<< "$snap") exits, $(grep -c 'kvm_page_fault:' <<< "$snap") page faults; by reason and rip:"
  grep -o 'reason [A-Za-z_0-9]* rip 0x[0-9a-f]*' <<< "$snap" | sort | uniq -c | sort -rn | head -8 |
    while read -r c _ why _ rip; do echo "     $c $why rip $rip [$(guest_symbol "$rip")]"; done
  grep -o 'kvm_page_fault: .*' <<< "$snap" | sed 's/vcpu [0-9]* //' | sort | uniq -c | sort -rn | head -5 | sed 's/^/     /'
  grep 'kvm_exit:' <<< "$snap" | tail -n 5 | sed 's/^/     last: /'
  echo 0 > $tr/events/kvm/kvm_page_fault/enable 2>/dev/null
  echo 'exit_reason == 127' > $tr/events/kvm/kvm_exit/filter
  echo > $tr/trace; echo 1 > $tr/tracing_on
  # The VMM's own report of the hung guest (each vCPU's RIP and CR3 as KVM holds them, its
  # interrupt state, the virtio rings): a TERM the guest cannot take ends the VM after 5 s,
  # through a stop that writes it to the hypervisor log, read before `run` removes it.
  local hvlog=/run/rootcell/$1/builtin.log
  timeout 30 "$rc_bin" kill "$1" TERM > /dev/null 2>&1 &
  local seen=
  for _ in $(seq 150); do grep -q 'stopped:' "$hvlog" 2>/dev/null && { seen=1; break; }; sleep 0.1; done
  if [ -n "$seen" ]; then
    sed -n '/stopped:/,$p' "$hvlog" | head -n 6 | cut -c1-600 | sed 's/^/   vmm: /'
  else
    echo "   vmm: no stop report in $hvlog within 15 s; its last lines:"
    tail -n 5 "$hvlog" 2>/dev/null | cut -c1-300 | sed 's/^/   vmm:   /'
  fi
}
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
  if [ "${MODE:-par}" != seq ]; then
    rm -f $out/$r-*.rc
    for i in $(seq "$n"); do
      ( timeout 400 "$rc_bin" --hypervisor builtin run --bundle "$b" "pb-$r-$i" > $out/$r-$i.out 2> $out/$r-$i.err; echo $? > $out/$r-$i.rc ) &
    done
    # A container still running after $HANG s: say what its VM is doing, once, before the
    # 400 s bound ends it (a guest that hangs says nothing by itself).
    reported=
    while [ -n "$(jobs -r)" ]; do
      if [ -z "$reported" ] && [ "$(echo "$(date +%s.%N) - $start > ${HANG:-90}" | bc)" = 1 ]; then
        reported=1
        for i in $(seq "$n"); do [ -e $out/$r-$i.rc ] || hang_report "pb-$r-$i"; done
      fi
      sleep 1
    done
    wait
  fi
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
