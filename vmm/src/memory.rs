//! Guest RAM: one memfd-backed, `MAP_SHARED` region starting at guest address 0.
//!
//! A memfd (rather than anonymous memory) lets out-of-process device back ends (vhost-user) map
//! the same pages; it has no name in the filesystem, so nothing is left behind when the VMM exits.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{kvm, Error, Result};

/// Guest memory as the rest of the crate (and device back ends) see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Creates the memfd of `size` bytes and maps it as guest RAM at address 0.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap> {
    let file = memfd("rootcell-guest-ram", size)?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| Error::Memory(format!("mapping {size} bytes: {e}")))
}

/// Creates an anonymous, close-on-exec memfd of `size` bytes.
fn memfd(name: &str, size: u64) -> Result<File> {
    let cname = std::ffi::CString::new(name).expect("static name has no NUL");
    // SAFETY: `cname` is a valid NUL-terminated string; the returned fd is checked below.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memory(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| Error::Memory(format!("sizing memfd to {size} bytes: {e}")))?;
    Ok(file)
}

/// The memfd backing guest RAM, for sharing with device back ends.
pub fn memory_file(mem: &GuestMemoryMmap) -> Option<&File> {
    mem.iter()
        .next()
        .and_then(|r| r.file_offset())
        .map(|f| f.file())
}

/// Tells KVM about every region of `mem` (one slot per region).
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(format!("host address of region {slot}: {e}")))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping described by `desc` lives as long as `mem`, which the VM owns and
        // drops only after the VM fd (and with it the memory slot) is closed.
        unsafe { vm.set_user_memory_region(desc) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_is_shared_through_the_memfd() {
        use std::os::unix::fs::FileExt;
        let mem = create_guest_memory(4 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let file = memory_file(&mem).expect("memfd backed");
        assert_eq!(file.metadata().unwrap().len(), 4 << 20);
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
