//! Unit tests of the kernel, initramfs and command-line loading.

use super::*;
use crate::memory::create_guest_memory;
use std::io::Write;

fn temp(name: &str, bytes: &[u8]) -> tempfile_path::TempPath {
    tempfile_path::TempPath::new(name, bytes)
}

/// Minimal self-cleaning temp file helper (no extra dependency).
mod tempfile_path {
    use std::path::{Path, PathBuf};
    pub struct TempPath(PathBuf);
    impl TempPath {
        pub fn new(name: &str, bytes: &[u8]) -> Self {
            let p = std::env::temp_dir()
                .join(format!("rootcell-vmm-test-{}-{name}", std::process::id()));
            std::fs::write(&p, bytes).unwrap();
            TempPath(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// A minimal 64-bit ELF with one PT_LOAD segment of `filesz` bytes at physical `paddr`.
fn tiny_elf(paddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&paddr.to_le_bytes()); // entry
    v.extend_from_slice(&64u64.to_le_bytes()); // phoff
    v.extend_from_slice(&0u64.to_le_bytes()); // shoff
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    v.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    v.extend_from_slice(&1u16.to_le_bytes()); // phnum
    v.extend_from_slice(&[0; 6]);
    assert_eq!(v.len(), 64);
    v.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    v.extend_from_slice(&5u32.to_le_bytes());
    v.extend_from_slice(&120u64.to_le_bytes()); // offset
    v.extend_from_slice(&paddr.to_le_bytes()); // vaddr
    v.extend_from_slice(&paddr.to_le_bytes()); // paddr
    v.extend_from_slice(&filesz.to_le_bytes());
    v.extend_from_slice(&memsz.to_le_bytes());
    v.extend_from_slice(&0x20_0000u64.to_le_bytes());
    assert_eq!(v.len(), 120);
    v.extend(std::iter::repeat_n(0x90u8, filesz as usize));
    v
}

#[test]
fn detects_formats_by_magic() {
    assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
    let mut bz = vec![0u8; 0x300];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
    assert_eq!(detect_format(b"#!/bin/sh\n"), None);
    assert_eq!(detect_format(b""), None);
}

#[test]
fn loads_elf_at_its_physical_address() {
    let mem = create_guest_memory(32 << 20).unwrap();
    let k = temp("k.elf", &tiny_elf(0x100_0000, 16, 0x1000));
    let l = load_kernel(&mem, 32 << 20, k.path()).unwrap();
    assert_eq!(
        (l.format, l.entry, l.end),
        (KernelFormat::Elf, 0x100_0000, 0x100_1000)
    );
    let b: u8 = mem.read_obj(GuestAddress(0x100_000f)).unwrap();
    assert_eq!(b, 0x90);
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let mem = create_guest_memory(16 << 20).unwrap();
    let e = load_kernel(&mem, 16 << 20, Path::new("/nonexistent/vmlinux")).unwrap_err();
    assert!(matches!(e, Error::ImageIo { what: "kernel", .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
}

#[test]
fn non_kernel_is_rejected_with_its_magic() {
    let mem = create_guest_memory(16 << 20).unwrap();
    let k = temp("script", b"#!/bin/sh\necho hi\n");
    let e = load_kernel(&mem, 16 << 20, k.path()).unwrap_err();
    assert!(matches!(e, Error::KernelFormat { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("neither an ELF vmlinux nor a bzImage"),
        "{e}"
    );
    let d = load_kernel(&mem, 16 << 20, Path::new("/tmp")).unwrap_err();
    assert!(
        matches!(d, Error::ImageIo { .. }),
        "a directory is not a kernel: {d}"
    );
}

#[test]
fn kernel_too_large_for_memory() {
    let mem = create_guest_memory(16 << 20).unwrap();
    // Segment placed at 15 MiB with 4 MiB of bss: ends beyond 16 MiB of RAM.
    let k = temp("big.elf", &tiny_elf(0xf0_0000, 16, 4 << 20));
    let e = load_kernel(&mem, 16 << 20, k.path()).unwrap_err();
    assert!(matches!(e, Error::KernelLoad { .. }), "{e}");
    // A file bigger than RAM is refused before reading it.
    let mut f = std::fs::File::create(std::env::temp_dir().join("rootcell-vmm-huge")).unwrap();
    f.write_all(b"\x7fELF").unwrap();
    f.set_len(17 << 20).unwrap();
    let e = load_kernel(
        &mem,
        16 << 20,
        &std::env::temp_dir().join("rootcell-vmm-huge"),
    )
    .unwrap_err();
    std::fs::remove_file(std::env::temp_dir().join("rootcell-vmm-huge")).unwrap();
    assert!(
        e.to_string().contains("cannot be loaded into 16 MiB"),
        "{e}"
    );
}

#[test]
fn bzimage_without_valid_header_is_refused() {
    let mem = create_guest_memory(16 << 20).unwrap();
    let mut bz = vec![0u8; 0x1000];
    bz[0x202..0x206].copy_from_slice(b"HdrS"); // magic but version 0 and no LOADED_HIGH
    let k = temp("bad.bz", &bz);
    let e = load_kernel(&mem, 16 << 20, k.path()).unwrap_err();
    assert!(matches!(e, Error::KernelLoad { .. }), "{e}");
}

#[test]
fn initramfs_goes_high_and_must_fit() {
    let mem = create_guest_memory(32 << 20).unwrap();
    let kernel = LoadedKernel {
        format: KernelFormat::Elf,
        entry: 0x100_0000,
        end: 0x180_0000,
        setup_header: None,
        symbols: Default::default(),
    };
    let i = temp("initrd", &[7u8; 5000]);
    let (addr, size) = load_initramfs(&mem, 32 << 20, &kernel, i.path()).unwrap();
    assert_eq!(size, 5000);
    assert_eq!(addr % 0x1000, 0);
    assert!(addr + size <= 32 << 20 && addr >= kernel.end);
    let b: u8 = mem.read_obj(GuestAddress(addr + 4999)).unwrap();
    assert_eq!(b, 7);
    let empty = temp("emptyrd", b"");
    let e = load_initramfs(&mem, 32 << 20, &kernel, empty.path()).unwrap_err();
    assert!(matches!(e, Error::InitramfsEmpty { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("initramfs {} is empty", empty.path().display())
    );
    let big = temp("bigrd", &vec![0u8; 9 << 20]);
    let e = load_initramfs(&mem, 32 << 20, &kernel, big.path()).unwrap_err();
    assert!(matches!(e, Error::InitramfsTooLarge { .. }), "{e}");
    let e = load_initramfs(&mem, 32 << 20, &kernel, Path::new("/nonexistent/initrd")).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ImageIo {
                what: "initramfs",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn cmdline_is_nul_terminated_and_bounded() {
    let mem = create_guest_memory(2 << 20).unwrap();
    assert_eq!(load_cmdline(&mem, "console=ttyS0").unwrap(), 13);
    let mut buf = [0u8; 14];
    mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
        .unwrap();
    assert_eq!(&buf, b"console=ttyS0\0");
    assert!(matches!(
        load_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)),
        Err(Error::Cmdline(_))
    ));
    assert!(matches!(load_cmdline(&mem, "a\0b"), Err(Error::Cmdline(_))));
}

#[test]
fn symbols_come_from_a_real_vmlinux_and_not_from_a_bare_elf() {
    // A hand-made ELF has no symbol table: nothing found, nothing failed.
    let k = temp("bare.elf", &tiny_elf(0x100_0000, 0x100, 0x100));
    let f = std::fs::File::open(k.path()).unwrap();
    assert!(kernel_symbols(&f).is_empty());
    let Some(vmlinux) = rootcell_test_support::vmlinux() else {
        eprintln!("skipped the vmlinux half: no guest vmlinux (scripts/build.sh)");
        return;
    };
    let s = kernel_symbols(&std::fs::File::open(&vmlinux).unwrap());
    // Our kernels are linked at 0xffffffff81000000 (16 MiB physical), without KASLR.
    assert_eq!(s.stext, Some(0xffff_ffff_8100_0000), "{s:?}");
    for a in [
        s.init_top_pgt,
        s.early_top_pgt,
        s.page_fault_entry,
        s.phys_base,
    ] {
        assert!(a.is_some_and(|a| a > s.stext.unwrap()), "{s:?}");
    }
    let mem = create_guest_memory(64 << 20).unwrap();
    let loaded = load_kernel(&mem, 64 << 20, &vmlinux).unwrap();
    assert_eq!(loaded.symbols, s);
    // The tables are loaded where the walk looks for them: early_top_pgt's entry 511 maps the
    // kernel (level3_kernel_pgt, present), as head_64.S builds it; init_top_pgt is empty until
    // x86_64_start_kernel copies that entry in.
    let gpa = |va: Option<u64>| crate::arch::x86_64::ptwalk::kernel_gpa(va.unwrap()).unwrap();
    let e: u64 = mem
        .read_obj(GuestAddress(gpa(s.early_top_pgt) + 511 * 8))
        .unwrap();
    assert_eq!(e & 1, 1, "early_top_pgt[511] = {e:#x}");
    let e: u64 = mem
        .read_obj(GuestAddress(gpa(s.init_top_pgt) + 511 * 8))
        .unwrap();
    assert_eq!(e, 0, "init_top_pgt[511] in the image");
}
