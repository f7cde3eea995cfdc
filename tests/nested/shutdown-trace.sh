# Sourced by tests/nested/in-l1.sh and par-boot.sh, in L1 (root, tracefs).
# Guest triple faults (issue 12's "Failure A": a guest that stops before its agent answers, with an
# empty console, seen a few times per hundred boots in L1 on both backends). On AMD, KVM resets a
# vCPU's state before it reports KVM_EXIT_SHUTDOWN, so neither VMM can say where the guest was;
# only KVM's kvm_exit trace event (exit_reason 127, SVM_EXIT_SHUTDOWN) has the guest's RIP. It is
# traced for the whole run; any shutdown is printed after the binary it happened in, with the RIP
# named from the guest kernel's symbols.
tr=/sys/kernel/tracing
shutdown_trace_start() {
    mountpoint -q $tr || mount -t tracefs nodev $tr 2>/dev/null || return 0
    [ -d $tr/events/kvm/kvm_exit ] || { echo "in-l1: no kvm_exit trace event: guest shutdowns are not traced"; return 0; }
    echo 0 > $tr/tracing_on; echo > $tr/trace
    # With the VMM's pid (the tgid) and L1's clock, a shutdown can be matched to its guest: L1's
    # `kvm [PID]: vcpu0 ... Unhandled WRMSR` console line at each guest's boot has both.
    echo 1 2>/dev/null > $tr/options/record-tgid
    echo 'exit_reason == 127' > $tr/events/kvm/kvm_exit/filter
    echo 1 > $tr/events/kvm/kvm_exit/enable
    echo 1 > $tr/tracing_on
}
# The kernel text symbol at or below a guest address (guest kernels have no KASLR: tinyconfig);
# nothing for an address below the kernel's text.
guest_symbol() {
    [ -r "${ROOTCELL_VMLINUX:-}" ] || return 0
    local a sym; a=$(printf '%016x' "$1")
    # nm prints 16 lowercase hex digits, so string order is address order.
    sym=$(nm -n "$ROOTCELL_VMLINUX" 2>/dev/null | awk -v a="$a" '$1 > a { exit } $2 ~ /^[tTwW]$/ { s = $1 " " $3 } END { print s }')
    [ -n "$sym" ] && printf '%s+0x%x' "${sym#* }" $(( $1 - 0x${sym%% *} ))
}
shutdown_trace_report() { # what ran
    local rip sym who
    [ -r $tr/trace ] || return 0
    local lines; lines=$(grep -v '^#' $tr/trace 2>/dev/null | grep 'kvm_exit')
    [ -n "$lines" ] || return 0
    echo "$lines" | while read -r l; do
        # "vcpu0-2581 (2570) [000] d.... 48.037056:": thread, (VMM pid), CPU, flags, L1 time.
        who=$(echo "${l%%kvm_exit:*}" | tr -s ' ' | sed 's/^ //; s/:* *$//')
        rip=$(echo "$l" | grep -o 'rip 0x[0-9a-f]*' | cut -d' ' -f2)
        sym=${rip:+$(guest_symbol "$rip")}
        # `reboot=t` (QEMU's microvm guests) restarts by loading an empty IDT and an int3: a
        # triple fault by design, seen when a guest panics (panic=-1) or the agent reboots it.
        case "$sym" in
            native_machine_emergency_restart+*)
                echo "in-l1: guest restart by triple fault (reboot=t, the guest kernel's own) during $1: ${l#*kvm_exit: } [$sym] ($who)" ;;
            *)  echo "in-l1: GUEST SHUTDOWN (triple fault) during $1: ${l#*kvm_exit: }${sym:+ [$sym]} ($who)" ;;
        esac
    done
    echo > $tr/trace
}
