//! Initial vCPU state for a 64-bit Linux entry: long mode with paging on the identity map, flat
//! segments from the boot GDT, RSI pointing at the zero page, and the local APIC's LINT pins wired
//! the way the MP table says.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{self, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};
use crate::error::{kvm, Error, Result};
use crate::memory::GuestMemoryMmap;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// General-purpose registers at kernel entry (boot protocol: RSI = zero page, RIP = entry).
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and must be set
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// Special registers for long mode, starting from what KVM reported for the fresh vCPU.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let table = gdt::boot_gdt();
    let code = gdt::kvm_segment_from_entry(table[CODE_INDEX as usize], CODE_INDEX);
    let data = gdt::kvm_segment_from_entry(table[DATA_INDEX as usize], DATA_INDEX);
    let tss = gdt::kvm_segment_from_entry(table[TSS_INDEX as usize], TSS_INDEX);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Writes the GDT and the (empty) IDT the special registers point at.
pub fn write_descriptor_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let err = |what| {
        move |e: vm_memory::GuestMemoryError| Error::BootSetup {
            what,
            reason: e.to_string(),
        }
    };
    for (i, entry) in gdt::boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(err("IDT"))
}

/// Sets registers, special registers, FPU and MSRs for the boot CPU (or any CPU: the kernel
/// starts secondary CPUs with INIT/SIPI and overwrites this).
pub fn setup(vcpu: &VcpuFd, entry: u64) -> Result<()> {
    vcpu.set_regs(&boot_regs(entry))
        .map_err(kvm("KVM_SET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&boot_sregs(sregs))
        .map_err(kvm("KVM_SET_SREGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|e| Error::BootSetup {
        what: "MSR list",
        reason: format!("{e:?}"),
    })?;
    vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    Ok(())
}

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

/// Delivery mode bits 8..=10 of an LVT entry replaced by `mode`.
pub fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

/// Routes LINT0 to ExtINT (the 8259) and LINT1 to NMI, matching the MP table.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_sregs() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!((s.cs.selector, s.cs.l), (0x08, 1));
        assert_eq!(
            (s.ss.selector, s.ds.selector, s.tr.selector),
            (0x10, 0x10, 0x18)
        );
        assert_eq!((s.gdt.base, s.gdt.limit), (GDT_ADDR, 31));
    }

    #[test]
    fn entry_regs_follow_boot_protocol() {
        let r = boot_regs(0x100_0000);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0000, ZERO_PAGE_ADDR, BOOT_STACK_POINTER, 2)
        );
    }

    #[test]
    fn descriptor_tables_land_in_memory() {
        let mem = crate::memory::create_guest_memory(2 << 20).unwrap();
        write_descriptor_tables(&mem).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, gdt::boot_gdt()[1]);
    }

    #[test]
    fn lvt_delivery_mode() {
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        assert_eq!(with_delivery_mode(0, APIC_MODE_EXTINT), 0x700);
    }
}
