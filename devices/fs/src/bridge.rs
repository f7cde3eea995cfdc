//! Lets a VMM built on newer rust-vmm crates drive [`crate::FsDevice`].
//!
//! fuse-backend-rs pins vm-memory 0.17.1 and virtio-queue 0.17, so the device's memory and queue
//! types are those versions (re-exported as `rootcell_fs::vm_memory` / `rootcell_fs::virtio_queue`).
//! A VMM on other versions keeps its own types and hands over plain facts: where guest RAM is
//! mapped in this process and the split-ring addresses its virtio-mmio registers hold. No memory
//! is copied or mapped again.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::Error;

/// One guest RAM region as the VMM has it mapped in this process.
#[derive(Debug, Clone, Copy)]
pub struct RawRegion {
    /// Guest physical address of the region's first byte.
    pub guest_addr: u64,
    /// Host virtual address the region is mapped at (page aligned, read/write, shared or private).
    pub host_addr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

/// Builds a view of guest RAM over the VMM's existing mappings.
///
/// # Safety
/// Every region must be a live read/write mapping of `len` bytes at `host_addr` that stays
/// mapped for as long as the returned memory (or anything built from it) is used. The view
/// never unmaps it.
pub unsafe fn guest_memory_view(regions: &[RawRegion]) -> Result<GuestMemoryMmap, Error> {
    let mut built = Vec::with_capacity(regions.len());
    for region in regions {
        // SAFETY: the caller guarantees the mapping exists and outlives the view; build_raw
        // marks it as not owned, so dropping the view does not unmap it.
        let mapping = unsafe {
            MmapRegion::build_raw(
                region.host_addr,
                region.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|e| Error::GuestMemory(format!("region at {:#x}: {e}", region.guest_addr)))?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr)).ok_or_else(|| {
                Error::GuestMemory(format!("region at {:#x} overflows", region.guest_addr))
            })?;
        built.push(region);
    }
    GuestMemoryMmap::from_regions(built).map_err(|e| Error::GuestMemory(e.to_string()))
}

/// A split virtqueue as a virtio-mmio transport's registers describe it.
#[derive(Debug, Clone, Copy)]
pub struct QueueLayout {
    /// Queue size the driver chose (QueueNum).
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
}

/// Builds a ready queue for `layout`; keep it across kicks (it tracks the ring positions).
pub fn queue_from_layout(layout: &QueueLayout, max_size: u16) -> Result<Queue, Error> {
    let queue_err = |e: virtio_queue::Error| Error::Queue(e.to_string());
    let mut queue = Queue::new(max_size).map_err(queue_err)?;
    queue.try_set_size(layout.size).map_err(queue_err)?;
    queue
        .try_set_desc_table_address(GuestAddress(layout.desc_table))
        .map_err(queue_err)?;
    queue
        .try_set_avail_ring_address(GuestAddress(layout.avail_ring))
        .map_err(queue_err)?;
    queue
        .try_set_used_ring_address(GuestAddress(layout.used_ring))
        .map_err(queue_err)?;
    queue.set_event_idx(layout.event_idx);
    queue.set_ready(true);
    Ok(queue)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemory};

    use super::*;

    #[test]
    fn view_sees_the_vmm_mapping_and_does_not_unmap_it() {
        let len = 0x10000;
        // SAFETY: an anonymous private mapping owned by this test.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let region = RawRegion {
            guest_addr: 0x8000_0000,
            host_addr: addr.cast(),
            len,
        };
        // SAFETY: the mapping lives until the munmap below, after the view is dropped.
        let mem = unsafe { guest_memory_view(&[region]) }.unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x8000_0010))
            .unwrap();
        // SAFETY: offset 0x10 is inside the mapping.
        let seen = unsafe { *(addr.cast::<u8>().add(0x10).cast::<u32>()) };
        assert_eq!(seen, 0xdead_beef);
        assert!(mem.address_in_range(GuestAddress(0x8000_ffff)));
        drop(mem);
        // Still mapped after the view is gone.
        // SAFETY: as above.
        let still = unsafe { *(addr.cast::<u8>().add(0x10).cast::<u32>()) };
        assert_eq!(still, 0xdead_beef);
        // SAFETY: unmapping the test's own mapping.
        unsafe { libc::munmap(addr, len) };
    }

    #[test]
    fn queue_from_layout_is_valid_in_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let layout = QueueLayout {
            size: 16,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            event_idx: true,
        };
        let queue = queue_from_layout(&layout, 256).unwrap();
        assert!(queue.is_valid(&mem));
        assert!(queue.event_idx_enabled());
        let bad = QueueLayout { size: 3, ..layout };
        assert!(queue_from_layout(&bad, 256).is_err());
    }
}
