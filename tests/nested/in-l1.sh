#!/usr/bin/env bash
# Runs inside L1 (scripts/l1.sh), driven by tests/e2e/nested_kvm.rs: end-to-end tests of the
# runtime on L1's real KVM, once with `auto` (which must pick the built-in VMM) and once with
# `--hypervisor qemu` (QEMU -accel kvm). Prints one line per phase for the test to check:
#   NESTED <phase> ok|FAILED <seconds> s[: why]
# and exits non-zero if any phase failed. Every phase is followed by a leftover check: no QEMU,
# sandbox or VMM process, no mount of the runtime's, no run directory left in L1.
#
# Usage: in-l1.sh TESTS_DIR      (the directory holding the e2e test binaries, target/release/deps)
# Env:   the build/env variables (ROOTCELL_BIN, ...); NESTED_SET: smoke (a few tests of each
#        binary, what the README's test command runs), focused (default: the whole focused set),
#        full (every test of the seventeen binaries listed below, and the two pool tests of
#        the focused set; also ROOTCELL_NESTED_FULL=1);
#        NESTED_ONLY: instead of a set, these entries only, separated by ';' (each a binary and
#        optional test names, as in the lists below; for by-hand runs of one binary);
#        NESTED_PHASES (default "auto qemu"); NESTED_BINARY_TIMEOUT (seconds per test binary,
#        default 1200): past it the binary is killed after a dump of what every rootcell process
#        and thread in L1 was doing (state, wait channel, system call) and the containers' last
#        console lines.
set -uo pipefail
dir=${1:?usage: in-l1.sh TESTS_DIR}
export ROOTCELL_E2E=1
failed=0

# The newest test binary of a test target (cargo names them TARGET-HASH).
bin_of() {
    ls -t "$dir/$1"-???????????????? 2>/dev/null | while read -r f; do
        [ -x "$f" ] && [ -f "$f" ] && { echo "$f"; break; }
    done
}

report() { # phase start rc [why]
    local t; t=$(( $(date +%s) - $2 ))
    if [ "$3" = 0 ]; then echo "NESTED $1 ok $t s"; else echo "NESTED $1 FAILED $t s${4:+: $4}"; failed=1; fi
}

leftovers() {
    local left=""
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$$" ] && continue
        cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) || continue
        case "$cmd" in
            *qemu-system*|"$ROOTCELL_BIN"*|*rootcell-vmm*|*builtin-vmm*) left="$left [${p#/proc/}: ${cmd:0:120}]" ;;
        esac
    done
    m=$(grep -E 'rootcell' /proc/self/mountinfo | grep -v ' /work/' || true)
    [ -n "$m" ] && left="$left mounts: $(echo "$m" | head -3 | tr '\n' ' ')"
    [ -n "$(ls -A /run/rootcell/r 2>/dev/null)" ] && left="$left run dirs: $(ls /run/rootcell/r | head -3 | tr '\n' ' ')"
    echo "$left"
}

# Guest triple faults, traced for the whole run and reported after each binary
# (shutdown-trace.sh says why).
. "$(dirname "$0")/shutdown-trace.sh"
shutdown_trace_start

# The VM pool (issue 15): warm containers as cold ones, and a claimed VM that dies mid-claim
# means a cold boot; in focused and full only (about 1.5-3 minutes per backend in L1).
pool_entry="pool warm_containers_run_like_cold_ones_and_each_vm_serves_one a_pool_vm_that_dies_during_the_claim_means_a_cold_boot_and_leaks_nothing"
# The focused set: lifecycle, exit codes, stdio integrity, errors, Docker on L1's cgroup v2
# (a private dockerd with rootcell registered: run, --memory with an OOM kill, stats, the host
# cgroup's CPU quota and charge), and the network tests: a prepared namespace mirrored into
# virtio-net, Docker's default bridge, -p and a user-defined network by name; containerd 1.6
# with rootcell's shim on cgroup v2 (ctr run/exec/kill/pause/metrics, -t, an OOM event); and the
# jail (issue 16: the built-in VMM's threads and QEMU unprivileged, in roots of their own).
focused=(
    "lifecycle"
    "process exit_codes_pass_through missing_executable_exits_127 non_executable_file_exits_126 kill_9_gives_137 kill_term_gives_143"
    "stdio"
    "errors"
    "docker run_prints_root_and_guest_kernel_under_both_names exit_codes_and_runtime_errors oom_kills_in_the_guest_reach_docker top_pause_unpause_update_and_stats memory_cpus_and_pids_limits booting_the_vm_is_not_charged"
    "network a_prepared_network_namespace_is_mirrored_into_the_guest default_bridge_gives_the_docker_address published_port_reaches_a_server user_defined_network_resolves_rootcell_peers_by_name"
    "containerd ctr_run_exec_kill_pause_metrics tty_and_oom_event"
    "jail"
    "$pool_entry"
)
# The smoke set: the same binaries, fewer tests (about 5 minutes on the built-in VMM in L1).
smoke=(
    "lifecycle create_start_state_exit_delete sigkill_of_sandbox_then_delete_force_leaves_nothing exec_passes_exit_status"
    "process exit_codes_pass_through kill_9_gives_137"
    "stdio hundred_mib_of_random_bytes_round_trip stdin_eof_reaches_the_process stderr_only_write_stays_on_stderr"
    "errors duplicate_and_unknown_ids json_log_carries_the_error missing_vmlinux_for_the_builtin_hypervisor"
    "docker run_prints_root_and_guest_kernel_under_both_names"
    "network a_prepared_network_namespace_is_mirrored_into_the_guest"
    "jail builtin_vmm_threads_run_unprivileged_in_roots_of_their_own"
)
set_name=${NESTED_SET:-focused}
[ "${ROOTCELL_NESTED_FULL:-}" = 1 ] && set_name=full
case "$set_name" in
    smoke) focused=("${smoke[@]}") ;;
    focused) ;;
    full) focused=(lifecycle process stdio errors network host_parity cgroup_v2 docker docker_systemd containerd jail
                   exits hostile_guest spoofing shared_vm containerd17 docker26 "$pool_entry") ;;
    *) echo "in-l1: NESTED_SET=$set_name: use smoke, focused or full" >&2; exit 2 ;;
