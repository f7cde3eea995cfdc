//! Pieces of the hand-assembled guest drivers: x86 stores into a virtio-mmio window, and the
//! register writes that bring a device up the way the Linux driver does.

use rootcell_vmm::devices::virtio::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;

/// `mov eax, imm32; mov [abs64], eax`
pub fn store(code: &mut Vec<u8>, addr: u64, value: u32) {
    code.push(0xb8);
    code.extend_from_slice(&value.to_le_bytes());
    code.push(0xa3);
    code.extend_from_slice(&addr.to_le_bytes());
}

/// Stores each `(register, value)` into the window at `base`, in order.
pub fn store_all(code: &mut Vec<u8>, base: u64, writes: &[(u32, u32)]) {
    for &(reg, value) in writes {
        store(code, base + u64::from(reg), value);
    }
}

/// The register writes from reset to DRIVER_OK: ACKNOWLEDGE, DRIVER, VIRTIO_F_VERSION_1 as the
/// only feature (no EVENT_IDX: every used entry interrupts), FEATURES_OK, then each
/// `(queue, size, rings)` with its descriptor table at `rings`, available ring at
/// `rings + 0x4000` and used ring at `rings + 0x8000`, made ready; DRIVER_OK last.
pub fn bring_up(queues: &[(u32, u32, u32)]) -> Vec<(u32, u32)> {
    let ack = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    let driver = ack | VIRTIO_CONFIG_S_DRIVER;
    let features_ok = driver | VIRTIO_CONFIG_S_FEATURES_OK;
    let mut writes = vec![
        (VIRTIO_MMIO_STATUS, ack),
        (VIRTIO_MMIO_STATUS, driver),
        (VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1),
        (
            VIRTIO_MMIO_DRIVER_FEATURES,
            (VIRTIO_F_VERSION_1 >> 32) as u32,
        ),
        (VIRTIO_MMIO_STATUS, features_ok),
    ];
    for &(queue, size, rings) in queues {
        writes.extend([
            (VIRTIO_MMIO_QUEUE_SEL, queue),
            (VIRTIO_MMIO_QUEUE_NUM, size),
            (VIRTIO_MMIO_QUEUE_DESC_LOW, rings),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, rings + 0x4000),
            (VIRTIO_MMIO_QUEUE_USED_LOW, rings + 0x8000),
            (VIRTIO_MMIO_QUEUE_READY, 1),
        ]);
    }
    writes.push((VIRTIO_MMIO_STATUS, features_ok | VIRTIO_CONFIG_S_DRIVER_OK));
    writes
}
