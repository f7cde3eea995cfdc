//! The boot GDT: a null descriptor, a 64-bit code segment, a data segment and a TSS, and the
//! conversion of each entry into the `kvm_segment` KVM wants in the segment registers.

use kvm_bindings::kvm_segment;

/// Access/flags for a 64-bit (L=1) execute/read code segment, present, DPL 0, 4 KiB granularity.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Access/flags for a read/write data segment, present, DPL 0, 32-bit, 4 KiB granularity.
pub const DATA_FLAGS: u16 = 0xc093;
/// Access/flags for a busy 64-bit TSS (KVM refuses to enter with a non-busy TR).
pub const TSS_FLAGS: u16 = 0x808b;

/// Selector index of the code segment (selector 0x08).
pub const CODE_INDEX: u16 = 1;
/// Selector index of the data segment (selector 0x10).
pub const DATA_INDEX: u16 = 2;
/// Selector index of the TSS (selector 0x18).
pub const TSS_INDEX: u16 = 3;

/// Builds one 8-byte GDT descriptor from access/flags, base and a 20-bit limit.
pub fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The whole boot GDT, in selector order.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        entry(CODE64_FLAGS, 0, 0xfffff),
        entry(DATA_FLAGS, 0, 0xfffff),
        entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

fn base(e: u64) -> u64 {
    ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000)
}

fn limit(e: u64) -> u32 {
    let raw = ((e & 0xffff) | ((e >> 32) & 0x000f_0000)) as u32;
    // With the granularity bit set the limit counts 4 KiB pages.
    if (e >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// Decodes a descriptor at selector index `index` into the form KVM loads into a segment register.
pub fn kvm_segment_from_entry(e: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((e >> n) & 1) as u8;
    kvm_segment {
        base: base(e),
        limit: limit(e),
        selector: index * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((e >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        // A segment is usable when present; KVM ignores `unusable` for loaded segments.
        unusable: if bit(47) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_present_ring0() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0], 0, "first descriptor must be null");
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        let s = kvm_segment_from_entry(gdt[1], CODE_INDEX);
        assert_eq!(
            (s.selector, s.type_, s.present, s.dpl, s.s),
            (0x08, 0xb, 1, 0, 1)
        );
        assert_eq!((s.l, s.db, s.g), (1, 0, 1), "64-bit code needs L=1 and D=0");
        assert_eq!((s.base, s.limit), (0, 0xffff_ffff));
    }

    #[test]
    fn data_and_tss_segments_decode() {
        let gdt = boot_gdt();
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        let d = kvm_segment_from_entry(gdt[2], DATA_INDEX);
        assert_eq!((d.selector, d.type_, d.db, d.l, d.s), (0x10, 0x3, 1, 0, 1));
        let t = kvm_segment_from_entry(gdt[3], TSS_INDEX);
        assert_eq!((t.selector, t.type_, t.s, t.present), (0x18, 0xb, 0, 1));
    }

    #[test]
    fn entry_places_base_and_limit_bits() {
        let e = entry(0x0093, 0x1234_5678, 0xabcde);
        assert_eq!(base(e), 0x1234_5678);
        assert_eq!(e & 0xffff, 0xbcde);
        assert_eq!((e >> 48) & 0xf, 0xa);
        assert_eq!(limit(e), 0xabcde, "byte granularity keeps the raw limit");
    }
}