esac
if [ -n "${NESTED_ONLY:-}" ]; then
    IFS=';' read -r -a focused <<< "$NESTED_ONLY"
    set_name="only: $NESTED_ONLY"
fi
echo "in-l1: $set_name set"

# What every rootcell process and thread in L1 is doing, and the last console lines of the
# containers' guests: printed when a test binary overruns its bound, before it is killed.
stall_dump() {
    echo "== in-l1: STALL: $1 overran ${NESTED_BINARY_TIMEOUT:-1200} s; what L1 is doing:"
    uptime
    for p in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) || continue
        case "$cmd" in
            *qemu-system*|"$ROOTCELL_BIN"*|*rootcell*|*"$1"*) ;;
            *) continue ;;
        esac
        echo "-- ${p#/proc/}: ${cmd:0:160}"
        for t in "$p"/task/*; do
            printf '   %s %s state=%s wchan=%s syscall=%s\n' "${t##*/}" "$(cat "$t/comm" 2>/dev/null)" \
                "$(cut -d' ' -f3 "$t/stat" 2>/dev/null)" "$(cat "$t/wchan" 2>/dev/null)" \
                "$(cut -d' ' -f1 "$t/syscall" 2>/dev/null)"
        done
    done
    # Console logs live in the state directories (under the tests' --root, in /tmp or /run).
    find /tmp /run -name console.log 2>/dev/null | while read -r c; do
        [ -s "$c" ] && { echo "-- last lines of $c:"; tail -n 8 "$c"; }
    done
    dmesg 2>/dev/null | tail -n 15
}

# Runs a test binary bounded; on overrun dumps what L1 is doing, then kills it.
run_bounded() { # binary args...
    local b=$1 limit=${NESTED_BINARY_TIMEOUT:-1200} pid rc start
    start=$(date +%s)
    "$@" --test-threads=1 --color never 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ $(( $(date +%s) - start )) -ge "$limit" ]; then
            stall_dump "$(basename "$b")"
            kill -KILL "$pid" 2>/dev/null
            break
        fi
        sleep 1
    done
    wait "$pid"; rc=$?
    return "$rc"
}

for phase in ${NESTED_PHASES:-auto qemu}; do
    case "$phase" in
        auto) unset ROOTCELL_HYPERVISOR; want=builtin ;;
        qemu) export ROOTCELL_HYPERVISOR=qemu; want=qemu ;;
    esac
    # Which backend the runtime takes here, and why (its --log line).
    start=$(date +%s)
    log=$(mktemp); st=$(mktemp -d)
    out=$(timeout 120 "$ROOTCELL_BIN" --root "$st" --log "$log" run --bundle "${ROOTCELL_BUNDLE:?}" "pick-$phase" 2>&1 < /dev/null)
    rc=$?
    chose=$(grep -oE 'hypervisor: [a-z]+ \(auto[^:]*: [^)]*\)|hypervisor: [a-z]+ \([^)]*\)' "$log" | head -1)
    accel=$(grep -o 'accelerator: [^"]*' "$log" | head -1)
    echo "$phase: $chose${accel:+; $accel}"
    echo "$out" | sed 's/^/  guest: /'
    why=""
    [ "$rc" = 0 ] || why="run exited $rc"
    case "$chose" in "hypervisor: $want "*) ;; *) why="${why:+$why; }expected hypervisor $want, log says '${chose:-nothing}'" ;; esac
    [ "$want" = qemu ] && { case "$accel" in *Kvm*|*kvm*) ;; *) why="${why:+$why; }QEMU not on KVM: '${accel:-no accelerator line}'" ;; esac; }
    echo "$out" | grep -q "kernel: ${ROOTCELL_KERNEL_RELEASE:?}" || why="${why:+$why; }guest did not report kernel $ROOTCELL_KERNEL_RELEASE"
    rm -rf "$log" "$st"
    left=$(leftovers); [ -z "$left" ] || why="${why:+$why; }left behind:$left"
    report "$phase-picks-$want" "$start" "$([ -z "$why" ] && echo 0 || echo 1)" "$why"

    for entry in "${focused[@]}"; do
        set -- $entry
        target=$1; shift
        b=$(bin_of "$target")
        start=$(date +%s)
        if [ -z "$b" ]; then report "$phase-$target" "$start" 1 "no test binary $target-* in $dir (cargo test --release --no-run builds it)"; continue; fi
        echo "== $phase: $target $*"
        run_bounded "$b" "$@"
        rc=$?
        shutdown_trace_report "$phase-$target"
        left=$(leftovers)
        why=""
        [ "$rc" = 0 ] || why="test binary exited $rc"
        [ -z "$left" ] || why="${why:+$why; }left behind:$left"
        report "$phase-$target" "$start" "$([ -z "$why" ] && echo 0 || echo 1)" "$why"
    done
done
exit $failed
