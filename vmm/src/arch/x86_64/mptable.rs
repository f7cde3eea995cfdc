//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI finds its CPUs, the
//! IO-APIC and which IO-APIC pin each legacy IRQ arrives on.
//!
//! Serialised by hand into bytes (rather than through packed structs) so each field's offset is
//! visible next to the spec's table.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, EBDA_START, HIGH_MEMORY_START, IOAPIC_ADDR, IRQ_MAX};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// Most vCPUs the table (and the xAPIC ids it hands out) supports here.
pub const MAX_CPUS: u8 = 32;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the floating pointer structure followed by the configuration table, as they must be
/// laid out at [`EBDA_START`].
pub fn build(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus; // ids 0..num_cpus are the local APICs
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.extend_from_slice(&[
            0,
            cpu,
            LAPIC_VERSION,
            CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 },
        ]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU | APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // Legacy IRQ n arrives on IO-APIC pin n: that is how KVM's in-kernel irqchip routes GSIs.
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 is ExtINT (the PIC), LINT1 is NMI, on every local APIC.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = EBDA_START as u32 + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"ROOTCELL");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length/checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    fp
}

/// Writes the tables for `num_cpus` vCPUs into the EBDA.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<()> {
    let bytes = build(num_cpus);
    if EBDA_START + bytes.len() as u64 > HIGH_MEMORY_START {
        return Err(Error::BootSetup {
            what: "MP table",
            reason: format!("{} bytes do not fit below 1 MiB", bytes.len()),
        });
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|e| Error::BootSetup {
            what: "MP table",
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_points_at_a_valid_table() {
        let b = build(2);
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(sum(&b[0..16]), 0, "floating pointer checksum");
        let ptr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, EBDA_START + 16);
        let t = &b[16..];
        assert_eq!(&t[0..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(sum(t), 0, "configuration table checksum");
        assert_eq!(u32::from_le_bytes(t[36..40].try_into().unwrap()), APIC_ADDR);
    }

    #[test]
    fn entries_describe_cpus_ioapic_and_every_irq() {
        let b = build(3);
        let t = &b[16..];
        let count = u16::from_le_bytes([t[34], t[35]]) as usize;
        let mut off = 44;
        let (mut cpus, mut ioapics, mut ints, mut lints, mut bsp) = (0, 0, 0, 0, 0);
        for _ in 0..count {
            match t[off] {
                0 => {
                    cpus += 1;
                    bsp += usize::from(t[off + 3] & CPU_BSP != 0);
                    off += 20;
                }
                1 => off += 8,
                2 => {
                    ioapics += 1;
                    assert_eq!(t[off + 1], 3, "IO-APIC id follows the CPU ids");
                    assert_eq!(
                        u32::from_le_bytes(t[off + 4..off + 8].try_into().unwrap()),
                        IOAPIC_ADDR
                    );
                    off += 8;
                }
                3 => {
                    assert_eq!(t[off + 5], t[off + 7], "IRQ n goes to pin n");
                    ints += 1;
                    off += 8;
                }
                4 => {
                    lints += 1;
                    off += 8;
                }
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(off, t.len());
        assert_eq!((cpus, bsp, ioapics, ints, lints), (3, 1, 1, 24, 2));
    }

    #[test]
    fn largest_table_fits_below_1mib() {
        assert!(EBDA_START + build(MAX_CPUS).len() as u64 <= HIGH_MEMORY_START);
    }
}
