//! A read-only walk of a guest's 4-level x86-64 page tables in guest memory, for the report the
//! VMM gives when a guest triple-faults (KVM_EXIT_SHUTDOWN).
//!
//! Why: in the nested lane a guest sometimes triple-faults while delivering a page fault with the
//! reserved-bit error code at a kernel-text RIP ("Failure A" in the README). Whether the guest's
//! top-level table in memory really holds garbage, or the emulated CPU read it through a wrong
//! mapping, is told by reading that table ourselves. On AMD, KVM resets the vCPU before the VMM
//! hears of the shutdown, so CR3 is gone; the root used then is the guest kernel's own
//! `init_top_pgt`, found in the vmlinux's symbol table (see [`KernelSymbols`]).
//!
//! Everything read here is guest-controlled: every entry is treated as hostile. A walk reads at
//! most four entries, a root summary 512, and the report has a fixed number of lines of bounded
//! length; nothing is sized by a guest value and nothing panics.

use std::fmt::{self, Write as _};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;

/// Start of the kernel's text mapping (`__START_KERNEL_map`): kernel symbol `S` is at guest
/// physical address `S - KERNEL_MAP + phys_base`.
pub const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// Entry bit: present.
const PRESENT: u64 = 1;
/// Entry bit: page size (a 1 GiB leaf in a PDPTE, 2 MiB in a PDE; reserved in a PML4E).
const PS: u64 = 1 << 7;
/// Address bits 51:12 of an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Entries per table.
const ENTRIES: usize = 512;

/// The guest kernel's addresses the shutdown report uses, read from the vmlinux's symbol table
/// at load time (virtual addresses in the kernel's text mapping).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelSymbols {
    /// `init_top_pgt` (`swapper_pg_dir`): init_mm's top-level table, the one every kernel
    /// thread runs on early in boot.
    pub init_top_pgt: Option<u64>,
    /// `early_top_pgt`: the table the kernel runs on before `x86_64_start_kernel` fills
    /// `init_top_pgt` (which is all zeros in the image).
    pub early_top_pgt: Option<u64>,
    /// `_stext`: start of the kernel's text.
    pub stext: Option<u64>,
    /// `asm_exc_page_fault`: the #PF entry the IDT points at.
    pub page_fault_entry: Option<u64>,
    /// `phys_base`: the variable holding how far the kernel was moved from where it was linked
    /// (0 when loaded at its ELF physical address, as the VMM loads it).
    pub phys_base: Option<u64>,
}

impl KernelSymbols {
    /// Whether the kernel image gave none of the symbols (not an ELF vmlinux with a symbol
    /// table: a bzImage, a stripped image, a hand-made test kernel).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Guest physical address of kernel-text-mapping address `va`, for a kernel not moved from
/// where it was linked (phys_base 0); None if `va` is not in that mapping.
pub fn kernel_gpa(va: u64) -> Option<u64> {
    va.checked_sub(KERNEL_MAP)
}

/// What stopped a walk, or what is wrong with a table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The entry's present bit is clear.
    NotPresent,
    /// The entry is present and has these reserved bits set.
    Reserved(u64),
    /// The entry is present and points at this address, outside guest RAM.
    OutsideRam(u64),
    /// The entry itself, at this guest address, is not in guest RAM.
    Unreadable(u64),
    /// The virtual address is not canonical (bits 63:47 not all equal).
    NonCanonical,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotPresent => write!(f, "not present"),
            Problem::Reserved(bits) => write!(f, "reserved bits {bits:#x} set"),
            Problem::OutsideRam(a) => write!(f, "points at {a:#x}, outside RAM"),
            Problem::Unreadable(a) => write!(f, "entry at {a:#x} is outside RAM"),
            Problem::NonCanonical => write!(f, "not a canonical address"),
        }
    }
}

/// One entry read during a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Table level: 4 (PML4) down to 1 (page table).
    pub level: u8,
    /// Index in that table.
    pub index: u16,
    /// The entry's value.
    pub entry: u64,
}

/// How a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The address maps to guest physical `gpa`, through a leaf of `page_size` bytes.
    Mapped {
        /// Guest physical address of the walked virtual address.
        gpa: u64,
        /// 4 KiB, 2 MiB or 1 GiB.
        page_size: u64,
        /// Whether `gpa` is in guest RAM (kernel text must be; MMIO need not).
        in_ram: bool,
    },
    /// The walk stopped at `level` (5 for a non-canonical address, before any table).
    Failed {
        /// Level of the entry at fault.
        level: u8,
        /// What was wrong.
        problem: Problem,
    },
}

