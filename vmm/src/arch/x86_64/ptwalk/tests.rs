use super::*;
use crate::memory::create_guest_memory;

/// 32 MiB of guest RAM.
const MEM: u64 = 32 << 20;
const PML4: u64 = 0x10_0000;
const PDPT: u64 = 0x10_1000;
const PD: u64 = 0x10_2000;
const PT: u64 = 0x10_3000;
/// A kernel-text address: PML4[511], PDPT[510], PD[8], PT[0x23], offset 0x456.
const VA: u64 = 0xffff_ffff_8102_3456;

fn put(mem: &GuestMemoryMmap, table: u64, index: u64, entry: u64) {
    mem.write_obj(entry, GuestAddress(table + index * 8))
        .unwrap();
}

/// Tables mapping [`VA`] through a 4 KiB page at 0x77_7000, as Linux's kernel mapping would
/// (PML4[511] -> PDPT[510] -> PD[8] -> PT[0x23]).
fn tables() -> GuestMemoryMmap {
    let mem = create_guest_memory(MEM).unwrap();
    put(&mem, PML4, 511, PDPT | 0x63);
    put(&mem, PDPT, 510, PD | 0x63);
    put(&mem, PD, 8, PT | 0x63);
    put(&mem, PT, 0x23, 0x77_7000 | 0x163);
    mem
}

#[test]
fn walks_a_4k_page() {
    let mem = tables();
    let w = walk(&mem, PML4, VA, 40);
    assert_eq!(
        w.steps,
        vec![
            Step {
                level: 4,
                index: 511,
                entry: PDPT | 0x63
            },
            Step {
                level: 3,
                index: 510,
                entry: PD | 0x63
            },
            Step {
                level: 2,
                index: 8,
                entry: PT | 0x63
            },
            Step {
                level: 1,
                index: 0x23,
                entry: 0x77_7163
            },
        ]
    );
    assert_eq!(
        w.outcome,
        Outcome::Mapped {
            gpa: 0x77_7456,
            page_size: 0x1000,
            in_ram: true
        }
    );
    // CR3's low (PCID/flag) bits are not part of the root.
    assert_eq!(walk(&mem, PML4 | 0x18, VA, 40), w);
    let text = w.to_string();
    assert!(text.ends_with("-> 0x777456 (4K page)"), "{text}");
}

#[test]
fn walks_a_2m_leaf() {
    let mem = tables();
    // PD[8] becomes a 2 MiB leaf at 0x20_0000 (PAT bit 12 set: allowed in a large leaf).
    put(&mem, PD, 8, 0x20_0000 | 0x1000 | PS | 0x63);
    let w = walk(&mem, PML4, VA, 40);
    assert_eq!(w.steps.len(), 3);
    assert_eq!(
        w.outcome,
        Outcome::Mapped {
            gpa: 0x20_0000 + (VA & 0x1f_ffff),
            page_size: 0x20_0000,
            in_ram: true
        }
    );
    // A 1 GiB leaf in the PDPT: the GPA keeps the low 30 bits of the address.
    put(&mem, PDPT, 510, PS | 0x63);
    let w = walk(&mem, PML4, VA, 40);
    assert_eq!(
        w.outcome,
        Outcome::Mapped {
            gpa: VA & 0x3fff_ffff,
            page_size: 1 << 30,
            in_ram: true
        }
    );
}

#[test]
fn stops_at_a_non_present_entry() {
    let mem = tables();
    put(&mem, PD, 8, PT | 0x62);
    let w = walk(&mem, PML4, VA, 40);
    assert_eq!(w.steps.len(), 3);
    assert_eq!(
        w.outcome,
        Outcome::Failed {
            level: 2,
            problem: Problem::NotPresent
        }
    );
    // An address whose PML4 slot is empty stops at the top.
    let w = walk(&mem, PML4, 0xffff_8880_0000_0000, 40);
    assert_eq!(
        w.outcome,
        Outcome::Failed {
            level: 4,
            problem: Problem::NotPresent
        }
    );
}

