//! Pause and resume on a hand-assembled guest that counts in memory as fast as it can: while
//! paused the counter must not move, after resume it must move again, and a paused VM stops.

mod common;

use std::time::{Duration, Instant};

use rootcell_vmm::{Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

/// Where the guest keeps its counter (identity-mapped, inside 32 MiB of RAM).
const COUNTER: u64 = 0x20_0000;

/// The guest program, in 64-bit mode with interrupts off:
/// ```text
///   mov rax, 0x200000
/// 1: inc qword [rax]
///   jmp 1b
/// ```
const PROGRAM: &[u8] = &[
    0x48, 0xc7, 0xc0, 0x00, 0x00, 0x20, 0x00, 0x48, 0xff, 0x00, 0xeb, 0xfb,
];

fn counter(mem: &rootcell_vmm::memory::GuestMemoryMmap) -> u64 {
    mem.read_obj(GuestAddress(COUNTER)).unwrap()
}

/// Waits up to 20 s for the counter to pass `above`; returns its value.
fn wait_moves(mem: &rootcell_vmm::memory::GuestMemoryMmap, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = counter(mem);
        if c > above {
            return c;
        }
        assert!(Instant::now() < deadline, "counter stuck at {c}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn paused_guest_does_not_run_and_resumes() {
    if !common::kvm_present("paused_guest_does_not_run_and_resumes") {
        return;
    }
    let kernel = common::write_tiny_kernel("counter.elf", PROGRAM);
    let mut config = VmConfig::new(&kernel, "");
    config.mem_mib = 32;
    // The second vCPU waits for a SIPI inside KVM_RUN: it must park as well.
    config.vcpus = 2;
    config.seccomp = true;
    let vm = Vm::create(config);
    std::fs::remove_file(&kernel).unwrap();
    let vm = vm.expect("create VM");
    let mem = vm.memory().clone();
    let running = vm.start().expect("start VM");
    let before = wait_moves(&mem, 0);

    for round in 0..3 {
        let t = Instant::now();
        running.pause().expect("pause");
        let took = t.elapsed();
        assert!(running.is_paused());
        let frozen = counter(&mem);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            counter(&mem),
            frozen,
            "round {round}: the guest ran while paused"
        );
        // Pausing again is a no-op that still succeeds.
        running.pause().expect("second pause");
        running.resume();
        assert!(!running.is_paused());
        let after = wait_moves(&mem, frozen);
        println!("round {round}: pause took {took:?}; counter {before} -> {frozen} -> {after}");
    }

    // A paused VM stops promptly, with no vCPU left in KVM_RUN.
    running.pause().expect("pause before stop");
    let t = Instant::now();
    let report = running.stop();
    assert!(report.stuck_vcpus.is_empty(), "{report:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
}