/// A walk of one virtual address: the entries read, top first (at most four), and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    /// The walked virtual address.
    pub va: u64,
    /// The entries read, PML4E first.
    pub steps: Vec<Step>,
    /// Where it ended.
    pub outcome: Outcome,
}

/// Reserved bits of a present entry at `level` for a guest with `phys_bits` physical-address
/// bits (MAXPHYADDR): address bits 51:phys_bits in every entry, PS in a PML4E, and the address
/// bits below a large leaf's alignment (bits 29:13 of a 1 GiB leaf, 20:13 of a 2 MiB one; bit
/// 12 is PAT there). NX (bit 63) is not counted: Linux always enables EFER.NXE.
pub fn reserved_bits(entry: u64, level: u8, phys_bits: u8) -> u64 {
    let phys_bits = phys_bits.clamp(32, 52);
    let above_maxphy = ADDR_MASK & !((1u64 << phys_bits) - 1);
    let mut mask = above_maxphy;
    match level {
        4 => mask |= PS,
        3 if entry & PS != 0 => mask |= 0x3fff_e000,
        2 if entry & PS != 0 => mask |= 0x001f_e000,
        _ => {}
    }
    entry & mask
}

/// Checks one entry the way the MMU would before following it.
fn check(mem: &GuestMemoryMmap, entry: u64, level: u8, phys_bits: u8) -> Option<Problem> {
    if entry & PRESENT == 0 {
        return Some(Problem::NotPresent);
    }
    let reserved = reserved_bits(entry, level, phys_bits);
    if reserved != 0 {
        return Some(Problem::Reserved(reserved));
    }
    let leaf = level == 1 || (level < 4 && entry & PS != 0);
    let next = entry & ADDR_MASK;
    if !leaf && !mem.address_in_range(GuestAddress(next)) {
        return Some(Problem::OutsideRam(next));
    }
    None
}

/// Walks virtual address `va` from the top-level table at guest physical `root` (CR3's address
/// bits), 4-level paging, with `phys_bits` physical-address bits.
pub fn walk(mem: &GuestMemoryMmap, root: u64, va: u64, phys_bits: u8) -> Walk {
    let mut steps = Vec::with_capacity(4);
    // Canonical: bits 63:47 all equal.
    let top = (va as i64) >> 47;
    if top != 0 && top != -1 {
        return Walk {
            va,
            steps,
            outcome: Outcome::Failed {
                level: 5,
                problem: Problem::NonCanonical,
            },
        };
    }
    let mut table = root & ADDR_MASK;
    for level in (1..=4u8).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = ((va >> shift) & 0x1ff) as u16;
        let at = table + u64::from(index) * 8;
        let failed = |problem| Outcome::Failed { level, problem };
        let entry: u64 = match mem.read_obj(GuestAddress(at)) {
            Ok(e) => e,
            Err(_) => {
                return Walk {
                    va,
                    steps,
                    outcome: failed(Problem::Unreadable(at)),
                }
            }
        };
        steps.push(Step {
            level,
            index,
            entry,
        });
        if let Some(problem) = check(mem, entry, level, phys_bits) {
            return Walk {
                va,
                steps,
                outcome: failed(problem),
            };
        }
        if level == 1 || (level < 4 && entry & PS != 0) {
            let page_size = 1u64 << shift;
            let gpa = (entry & ADDR_MASK & !(page_size - 1)) | (va & (page_size - 1));
            return Walk {
                va,
                steps,
                outcome: Outcome::Mapped {
                    gpa,
                    page_size,
                    in_ram: mem.address_in_range(GuestAddress(gpa)),
                },
            };
        }
        table = entry & ADDR_MASK;
    }
    // Not reached: level 1 is always a leaf or a failure. Said as a failure, not a panic.
    Walk {
        va,
        steps,
        outcome: Outcome::Failed {
            level: 1,
            problem: Problem::NotPresent,
        },
    }
}

