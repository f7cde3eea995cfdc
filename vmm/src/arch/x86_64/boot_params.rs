//! The Linux x86 "zero page" (`struct boot_params`, Documentation/arch/x86/boot.rst): e820 map,
//! command line pointer, initramfs location and the setup header fields a 64-bit direct boot needs.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{EBDA_START, HIGH_MEMORY_START, ZERO_PAGE_ADDR};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// `boot_flag` value (the old boot-sector signature) the kernel checks.
pub const BOOT_FLAG: u16 = 0xaa55;
/// `header` magic "HdrS".
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned id.
pub const LOADER_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` default for an ELF vmlinux (no setup header of its own).
pub const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// What goes into the zero page besides the kernel's own setup header.
#[derive(Debug, Clone, Copy)]
pub struct BootParamsInput {
    /// The setup header read from a bzImage, or `None` for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Length of the command line without the NUL.
    pub cmdline_len: u32,
    /// Guest address and size of the initramfs, if any.
    pub initramfs: Option<(u64, u64)>,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
}

/// The e820 map: low RAM up to the EBDA, a reserved hole up to 1 MiB, then RAM up to the
/// MMIO hole and, for larger VMs, the rest of RAM from 4 GiB (see [`crate::memory::ram_regions`]).
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
    ];
    for (addr, len) in crate::memory::ram_regions(mem_size) {
        let start = addr.max(HIGH_MEMORY_START);
        map.push(entry(start, addr + len - start, E820_RAM));
    }
    map
}

/// Builds the zero page.
pub fn build(input: &BootParamsInput) -> boot_params {
    let mut params = boot_params::default();
    let mut hdr = input.setup_header.unwrap_or_default();
    if input.setup_header.is_none() {
        hdr.boot_flag = BOOT_FLAG;
        hdr.header = HDRS_MAGIC;
        hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.cmd_line_ptr = input.cmdline_addr as u32;
    hdr.cmdline_size = input.cmdline_len;
    if let Some((addr, size)) = input.initramfs {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.hdr = hdr;
    let map = e820_map(input.mem_size);
    params.e820_table[..map.len()].copy_from_slice(&map);
    params.e820_entries = map.len() as u8;
    params
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`].
pub fn write(mem: &GuestMemoryMmap, params: &boot_params) -> Result<()> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| Error::BootSetup {
            what: "boot_params",
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Offsets from Documentation/arch/x86/boot.rst and zero-page.rst: if a binding update moved
    /// any of these, the kernel would read garbage.
    #[test]
    fn zero_page_fields_sit_at_boot_protocol_offsets() {
        assert_eq!(size_of::<boot_params>(), 4096);
        assert_eq!(offset_of!(boot_params, e820_entries), 0x1e8);
        assert_eq!(offset_of!(boot_params, hdr), 0x1f1);
        assert_eq!(offset_of!(boot_params, e820_table), 0x2d0);
        assert_eq!(size_of::<boot_e820_entry>(), 20);
        let hdr = offset_of!(boot_params, hdr);
        let at = |field: usize| hdr + field;
        assert_eq!(at(offset_of!(setup_header, setup_sects)), 0x1f1);
        assert_eq!(at(offset_of!(setup_header, boot_flag)), 0x1fe);
        assert_eq!(at(offset_of!(setup_header, header)), 0x202);
        assert_eq!(at(offset_of!(setup_header, version)), 0x206);
        assert_eq!(at(offset_of!(setup_header, type_of_loader)), 0x210);
        assert_eq!(at(offset_of!(setup_header, loadflags)), 0x211);
        assert_eq!(at(offset_of!(setup_header, code32_start)), 0x214);
        assert_eq!(at(offset_of!(setup_header, ramdisk_image)), 0x218);
        assert_eq!(at(offset_of!(setup_header, ramdisk_size)), 0x21c);
        assert_eq!(at(offset_of!(setup_header, cmd_line_ptr)), 0x228);
        assert_eq!(at(offset_of!(setup_header, initrd_addr_max)), 0x22c);
        assert_eq!(at(offset_of!(setup_header, kernel_alignment)), 0x230);
        assert_eq!(at(offset_of!(setup_header, cmdline_size)), 0x238);
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_hole() {
        let map = e820_map(256 << 20);
        let v: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            v,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, (256 << 20) - 0x100000, E820_RAM),
            ]
        );
        // Contiguous and non-overlapping, ending at the top of RAM.
        for w in map.windows(2) {
            let (a, s, b) = (w[0].addr, w[0].size, w[1].addr);
            assert_eq!(a + s, b);
        }
    }

    fn triples(mem_size: u64) -> Vec<(u64, u64, u32)> {
        e820_map(mem_size)
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect()
    }

    #[test]
    fn e820_splits_large_ram_around_the_mmio_hole() {
        const GIB: u64 = 1 << 30;
        let bios = [
            (0, 0x9fc00, E820_RAM),
            (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
        ];
        let with = |rest: &[(u64, u64, u32)]| [&bios[..], rest].concat();
        assert_eq!(triples(GIB), with(&[(0x100000, GIB - 0x100000, E820_RAM)]));
        assert_eq!(
            triples(3 * GIB + GIB / 2),
            with(&[
                (0x100000, 3 * GIB - 0x100000, E820_RAM),
                (4 * GIB, GIB / 2, E820_RAM),
            ])
        );
        assert_eq!(
            triples(8 * GIB),
            with(&[
                (0x100000, 3 * GIB - 0x100000, E820_RAM),
                (4 * GIB, 5 * GIB, E820_RAM),
            ])
        );
        // The RAM entries add up to the VM's size and none reaches into the MMIO hole.
        for size in [GIB, 3 * GIB + GIB / 2, 8 * GIB] {
            let map = triples(size);
            let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
            assert_eq!(ram + (0x100000 - 0x9fc00), size);
            let hole = super::super::layout::MMIO_HOLE_START..(4 * GIB);
            for (a, s, _) in map {
                assert!(a + s <= hole.start || a >= hole.end, "{a:#x}+{s:#x}");
            }
        }
        // The zero page holds them all.
        let params = build(&BootParamsInput {
            setup_header: None,
            cmdline_addr: 0x20000,
            cmdline_len: 0,
            initramfs: None,
            mem_size: 8 * GIB,
        });
        assert_eq!(params.e820_entries, 4);
        assert_eq!({ params.e820_table[3].addr }, 4 * GIB);
    }

    #[test]
    fn zero_page_bytes_for_vmlinux_boot() {
        let params = build(&BootParamsInput {
            setup_header: None,
            cmdline_addr: 0x20000,
            cmdline_len: 14,
            initramfs: Some((0x0f00_0000, 0x1234)),
            mem_size: 256 << 20,
        });
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        write(&mem, &params).unwrap();
        let mut page = [0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(ZERO_PAGE_ADDR))
            .unwrap();
        let u16_at = |o: usize| u16::from_le_bytes([page[o], page[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().unwrap());
        assert_eq!(u16_at(0x1fe), 0xaa55);
        assert_eq!(u32_at(0x202), HDRS_MAGIC);
        assert_eq!(page[0x210], 0xff);
        assert_eq!(u32_at(0x218), 0x0f00_0000);
        assert_eq!(u32_at(0x21c), 0x1234);
        assert_eq!(u32_at(0x228), 0x20000);
        assert_eq!(u32_at(0x230), DEFAULT_KERNEL_ALIGNMENT);
        assert_eq!(u32_at(0x238), 14);
        assert_eq!(page[0x1e8], 3);
        // Third e820 entry: addr, size, type packed in 20 bytes.
        let e = 0x2d0 + 2 * 20;
        assert_eq!(
            (u64_at(e), u64_at(e + 8), u32_at(e + 16)),
            (0x100000, (256 << 20) - 0x100000, 1)
        );
    }

    #[test]
    fn bzimage_header_is_kept_and_loader_fields_overridden() {
        let hdr = setup_header {
            version: 0x020f,
            loadflags: 1,
            header: HDRS_MAGIC,
            ..Default::default()
        };
        let params = build(&BootParamsInput {
            setup_header: Some(hdr),
            cmdline_addr: 0x20000,
            cmdline_len: 3,
            initramfs: None,
            mem_size: 64 << 20,
        });
        let got = params.hdr;
        assert_eq!({ got.version }, 0x020f);
        assert_eq!({ got.type_of_loader }, 0xff);
        assert_eq!({ got.ramdisk_size }, 0);
    }
}
