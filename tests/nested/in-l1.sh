#!/usr/bin/env bash
# Runs inside L1 (scripts/l1.sh), driven by tests/e2e/nested_kvm.rs: end-to-end tests of the
# runtime on L1's real KVM, once with `auto` (which must pick the built-in VMM) and once with
# `--hypervisor qemu` (QEMU -accel kvm). Prints one line per phase for the test to check:
#   NESTED <phase> ok|FAILED <seconds> s[: why]
# and exits non-zero if any phase failed. Every phase is followed by a leftover check: no QEMU,
# sandbox or VMM process, no mount of the runtime's, no run directory left in L1.
#
# Usage: in-l1.sh TESTS_DIR      (the directory holding the e2e test binaries, target/release/deps)
# Env:   the build/env variables (ROOTCELL_BIN, ...); ROOTCELL_NESTED_FULL=1 runs every test of
#        every e2e binary found instead of the focused set; NESTED_PHASES (default "auto qemu").
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
            *qemu-system*|"$ROOTCELL_BIN"*|*rootcell-vmm*) left="$left [${p#/proc/}: ${cmd:0:120}]" ;;
        esac
    done
    m=$(grep -E 'rootcell' /proc/self/mountinfo | grep -v ' /work/' || true)
    [ -n "$m" ] && left="$left mounts: $(echo "$m" | head -3 | tr '\n' ' ')"
    [ -n "$(ls -A /run/rootcell/r 2>/dev/null)" ] && left="$left run dirs: $(ls /run/rootcell/r | head -3 | tr '\n' ' ')"
    echo "$left"
}

# The focused set: lifecycle, exit codes, stdio integrity, errors, one network test.
focused=(
    "lifecycle"
    "process exit_codes_pass_through missing_executable_exits_127 non_executable_file_exits_126 kill_9_gives_137 kill_term_gives_143"
    "stdio"
    "errors"
    "network a_prepared_network_namespace_is_mirrored_into_the_guest"
)
if [ "${ROOTCELL_NESTED_FULL:-}" = 1 ]; then
    focused=(lifecycle process stdio errors network host_parity cgroup_v2 docker docker_systemd)
fi

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
        timeout 1200 "$b" --test-threads=1 --color never "$@" 2>&1
        rc=$?
        left=$(leftovers)
        why=""
        [ "$rc" = 0 ] || why="test binary exited $rc"
        [ -z "$left" ] || why="${why:+$why; }left behind:$left"
        report "$phase-$target" "$start" "$([ -z "$why" ] && echo 0 || echo 1)" "$why"
    done
done
exit $failed
