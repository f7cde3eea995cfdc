//! Fuzzes the triple-fault report's page-table walk: guest memory is guest-controlled, so any
//! table contents, root, virtual address, symbol addresses, registers and physical-address
//! width must never panic, and the report must stay a few bounded lines.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rootcell_vmm::arch::x86_64::ptwalk::{shutdown_report, walk, FaultRegs, KernelSymbols};
use rootcell_vmm::memory::{create_guest_memory, GuestMemoryMmap};
use vm_memory::{Bytes, GuestAddress};

/// 1 MiB of guest RAM; the input's tables go in its first 64 KiB.
const MEM: u64 = 1 << 20;
const TABLES: usize = 0x1_0000;

fn memory() -> GuestMemoryMmap {
    static M: OnceLock<GuestMemoryMmap> = OnceLock::new();
    M.get_or_init(|| create_guest_memory(MEM).expect("guest memory")).clone()
}

fuzz_target!(|input: &[u8]| {
    // [0..8] root, [8..16] va, [16..24] rip, [24..32] idt, [32..40] a symbol, [40] phys bits and
    // flags, rest: page-table memory from 0. Short inputs are zero-padded.
    let mut data = input.to_vec();
    if data.len() < 41 {
        data.resize(41, 0);
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    let mem = memory();
    mem.write_slice(&[0u8; TABLES], GuestAddress(0)).unwrap();
    let tables = &data[41..];
    mem.write_slice(&tables[..tables.len().min(TABLES)], GuestAddress(0))
        .unwrap();
    let (root, va, flags) = (word(0), word(8), data[40]);
    let phys_bits = flags & 0x3f;
    let w = walk(&mem, root, va, phys_bits);
    assert!(w.steps.len() <= 4);
    let symbols = KernelSymbols {
        init_top_pgt: (flags & 0x40 != 0).then_some(word(32)),
        early_top_pgt: Some(word(0).wrapping_add(0xffff_ffff_8000_0000)),
        stext: Some(va),
        page_fault_entry: Some(word(16)),
        phys_base: Some(word(24)),
    };
    let regs = (flags & 0x80 != 0).then(|| FaultRegs {
        rip: word(16),
        cr3: root,
        idt_base: word(24),
        four_level: va & 1 == 0,
    });
    let r = shutdown_report(&mem, &symbols, regs, phys_bits);
    assert!(r.lines().count() <= 8, "{r}");
    assert!(r.lines().all(|l| l.len() < 400), "{r}");
});
