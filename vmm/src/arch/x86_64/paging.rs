//! Identity-mapped page tables for the first 4 GiB, so the kernel can be entered directly in
//! 64-bit mode (which requires paging) before it builds its own tables.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{PDPT_ADDR, PD_ADDR, PML4_ADDR};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// Present + writable.
const PRESENT_RW: u64 = 0x3;
/// Present + writable + page size (a 2 MiB leaf in a page directory).
const PRESENT_RW_HUGE: u64 = 0x83;
/// Number of page directories (each maps 1 GiB with 512 2-MiB pages).
pub const PD_COUNT: u64 = 4;

/// Computes the tables as (guest address, entry) pairs; split out so it can be tested without
/// guest memory.
pub fn entries() -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(1 + PD_COUNT as usize * 513);
    out.push((PML4_ADDR, PDPT_ADDR | PRESENT_RW));
    for pd in 0..PD_COUNT {
        let pd_addr = PD_ADDR + pd * 0x1000;
        out.push((PDPT_ADDR + pd * 8, pd_addr | PRESENT_RW));
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            out.push((pd_addr + i * 8, phys | PRESENT_RW_HUGE));
        }
    }
    out
}

/// Writes the tables into guest memory and returns the value for CR3.
pub fn setup(mem: &GuestMemoryMmap) -> Result<u64> {
    for (addr, value) in entries() {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|e| Error::BootSetup {
                what: "page tables",
                reason: e.to_string(),
            })?;
    }
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    /// Walks the tables the way the MMU does and returns the physical address for `virt`.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, virt: u64) -> Option<u64> {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + ((virt >> 39) & 0x1ff) * 8))
            .ok()?;
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((virt >> 30) & 0x1ff) * 8))
            .ok()?;
        if pdpte & 1 == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((virt >> 21) & 0x1ff) * 8))
            .ok()?;
        if pde & 0x81 != 0x81 {
            return None;
        }
        Some((pde & !0x1f_ffff) | (virt & 0x1f_ffff))
    }

    #[test]
    fn identity_maps_first_4_gib_with_2mib_pages() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let cr3 = setup(&mem).unwrap();
        assert_eq!(cr3, PML4_ADDR);
        for virt in [
            0u64,
            0x7000,
            0x100_0000,
            0x1234_5678,
            0xbfff_ffff,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, cr3, virt), Some(virt), "virt {virt:#x}");
        }
        assert_eq!(translate(&mem, cr3, 1 << 32), None, "nothing above 4 GiB");
    }

    #[test]
    fn tables_do_not_overlap_other_boot_structures() {
        let last = entries().iter().map(|(a, _)| *a).max().unwrap();
        assert!(last < PD_ADDR + PD_COUNT * 0x1000);
        const { assert!(PD_ADDR + PD_COUNT * 0x1000 <= crate::arch::x86_64::layout::EBDA_START) };
        const { assert!(PML4_ADDR > crate::arch::x86_64::layout::BOOT_STACK_POINTER) };
    }
}
