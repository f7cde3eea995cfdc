//! A VM larger than the space below the 32-bit MMIO hole: KVM takes both RAM regions, the
//! guest runs, and creating it touches (almost) none of its memory.
//!
//! One test function on purpose: it measures this process's RSS.

mod common;

use std::time::{Duration, Instant};

use rootcell_vmm::memory::ram_regions;
use rootcell_vmm::{SerialOutput, Vm, VmConfig, VmExit};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// `mov dx, 0x3f8 ; mov al, 'O' ; out dx, al ; mov al, 0xfe ; out 0x64, al ; hlt`
const PROGRAM: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
];

/// VmRSS of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn eight_gib_vm_is_cheap_to_create_and_runs() {
    if !common::kvm_present("eight_gib_vm_is_cheap_to_create_and_runs") {
        return;
    }
    let kernel = common::write_tiny_kernel("big-ram.elf", PROGRAM);
    let console = common::Console::default();
    let mut config = VmConfig::new(&kernel, "console=ttyS0");
    config.mem_mib = 8 << 10;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    let before = rss_kib();
    let t = Instant::now();
    let vm = Vm::create(config);
    let took = t.elapsed();
    std::fs::remove_file(&kernel).unwrap();
    let vm = vm.expect("create an 8 GiB VM");
    let grew = rss_kib().saturating_sub(before);
    let regions: Vec<(u64, u64)> = vm
        .memory()
        .iter()
        .map(|r| (r.start_addr().0, r.len()))
        .collect();
    assert_eq!(regions, ram_regions(8 << 30));
    assert_eq!(regions[1], (4 << 30, 5 << 30));
    let running = vm.start().expect("start");
    let exit = running.wait_timeout(Duration::from_secs(30));
    let report = running.stop();
    assert_eq!(exit, Some(VmExit::Reset), "{report:?}");
    assert_eq!(console.text(), "O");
    // Boot structures, the kernel and page tables touch a few MiB; 8 GiB would be 8388608 KiB.
    assert!(grew < 32 << 10, "creating the VM grew RSS by {grew} KiB");
    assert!(
        took < Duration::from_secs(2),
        "creating the VM took {took:?}"
    );
    println!("8 GiB VM: created in {took:?}, RSS +{grew} KiB");
}