impl fmt::Display for Walk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.steps {
            write!(f, "L{}[{}]={:#x} ", s.level, s.index, s.entry)?;
        }
        match self.outcome {
            Outcome::Mapped {
                gpa,
                page_size,
                in_ram,
            } => {
                let size = match page_size {
                    0x1000 => "4K",
                    0x20_0000 => "2M",
                    _ => "1G",
                };
                write!(f, "-> {gpa:#x} ({size} page")?;
                if !in_ram {
                    write!(f, ", outside RAM")?;
                }
                write!(f, ")")
            }
            Outcome::Failed { level, problem } => write!(f, "-> FAULT at L{level}: {problem}"),
        }
    }
}

/// What a top-level table holds: how many entries are non-zero, and the ones the MMU would
/// refuse (present with reserved bits, or pointing outside RAM) or that are non-zero yet not
/// present (never so in a Linux top-level table: a sign of foreign data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSummary {
    /// Guest physical address of the table.
    pub root: u64,
    /// Non-zero entries.
    pub non_zero: usize,
    /// Present entries the MMU would refuse.
    pub corrupt: usize,
    /// Non-zero entries whose present bit is clear.
    pub not_present_non_zero: usize,
    /// The first few bad entries (at most [`SUMMARY_LISTED`]): index, value, problem.
    pub listed: Vec<(u16, u64, Problem)>,
    /// The table itself is not (wholly) in guest RAM.
    pub unreadable: bool,
}

/// How many bad entries a [`RootSummary`] lists.
pub const SUMMARY_LISTED: usize = 4;

/// Reads the 512 entries of the top-level table at `root` and sorts them out.
pub fn summarize_root(mem: &GuestMemoryMmap, root: u64, phys_bits: u8) -> RootSummary {
    let root = root & ADDR_MASK;
    let mut s = RootSummary {
        root,
        non_zero: 0,
        corrupt: 0,
        not_present_non_zero: 0,
        listed: Vec::with_capacity(SUMMARY_LISTED),
        unreadable: false,
    };
    let mut page = [0u8; ENTRIES * 8];
    if mem.read_slice(&mut page, GuestAddress(root)).is_err() {
        s.unreadable = true;
        return s;
    }
    for (i, raw) in page.chunks_exact(8).enumerate() {
        let entry = u64::from_le_bytes(raw.try_into().unwrap_or([0; 8]));
        if entry == 0 {
            continue;
        }
        s.non_zero += 1;
        let problem = match check(mem, entry, 4, phys_bits) {
            None => continue,
            Some(Problem::NotPresent) => {
                s.not_present_non_zero += 1;
                Problem::NotPresent
            }
            Some(p) => {
                s.corrupt += 1;
                p
            }
        };
        if s.listed.len() < SUMMARY_LISTED {
            s.listed.push((i as u16, entry, problem));
        }
    }
    s
}

impl RootSummary {
    /// Whether nothing in the table looks wrong.
    pub fn sane(&self) -> bool {
        !self.unreadable && self.corrupt == 0 && self.not_present_non_zero == 0
    }
}

impl fmt::Display for RootSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unreadable {
            return write!(f, "root {:#x} is not in guest RAM", self.root);
        }
        write!(
            f,
            "root {:#x}: {} of 512 entries non-zero; ",
            self.root, self.non_zero
        )?;
        if self.sane() {
            return write!(f, "root table sane");
        }
        write!(
            f,
            "root table has {} corrupt entries and {} non-zero non-present ones:",
            self.corrupt, self.not_present_non_zero
        )?;
        for (i, e, p) in &self.listed {
            write!(f, " [{i}]={e:#x} ({p})")?;
        }
        let more = self.corrupt + self.not_present_non_zero - self.listed.len();
        if more > 0 {
            write!(f, " and {more} more")?;
        }
        Ok(())
    }
}

/// What the shutdown report knows of the vCPU's registers, if they are the faulting context
/// (KVM keeps them on Intel; on AMD they are the INIT state and say nothing).
#[derive(Debug, Clone, Copy)]
pub struct FaultRegs {
    /// RIP.
    pub rip: u64,
    /// CR3.
    pub cr3: u64,
    /// IDT base.
    pub idt_base: u64,
    /// Whether CR0.PG, CR4.PAE and EFER.LMA say 4-level long-mode paging (not LA57).
    pub four_level: bool,
}

/// Where the IDT is read from once the kernel has set up its CPU entry area (the read-only IDT
/// alias at `CPU_ENTRY_AREA_RO_IDT`, 4-level paging).
pub const CPU_ENTRY_AREA_IDT: u64 = 0xffff_fe00_0000_0000;