#[test]
fn flags_reserved_bits() {
    let mem = tables();
    // Bit 45 is above a 40-bit MAXPHYADDR.
    put(&mem, PDPT, 510, PD | 1 << 45 | 0x63);
    let w = walk(&mem, PML4, VA, 40);
    assert_eq!(
        w.outcome,
        Outcome::Failed {
            level: 3,
            problem: Problem::Reserved(1 << 45)
        }
    );
    // ... but not above a 46-bit one (then it is an address outside this small RAM).
    assert_eq!(
        walk(&mem, PML4, VA, 46).outcome,
        Outcome::Failed {
            level: 3,
            problem: Problem::OutsideRam(PD | 1 << 45)
        }
    );
    // PS is reserved in a PML4E.
    put(&mem, PDPT, 510, PD | 0x63);
    put(&mem, PML4, 511, PDPT | PS | 0x63);
    assert_eq!(
        walk(&mem, PML4, VA, 40).outcome,
        Outcome::Failed {
            level: 4,
            problem: Problem::Reserved(PS)
        }
    );
    // Bits 20:13 of a 2 MiB leaf are reserved.
    put(&mem, PML4, 511, PDPT | 0x63);
    put(&mem, PD, 8, 0x20_0000 | 0x4000 | PS | 0x63);
    assert_eq!(
        walk(&mem, PML4, VA, 40).outcome,
        Outcome::Failed {
            level: 2,
            problem: Problem::Reserved(0x4000)
        }
    );
    assert_eq!(reserved_bits(0x8000_0000_0000_0063, 1, 40), 0, "NX is not");
}

#[test]
fn flags_a_table_outside_ram() {
    let mem = tables();
    put(&mem, PDPT, 510, 0x4000_0000 | 0x63);
    let w = walk(&mem, PML4, VA, 40);
    assert_eq!(
        w.outcome,
        Outcome::Failed {
            level: 3,
            problem: Problem::OutsideRam(0x4000_0000)
        }
    );
    // A root outside RAM: nothing read.
    let w = walk(&mem, 0x8000_0000, VA, 40);
    assert!(w.steps.is_empty());
    assert_eq!(
        w.outcome,
        Outcome::Failed {
            level: 4,
            problem: Problem::Unreadable(0x8000_0000 + 511 * 8)
        }
    );
    // A leaf may map MMIO: reported, not a failure.
    put(&mem, PDPT, 510, PD | 0x63);
    put(&mem, PT, 0x23, 0xfee0_0000 | 0x63);
    assert!(matches!(
        walk(&mem, PML4, VA, 40).outcome,
        Outcome::Mapped { in_ram: false, .. }
    ));
}

#[test]
fn refuses_a_non_canonical_address() {
    let mem = tables();
    let w = walk(&mem, PML4, 0x0000_8000_0000_0000, 40);
    assert!(w.steps.is_empty());
    assert_eq!(
        w.outcome,
        Outcome::Failed {
            level: 5,
            problem: Problem::NonCanonical
        }
    );
}

#[test]
fn summarizes_a_sane_and_a_corrupt_root() {
    let mem = tables();
    put(&mem, PML4, 273, PDPT | 0x63);
    let s = summarize_root(&mem, PML4, 40);
    assert_eq!(s.non_zero, 2);
    assert!(s.sane(), "{s}");
    assert!(s.to_string().ends_with("root table sane"), "{s}");

    // Foreign data over the table: text bytes (not present), a present entry with bits above
    // MAXPHYADDR, and a present entry pointing past RAM.
    put(&mem, PML4, 0, u64::from_le_bytes(*b"bin/bash"));
    put(&mem, PML4, 1, 0x6f6c_2f72_7375_2f61);
    put(&mem, PML4, 2, 0x2000_0000 | 0x63);
    let s = summarize_root(&mem, PML4, 40);
    assert_eq!(s.non_zero, 5);
    assert_eq!(s.corrupt, 2, "{s}");
    assert_eq!(s.not_present_non_zero, 1, "{s}");
    assert!(!s.sane());
    assert_eq!(
        s.listed[2],
        (2, 0x2000_0063, Problem::OutsideRam(0x2000_0000))
    );
    assert!(matches!(s.listed[1], (1, _, Problem::Reserved(_))));
    assert!(summarize_root(&mem, 0x8000_0000, 40).unreadable);
}

