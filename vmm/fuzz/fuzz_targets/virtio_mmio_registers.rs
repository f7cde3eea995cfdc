//! Fuzzes the virtio-mmio register interface: arbitrary sequences of guest reads and writes of
//! any width at any offset must never panic, and the transport's invariants must hold after
//! each access.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rootcell_vmm::devices::virtio::mmio::{MmioTransport, MMIO_MAGIC};
use rootcell_vmm::devices::virtio::{ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use rootcell_vmm::devices::MmioDevice;
use rootcell_vmm::memory::{create_guest_memory, GuestMemoryMmap};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_MAGIC_VALUE;

struct Dev;

impl VirtioDevice for Dev {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 64]
    }
    fn features(&self) -> u64 {
        0x3 | 1 << 40
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = if offset + (i as u64) < 8 { 0x42 } else { 0 };
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, _m: GuestMemoryMmap, i: Arc<Interrupt>, q: Vec<ActiveQueue>) -> Result<(), ActivateError> {
        // Exercise the interrupt path the way a device would.
        if !q.is_empty() {
            let _ = i.signal_used_queue();
        }
        Ok(())
    }
}

fn memory() -> GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| create_guest_memory(16 << 20).expect("guest memory")).clone()
}

fuzz_target!(|data: &[u8]| {
    let mut t = MmioTransport::new(Box::new(Dev), memory()).expect("transport");
    // Each access: [op, offset_lo, offset_hi, value x4]; op bit 0 = write, bits 1..=2 = width.
    for chunk in data.chunks_exact(7) {
        let write = chunk[0] & 1 == 1;
        let width = [1usize, 2, 4, 8][usize::from((chunk[0] >> 1) & 3)];
        let offset = u64::from(u16::from_le_bytes([chunk[1], chunk[2]]) & 0x1ff);
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&chunk[3..7]);
        if write {
            t.write(offset, &value[..width]);
        } else {
            t.read(offset, &mut value[..width]);
        }
        let mut magic = [0u8; 4];
        t.read(VIRTIO_MMIO_MAGIC_VALUE.into(), &mut magic);
        assert_eq!(u32::from_le_bytes(magic), MMIO_MAGIC);
        if t.is_activated() {
            assert_ne!(t.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0, "activated without DRIVER_OK");
        }
        if t.status() & VIRTIO_CONFIG_S_DRIVER_OK != 0 && t.status() & VIRTIO_CONFIG_S_FAILED == 0 {
            assert!(t.is_activated() || t.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0, "DRIVER_OK accepted but device neither active nor failed");
        }
    }
});
