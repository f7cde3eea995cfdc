//! CPUID the guest sees: KVM's supported set, with the per-vCPU topology filled in and the bits
//! a Linux guest relies on fixed up (hypervisor present, no PMU, no energy-bias MSR).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::error::{kvm, Result};

/// CPUID.1:ECX bit telling the kernel it runs under a hypervisor (enables paravirt paths).
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX HTT: the package has more than one logical processor.
pub const EDX_HTT: u32 = 1 << 28;
/// CPUID.6:ECX energy-performance-bias MSR; KVM does not emulate it.
pub const ECX_EPB: u32 = 1 << 3;

/// Reads KVM's supported CPUID once; each vCPU then gets a normalised copy.
pub fn supported(kvm_fd: &Kvm) -> Result<CpuId> {
    kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))
}

/// The guest's physical-address width (MAXPHYADDR): CPUID 0x80000008 EAX bits 7:0, 36 when the
/// leaf is missing (the SDM's default).
pub fn phys_bits(entries: &[kvm_cpuid_entry2]) -> u8 {
    entries
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| (e.eax & 0xff) as u8)
        .filter(|b| *b != 0)
        .unwrap_or(36)
}

/// Returns `base` adjusted for vCPU `cpu` of `num_cpus`.
pub fn for_vcpu(base: &CpuId, cpu: u8, num_cpus: u8) -> CpuId {
    let mut cpuid = base.clone();
    normalize(cpuid.as_mut_slice(), cpu, num_cpus);
    cpuid
}

/// Number of bits needed to number `n` logical processors (x2APIC id shift).
fn id_bits(n: u8) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - u32::from(n - 1).leading_zeros()
    }
}

/// Applies the fix-ups in place (separate from the ioctl so it can be unit-tested).
pub fn normalize(entries: &mut [kvm_cpuid_entry2], cpu: u8, num_cpus: u8) {
    let (cpu32, n32) = (u32::from(cpu), u32::from(num_cpus));
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // EBX[31:24] initial APIC id, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0xffff) | (n32 << 16) | (cpu32 << 24);
                e.ecx |= ECX_HYPERVISOR;
                if num_cpus > 1 {
                    e.edx |= EDX_HTT
                } else {
                    e.edx &= !EDX_HTT
                }
            }
            0x4 => {
                // One core per vCPU, one package; only the last-level cache is shared.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n32 - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((n32 - 1) << 26);
            }
            0x6 => e.ecx &= !ECX_EPB,
            0xa => {
                // No virtual PMU: the guest must not program performance counters.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = cpu32;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = id_bits(num_cpus);
                        e.ebx = n32;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_gets_apic_id_count_and_hypervisor_bit() {
        let mut e = [entry(1, 0, 0x806f8, 0xffff_0800, 0, EDX_HTT)];
        normalize(&mut e, 2, 4);
        assert_eq!(e[0].ebx, 0x0204_0800);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        normalize(&mut e, 0, 1);
        assert_eq!(e[0].ebx >> 16, 0x00_01);
        assert_eq!(e[0].edx & EDX_HTT, 0, "single vCPU has no HTT");
    }

    #[test]
    fn topology_leaves_number_the_vcpu() {
        let mut e = [
            entry(0xb, 0, 9, 9, 9, 9),
            entry(0xb, 1, 9, 9, 9, 9),
            entry(0xb, 2, 9, 9, 9, 9),
        ];
        normalize(&mut e, 3, 5);
        assert_eq!((e[0].eax, e[0].ebx, e[0].ecx, e[0].edx), (0, 1, 0x100, 3));
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx, e[1].edx), (3, 5, 0x201, 3));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx), (0, 0, 2));
    }

    #[test]
    fn pmu_and_epb_are_hidden_and_caches_are_per_core() {
        let mut e = [
            entry(0xa, 0, 0x0703_0802, 1, 2, 3),
            entry(6, 0, 0, 0, 0xf, 0),
            entry(4, 0, (1 << 5) | 0x1 | (7 << 26) | (1 << 14), 0, 0, 0),
            entry(4, 3, (3 << 5) | 0x3, 0, 0, 0),
        ];
        normalize(&mut e, 0, 2);
        assert_eq!((e[0].eax, e[0].ebx, e[0].ecx, e[0].edx), (0, 0, 0, 0));
        assert_eq!(e[1].ecx, 0x7);
        assert_eq!(e[2].eax, (1 << 5) | 0x1 | (1 << 26));
        assert_eq!(e[3].eax, (3 << 5) | 0x3 | (1 << 14) | (1 << 26));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