#[test]
fn report_walks_the_kernel_root_without_registers() {
    let mem = tables();
    // The kernel's root at init_top_pgt's GPA, _stext mapped, the page-fault entry not.
    let symbols = KernelSymbols {
        init_top_pgt: Some(KERNEL_MAP + PML4),
        early_top_pgt: Some(KERNEL_MAP + 0x1f_f000),
        stext: Some(VA),
        page_fault_entry: Some(0xffff_ffff_8140_0aa0),
        phys_base: Some(KERNEL_MAP + 0x20_0000),
    };
    let r = shutdown_report(&mem, &symbols, None, 40);
    assert!(r.contains("root 0x100000 = init_top_pgt; CR3 lost"), "{r}");
    assert!(r.contains("phys_base 0x0"), "{r}");
    assert!(r.contains("walk _stext 0xffffffff81023456: L4[511]"), "{r}");
    assert!(r.contains("-> 0x777456 (4K page)"), "{r}");
    assert!(
        r.contains("walk asm_exc_page_fault 0xffffffff81400aa0: "),
        "{r}"
    );
    assert!(r.contains("FAULT at L2: not present"), "{r}");
    assert!(r.contains("walk idt (cpu_entry_area)"), "{r}");
    assert!(!r.contains("walk rip"), "{r}");
    assert!(r.ends_with("verdict: root table sane"), "{r}");

    put(&mem, PML4, 7, 1 << 50 | 0x63);
    let r = shutdown_report(&mem, &symbols, None, 40);
    assert!(
        r.ends_with("verdict: root table has 1 corrupt entries (listed above)"),
        "{r}"
    );
    assert!(r.contains("[7]=0x4000000000063 (reserved bits"), "{r}");

    // Before init_top_pgt is filled the kernel runs on early_top_pgt: that is walked.
    let empty = KernelSymbols {
        init_top_pgt: Some(KERNEL_MAP + 0x1f_e000),
        early_top_pgt: Some(KERNEL_MAP + PML4),
        ..symbols
    };
    let r = shutdown_report(&mem, &empty, None, 40);
    assert!(
        r.contains("root 0x100000 = early_top_pgt (init_top_pgt empty)"),
        "{r}"
    );
}

#[test]
fn report_uses_cr3_when_the_registers_are_the_fault() {
    let mem = tables();
    let regs = FaultRegs {
        rip: VA,
        cr3: PML4,
        idt_base: VA,
        four_level: true,
    };
    let r = shutdown_report(&mem, &KernelSymbols::default(), Some(regs), 40);
    assert!(r.contains("no symbol table"), "{r}");
    assert!(r.contains("root 0x100000 from CR3"), "{r}");
    assert!(r.contains("walk rip 0xffffffff81023456: "), "{r}");
    assert!(r.contains("walk idt 0xffffffff81023456: "), "{r}");
    // Without a usable CR3 and without symbols there is nothing to walk: one line.
    let r = shutdown_report(&mem, &KernelSymbols::default(), None, 40);
    assert_eq!(r.lines().count(), 1, "{r}");
    assert!(r.contains("no root to walk"), "{r}");
}

/// Guest memory is hostile: random tables and random roots and addresses must never panic and
/// the report must stay a few bounded lines. (The fuzz target `page_walk` in vmm/fuzz does the
/// same with coverage guidance; this runs in every `cargo test`.)
#[test]
fn random_memory_never_panics_and_stays_bounded() {
    let mem = create_guest_memory(1 << 20).unwrap();
    // xorshift64*: deterministic, so a failure is reproducible.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for round in 0..200 {
        // Fill the first 64 KiB with random entries, some pointing back into it so walks go deep.
        for i in 0..(0x1_0000 / 8) {
            let v = next();
            let v = if v & 3 == 0 {
                (v & 0xf000) | (v >> 60)
            } else {
                v
            };
            put(&mem, 0, i, v);
        }
        let root = if round % 4 == 0 {
            next()
        } else {
            next() & 0xf000
        };
        let symbols = KernelSymbols {
            init_top_pgt: Some(next()),
            early_top_pgt: Some(KERNEL_MAP + (next() & 0xffff)),
            stext: Some(next()),
            page_fault_entry: Some(KERNEL_MAP + (next() & 0xffff)),
            phys_base: Some(next()),
        };
        let regs = (round % 2 == 0).then(|| FaultRegs {
            rip: next(),
            cr3: root,
            idt_base: next(),
            four_level: round % 3 != 0,
        });
        let phys_bits = (next() & 0x7f) as u8;
        let r = shutdown_report(&mem, &symbols, regs, phys_bits);
        assert!(r.lines().count() <= 8, "{r}");
        assert!(r.lines().all(|l| l.len() < 400), "{r}");
        let w = walk(&mem, root, next(), phys_bits);
        assert!(w.steps.len() <= 4);
    }
}