/// The page-table part of the shutdown report: a few lines (at most eight), each of bounded
/// length, newline-separated. `regs` is None when the registers are not the faulting context.
pub fn shutdown_report(
    mem: &GuestMemoryMmap,
    symbols: &KernelSymbols,
    regs: Option<FaultRegs>,
    phys_bits: u8,
) -> String {
    let mut out = String::new();
    let cr3 = regs.filter(|r| r.four_level).map(|r| r.cr3 & ADDR_MASK);
    // init_top_pgt is empty until x86_64_start_kernel fills it; before that the kernel runs on
    // early_top_pgt.
    let init_top = symbols.init_top_pgt.and_then(kernel_gpa);
    let early = init_top.is_some_and(|r| summarize_root(mem, r, phys_bits).non_zero == 0);
    let (kernel_root, root_name) = match symbols.early_top_pgt.and_then(kernel_gpa) {
        Some(e) if early || init_top.is_none() => (Some(e), "early_top_pgt (init_top_pgt empty)"),
        _ => (init_top, "init_top_pgt"),
    };
    let why_no_cr3 = match regs {
        None => "CR3 lost (the vCPU was reset at the shutdown)",
        Some(r) if !r.four_level => "CR3 not used (not 4-level long-mode paging)",
        Some(_) => "",
    };
    let _ = write!(out, "page tables (phys-bits {phys_bits}):");
    if symbols.is_empty() {
        let _ = write!(
            out,
            " the kernel image has no symbol table (not an ELF vmlinux), so no kernel root;"
        );
    }
    let root = match (cr3, kernel_root) {
        (Some(c), _) => {
            let _ = write!(out, " root {c:#x} from CR3");
            if let Some(k) = kernel_root.filter(|k| *k != c) {
                let _ = write!(out, " ({root_name} is {k:#x})");
            }
            Some(c)
        }
        (None, Some(k)) => {
            let _ = write!(out, " root {k:#x} = {root_name}; {why_no_cr3}");
            Some(k)
        }
        (None, None) => {
            let _ = write!(out, " no root to walk: {why_no_cr3}");
            None
        }
    };
    if let Some(pb) = symbols
        .phys_base
        .and_then(kernel_gpa)
        .and_then(|a| mem.read_obj::<u64>(GuestAddress(a)).ok())
    {
        let _ = write!(out, "; phys_base {pb:#x}");
        if pb != 0 {
            let _ = write!(out, " (not 0: symbol addresses below are off by it)");
        }
    }
    let Some(root) = root else {
        return out;
    };
    let mut roots = vec![summarize_root(mem, root, phys_bits)];
    if let Some(k) = kernel_root.filter(|k| *k != root) {
        roots.push(summarize_root(mem, k, phys_bits));
    }
    for s in &roots {
        let _ = write!(out, "\n  {s}");
    }
    let mut targets: Vec<(&str, u64)> = Vec::with_capacity(5);
    if let Some(r) = regs.filter(|r| r.rip >= KERNEL_MAP || cr3.is_some()) {
        targets.push(("rip", r.rip));
    }
    if let Some(a) = symbols.stext {
        targets.push(("_stext", a));
    }
    if let Some(a) = symbols.page_fault_entry {
        targets.push(("asm_exc_page_fault", a));
    }
    match regs.filter(|_| cr3.is_some()) {
        Some(r) => targets.push(("idt", r.idt_base)),
        None if !symbols.is_empty() => targets.push(("idt (cpu_entry_area)", CPU_ENTRY_AREA_IDT)),
        None => {}
    }
    for (name, va) in targets {
        let _ = write!(
            out,
            "\n  walk {name} {va:#x}: {}",
            walk(mem, root, va, phys_bits)
        );
    }
    let verdict = if roots.iter().any(|s| s.unreadable) {
        "root table is not in guest RAM".to_string()
    } else if roots.iter().all(RootSummary::sane) {
        "root table sane".to_string()
    } else {
        let n: usize = roots
            .iter()
            .map(|s| s.corrupt + s.not_present_non_zero)
            .sum();
        format!("root table has {n} corrupt entries (listed above)")
    };
    let _ = write!(out, "\n  verdict: {verdict}");
    out
}

#[cfg(test)]
mod tests;
