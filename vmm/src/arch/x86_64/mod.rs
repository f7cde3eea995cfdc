//! x86_64-specific boot setup: memory map, descriptor tables, page tables, MP table, CPUID and
//! initial registers.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod ptwalk;
pub mod regs;
