//! Putting the guest's images into RAM: the kernel (ELF `vmlinux` or `bzImage`, told apart by
//! their magic numbers), the initramfs (as high as the kernel allows) and the command line.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIGH_MEMORY_START};
use crate::arch::x86_64::ptwalk::KernelSymbols;
use crate::error::{Error, Result};
use crate::memory::GuestMemoryMmap;

/// The two kernel image formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`; entered at its ELF entry point.
    Elf,
    /// A `bzImage`; entered at the 64-bit entry of its decompressor (load address + 0x200).
    BzImage,
}

/// Where the kernel ended up.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Which format it was.
    pub format: KernelFormat,
    /// Guest address of the 64-bit entry point.
    pub entry: u64,
    /// First guest address above everything the kernel occupies (for a bzImage: after it has
    /// decompressed itself, per `init_size`).
    pub end: u64,
    /// The setup header of a bzImage.
    pub setup_header: Option<setup_header>,
    /// The symbols the triple-fault report uses, from an ELF vmlinux's symbol table (empty for
    /// a bzImage or an image without one).
    pub symbols: KernelSymbols,
}

/// Offset of the bzImage setup header's "HdrS" magic.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
/// Setup header flag: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// Default `initrd_addr_max` for kernels that do not say (boot protocol < 2.03, and vmlinux).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Recognises the image format from its first bytes.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.len() >= 4 && &head[..4] == b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    if head.len() >= BZIMAGE_MAGIC_OFFSET + 4
        && &head[BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4] == b"HdrS"
    {
        return Some(KernelFormat::BzImage);
    }
    None
}

fn open(what: &'static str, path: &Path) -> Result<(File, u64)> {
    let io = |source| Error::ImageIo {
        what,
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok((file, meta.len()))
}

/// Loads the kernel at `path` into `mem`, below `mem_size` (the end of the RAM region at
/// address 0, see [`crate::memory::low_ram_end`]).
pub fn load_kernel(mem: &GuestMemoryMmap, mem_size: u64, path: &Path) -> Result<LoadedKernel> {
    let (mut file, len) = open("kernel", path)?;
    let mut head = vec![0u8; 1024];
    let n = read_up_to(&mut file, &mut head).map_err(|source| Error::ImageIo {
        what: "kernel",
        path: path.to_owned(),
        source,
    })?;
    head.truncate(n);
    let format = detect_format(&head).ok_or_else(|| Error::KernelFormat {
        path: path.to_owned(),
        magic: head.iter().take(8).copied().collect(),
    })?;
    let too_big = |reason: String| Error::KernelLoad {
        path: path.to_owned(),
        mem_mib: mem_size >> 20,
        reason,
    };
    if len + HIGH_MEMORY_START > mem_size {
        return Err(too_big(format!("image is {len} bytes")));
    }
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, high).map_err(|e| too_big(e.to_string()))?;
            if r.kernel_end > mem_size {
                return Err(too_big(format!(
                    "it needs memory up to {:#x}",
                    r.kernel_end
                )));
            }
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                end: r.kernel_end,
                setup_header: None,
                symbols: kernel_symbols(&file),
            })
        }
        KernelFormat::BzImage => {
            let r =
                BzImage::load(mem, None, &mut file, high).map_err(|e| too_big(e.to_string()))?;
            let hdr = r.setup_header.expect("bzImage loader returns its header");
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(too_big(
                    "the bzImage has no 64-bit entry point (XLF_KERNEL_64)".into(),
                ));
            }
            // The decompressor needs init_size bytes from its load address to unpack in place.
            let end =
                r.kernel_load.0 + u64::from(hdr.init_size).max(r.kernel_end - r.kernel_load.0);
            if end > mem_size {
                return Err(too_big(format!(
                    "it needs memory up to {end:#x} to decompress"
                )));
            }
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0 + 0x200,
                end,
                setup_header: Some(hdr),
                symbols: KernelSymbols::default(),
            })
        }
    }
}

/// Reads the symbols [`KernelSymbols`] names from an ELF image's symbol table; any failure
/// (no symbol table, a malformed one) leaves them empty: they only enrich a diagnostic and must
/// never stop a boot. The file is read through a cache of the ranges the parser asks for, so
/// only the headers, the symbol table and its string table are read (about 1.5 MB of a 15 MB
/// vmlinux), once, at load time.
pub fn kernel_symbols(file: &File) -> KernelSymbols {
    use object::read::elf::ElfFile64;
    use object::{Object, ObjectSymbol};
    let cache = object::ReadCache::new(file);
    let mut out = KernelSymbols::default();
    let Ok(elf) = ElfFile64::<object::Endianness, _>::parse(&cache) else {
        return out;
    };
    for sym in elf.symbols() {
        let slot = match sym.name_bytes() {
            Ok(b"init_top_pgt") => &mut out.init_top_pgt,
            Ok(b"early_top_pgt") => &mut out.early_top_pgt,
            Ok(b"_stext") => &mut out.stext,
            Ok(b"asm_exc_page_fault") => &mut out.page_fault_entry,
            Ok(b"phys_base") => &mut out.phys_base,
            _ => continue,
        };
        slot.get_or_insert(sym.address());
    }
    out
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Places the initramfs at the highest page-aligned address below both `mem_size` (the end of
/// the RAM region at address 0) and the kernel's `initrd_addr_max`, above the kernel; returns
/// (address, size). An empty file is refused: no kernel can use it, and it is a sign of a
/// failed image build.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<(u64, u64)> {
    let (mut file, size) = open("initramfs", path)?;
    let max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = mem_size.min(max + 1);
    let floor = kernel.end.next_multiple_of(0x1000);
    let avail = top.saturating_sub(floor);
    if size == 0 {
        return Err(Error::InitramfsEmpty {
            path: path.to_owned(),
        });
    }
    if size > avail {
        return Err(Error::InitramfsTooLarge {
            path: path.to_owned(),
            size,
            avail,
        });
    }
    let addr = (top - size) & !0xfff;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::ImageIo {
            what: "initramfs",
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

/// Checks the command line and writes it NUL-terminated at [`CMDLINE_ADDR`]; returns its length.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u32> {
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::Cmdline("contains a NUL byte".into()));
    }
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(Error::Cmdline(format!(
            "{} bytes, at most {} allowed",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| Error::BootSetup {
            what: "command line",
            reason: e.to_string(),
        })?;
    Ok(cmdline.len() as u32)
}

#[cfg(test)]
mod tests;
