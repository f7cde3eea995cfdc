//! Guest RAM: one memfd, mapped `MAP_SHARED` as one region from guest address 0 up to the
//! 32-bit MMIO hole and, for VMs larger than that, a second region from 4 GiB up (the memfd's
//! pages past the first region's end). The memfd is sparse: pages cost host memory only once
//! the guest touches them.
//!
//! A memfd (rather than anonymous memory) lets out-of-process device back ends (vhost-user) map
//! the same pages; it has no name in the filesystem, so nothing is left behind when the VMM exits.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{HIGH_RAM_START, MMIO_HOLE_START};
use crate::error::{kvm, Error, Result};

/// Guest memory as the rest of the crate (and device back ends) see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Where `size` bytes of guest RAM go: (guest address, length) of each region, in order.
/// RAM fills the space below the MMIO hole first, then continues at [`HIGH_RAM_START`].
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = vec![(0, low)];
    if size > low {
        regions.push((HIGH_RAM_START, size - low));
    }
    regions
}

/// End of the RAM region at address 0: where the kernel, initramfs and boot structures must
/// fit (the boot page tables and `initrd_addr_max` do not reach past 4 GiB anyway).
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// Creates the memfd of `size` bytes and maps it as guest RAM (see [`ram_regions`]).
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap> {
    let file = Arc::new(memfd("rootcell-guest-ram", size)?);
    let mut offset = 0;
    let ranges = ram_regions(size).into_iter().map(|(addr, len)| {
        let range = (
            GuestAddress(addr),
            len as usize,
            Some(FileOffset::from_arc(file.clone(), offset)),
        );
        offset += len;
        range
    });
    GuestMemoryMmap::from_ranges_with_files(ranges)
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

    const GIB: u64 = 1 << 30;

    #[test]
    fn ram_is_split_around_the_mmio_hole() {
        assert_eq!(ram_regions(GIB), [(0, GIB)]);
        assert_eq!(ram_regions(3 * GIB), [(0, 3 * GIB)]);
        assert_eq!(
            ram_regions(3 * GIB + GIB / 2),
            [(0, 3 * GIB), (4 * GIB, GIB / 2)]
        );
        assert_eq!(ram_regions(8 * GIB), [(0, 3 * GIB), (4 * GIB, 5 * GIB)]);
        assert_eq!(low_ram_end(GIB), GIB);
        assert_eq!(low_ram_end(8 * GIB), 3 * GIB);
    }

    /// VmRSS of this process, in KiB.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn eight_gib_of_memory_maps_two_regions_of_one_memfd_without_touching_it() {
        let before = rss_kib();
        let t = std::time::Instant::now();
        let mem = create_guest_memory(8 * GIB).unwrap();
        let took = t.elapsed();
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, ram_regions(8 * GIB));
        // The second region is the memfd's pages after the first: one file, shared.
        mem.write_obj(0x1234_5678_u32, GuestAddress(4 * GIB + 8))
            .unwrap();
        let file = memory_file(&mem).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8 * GIB);
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut buf, 3 * GIB + 8).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);
        // Nothing in the hole.
        assert!(mem.read_obj::<u8>(GuestAddress(MMIO_HOLE_START)).is_err());
        // Other tests of this binary run meanwhile, so allow them some growth: 8 GiB of
        // touched pages would be far beyond it.
        let grew = rss_kib().saturating_sub(before);
        assert!(grew < 64 << 10, "RSS grew by {grew} KiB");
        assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
        println!("8 GiB guest memory: created in {took:?}, RSS +{grew} KiB");
    }

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
