//! Boots a hand-assembled 64-bit "kernel" in KVM: proves long-mode entry (GDT, page tables,
//! registers), the zero page pointer in RSI, the serial port and the i8042 reset path, in a
//! fraction of a second even on an emulated KVM.

mod common;

use std::time::Duration;

use rootcell_vmm::{SerialOutput, Vm, VmConfig, VmExit};

/// The guest program, in 64-bit mode:
/// ```text
///   mov dx, 0x3f8 ; mov al,'O' ; out dx,al ; mov al,'K' ; out dx,al
///   cmp word [rsi+0x1fe], 0xaa55 ; jne 1f ; mov al,'!' ; out dx,al
/// 1:
///   mov al, 0xfe ; out 0x64, al   ; pulse reset through the i8042
///   hlt
/// ```
const PROGRAM: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0x66, 0x81, 0xbe, 0xfe, 0x01, 0x00,
    0x00, 0x55, 0xaa, 0x75, 0x03, 0xb0, b'!', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
];

#[test]
fn tiny_guest_prints_on_serial_and_resets() {
    if !common::kvm_present("tiny_guest_prints_on_serial_and_resets") {
        return;
    }
    let kernel = common::write_tiny_kernel("tiny.elf", PROGRAM);
    let console = common::Console::default();
    let mut config = VmConfig::new(&kernel, "console=ttyS0");
    config.mem_mib = 32;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    config.seccomp = true;
    let running = Vm::create(config).expect("create VM");
    std::fs::remove_file(&kernel).unwrap();
    let running = running.start().expect("start VM");
    let exit = running.wait_timeout(Duration::from_secs(30));
    let report = running.stop();
    assert_eq!(
        exit,
        Some(VmExit::Reset),
        "report: {report:?}, console: {:?}",
        console.text()
    );
    assert_eq!(
        console.text(),
        "OK!",
        "'!' means RSI pointed at a zero page with boot_flag 0xaa55"
    );
    assert!(report.stuck_vcpus.is_empty());
    // Read by the stopped vCPU thread under its seccomp filter (KVM_GET_LAPIC listed, or the
    // process would have been killed): the boot state, interrupts off and nothing pending.
    let interrupts = report.vcpus[0].interrupts.clone();
    assert_eq!(
        interrupts.as_deref(),
        Some("if 0 tpr 0x0 ppr 0x0 isr [] irr []"),
        "{report:?}"
    );
    println!(
        "tiny guest: create->first KVM_RUN {:?}",
        report.create_to_first_run
    );
}

#[test]
fn triple_fault_is_a_clean_shutdown() {
    if !common::kvm_present("triple_fault_is_a_clean_shutdown") {
        return;
    }
    // `mov eax, 0x1234abcd` marks the registers; then `ud2` raises #UD; the boot IDT has one
    // (not present) entry, so delivery fails: #GP -> #DF -> triple fault.
    let program = [0xb8, 0xcd, 0xab, 0x34, 0x12, 0x0f, 0x0b, 0xf4];
    let kernel = common::write_tiny_kernel("triple.elf", &program);
    let mut config = VmConfig::new(&kernel, "");
    config.mem_mib = 32;
    // As the VMM runs: the vCPU thread reads its registers (KVM_GET_SREGS included) under its
    // seccomp filter, whose violations kill the process (in the nested lane a guest's triple
    // fault did, before KVM_GET_SREGS was listed: the container ended with 159 and no report).
    config.seccomp = true;
    let running = Vm::create(config).and_then(Vm::start);
    std::fs::remove_file(&kernel).unwrap();
    let running = running.expect("start VM");
    let exit = running.wait_timeout(Duration::from_secs(30));
    let report = running.stop();
    assert!(
        exit == Some(VmExit::Shutdown),
        "triple fault must end the VM, got {exit:?}: {report:?}"
    );
    // The registers read at the exit: the faulting context where KVM keeps it (Intel, a
    // software KVM), the INIT state where it re-initialises the vCPU first (AMD).
    let state = report.vcpus[0]
        .shutdown_state
        .clone()
        .expect("the vCPU's registers at the shutdown are kept");
    assert!(
        (state.contains("rax=0x1234abcd") && state.contains("rip=0x1000005"))
            || state.contains("the INIT state"),
        "{state}"
    );
    // The guest's page tables, read from its memory at the exit: this "kernel" has no symbol
    // table, so only a CR3 that survived (not on AMD) gives a root; either way it is said.
    let walk = report.vcpus[0]
        .page_walk
        .clone()
        .expect("the page-table report at the shutdown");
    assert!(
        walk.starts_with("page tables (phys-bits ")
            && walk.contains("the kernel image has no symbol table"),
        "{walk}"
    );
    if state.contains("the INIT state") {
        assert!(walk.contains("no root to walk: CR3 lost"), "{walk}");
        assert_eq!(walk.lines().count(), 1, "{walk}");
    } else {
        // The VMM's boot tables (identity map, 2 MiB pages) map the program at 16 MiB.
        assert!(walk.contains(" from CR3"), "{walk}");
        assert!(
            walk.contains("walk rip 0x1000005: L4[0]=") && walk.contains("-> 0x1000005 (2M page)"),
            "{walk}"
        );
        assert!(walk.ends_with("verdict: root table sane"), "{walk}");
    }
    println!("triple fault ended the VM with {exit:?}; registers: {state}\n{walk}");
}
