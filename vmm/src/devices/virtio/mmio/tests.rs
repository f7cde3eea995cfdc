//! Unit tests of the transport, driven register by register as the Linux driver does.

use super::*;
use crate::memory::create_guest_memory;
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress};

/// What the test device saw, shared with the test.
#[derive(Default)]
struct Seen {
    acked: Option<u64>,
    activated: Option<usize>,
    resets: usize,
    notify: Vec<Arc<EventFd>>,
    interrupt: Option<Arc<Interrupt>>,
}

struct TestDevice {
    seen: Arc<Mutex<Seen>>,
    resettable: bool,
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 128]
    }
    fn features(&self) -> u64 {
        1 << 0 | 1 << 5
    }
    fn ack_features(&mut self, f: u64) {
        self.seen.lock().unwrap().acked = Some(f);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = 42u64.to_le_bytes(); // a vsock guest_cid
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn activate(
        &mut self,
        _m: GuestMemoryMmap,
        i: Arc<Interrupt>,
        q: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let mut s = self.seen.lock().unwrap();
        s.activated = Some(q.len());
        s.notify = q.into_iter().map(|a| a.notify).collect();
        s.interrupt = Some(i);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.seen.lock().unwrap().resets += 1;
        self.resettable
    }
}

fn transport(resettable: bool) -> (MmioTransport, Arc<Mutex<Seen>>, EventFd) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mem = create_guest_memory(16 << 20).unwrap();
    let t = MmioTransport::new(
        Box::new(TestDevice {
            seen: seen.clone(),
            resettable,
        }),
        mem,
    )
    .unwrap();
    let irq = t.interrupt().irq_fd().try_clone().unwrap();
    (t, seen, irq)
}

fn r(t: &mut MmioTransport, off: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(off.into(), &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, off: u32, v: u32) {
    t.write(off.into(), &v.to_le_bytes());
}

/// Drives the transport through the Linux driver's probe sequence up to FEATURES_OK.
fn negotiate(t: &mut MmioTransport) {
    w(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    w(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
}

/// Sets up queue `idx` with rings at well-separated, aligned addresses.
fn setup_queue(t: &mut MmioTransport, idx: u32, size: u32) {
    let base = 0x10_0000 + u64::from(idx) * 0x1_0000;
    w(t, VIRTIO_MMIO_QUEUE_SEL, idx);
    w(t, VIRTIO_MMIO_QUEUE_NUM, size);
    for (reg, addr) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, base),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x4000),
        (VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x8000),
    ] {
        w(t, reg, addr as u32);
        w(t, reg + 4, (addr >> 32) as u32);
    }
    w(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

#[test]
fn identification_registers() {
    let (mut t, _, _) = transport(true);
    assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 19);
    assert_eq!(r(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    // Partial-width register reads return zero rather than half a register.
    let mut two = [0xffu8; 2];
    t.read(VIRTIO_MMIO_MAGIC_VALUE.into(), &mut two);
    assert_eq!(two, [0, 0]);
}

#[test]
fn feature_negotiation_uses_the_select_registers() {
    let (mut t, seen, _) = transport(true);
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0b10_0001);
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
        1,
        "VERSION_1 is bit 32"
    );
    w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    // Before DRIVER, feature writes are ignored.
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
    negotiate(&mut t);
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0xb);
    assert_eq!(
        seen.lock().unwrap().acked,
        Some((1 << 5) | VIRTIO_F_VERSION_1)
    );
    // After FEATURES_OK the accepted set is frozen.
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    assert_eq!(t.driver_features, (1 << 5) | VIRTIO_F_VERSION_1);
}

#[test]
fn unoffered_features_are_dropped_and_version_1_is_required() {
    let (mut t, _, _) = transport(true);
    w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(
        &mut t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(t.driver_features, 0b10_0001);
    // A legacy driver (no VERSION_1) does not get FEATURES_OK; it must read it back and fail.
    w(
        &mut t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
        0
    );
}

#[test]
fn status_must_follow_the_initialisation_order() {
    let (mut t, seen, _) = transport(true);
    w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER); // skipping ACKNOWLEDGE
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(
        &mut t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
    ); // skipping FEATURES_OK
    assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w(
        &mut t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE); // clearing a bit without reset
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_STATUS),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    );
    assert!(seen.lock().unwrap().activated.is_none());
    w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_FAILED);
    assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
}

#[test]
fn queue_setup_and_activation() {
    let (mut t, seen, _) = transport(true);
    // Queue registers are ignored before FEATURES_OK.
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 64);
    assert_eq!(t.queues[0].size(), 256);
    negotiate(&mut t);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 128);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX),
        0,
        "nonexistent queue has max size 0"
    );
    setup_queue(&mut t, 0, 64);
    setup_queue(&mut t, 1, 64);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    let q = &t.queues[1];
    assert_eq!(
        (q.size(), q.desc_table(), q.avail_ring(), q.used_ring()),
        (64, 0x11_0000, 0x11_4000, 0x11_8000)
    );
    // A ready queue's registers are frozen.
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 32);
    assert_eq!(t.queues[1].size(), 64);
    w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
    assert!(t.is_activated());
    assert_eq!(
        seen.lock().unwrap().activated,
        Some(2),
        "only ready queues are handed over"
    );
    // After DRIVER_OK queue registers are frozen too.
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    assert_eq!(t.queues[2].size(), 128);
}

#[test]
fn invalid_queue_means_device_needs_reset() {
    let (mut t, seen, irq) = transport(true);
    negotiate(&mut t);
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 100); // not a power of two: refused, the size stays valid
    assert_eq!(t.queues[0].size(), 256);
    w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x4000_0000); // beyond the 16 MiB of guest memory
    w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
    assert!(!t.is_activated());
    assert_ne!(
        r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    assert!(irq.read().is_ok());
    assert!(seen.lock().unwrap().activated.is_none());
}

#[test]
fn notify_interrupt_and_ack() {
    let (mut t, seen, irq) = transport(true);
    negotiate(&mut t);
    setup_queue(&mut t, 0, 16);
    setup_queue(&mut t, 1, 16);
    w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 9); // out of range: ignored
    let s = seen.lock().unwrap();
    assert!(s.notify[0].read().is_err(), "queue 0 not notified");
    assert_eq!(s.notify[1].read().unwrap(), 1);
    s.interrupt.as_ref().unwrap().signal_used_queue().unwrap();
    drop(s);
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(
        r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn reset_returns_to_initial_state() {
    let (mut t, seen, _) = transport(true);
    negotiate(&mut t);
    setup_queue(&mut t, 0, 16);
    w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
    t.interrupt.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(seen.lock().unwrap().resets, 1);
    assert_eq!(
        (
            r(&mut t, VIRTIO_MMIO_STATUS),
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS)
        ),
        (0, 0)
    );
    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(t.queues[0].size(), 256, "queue back to its maximum size");
    assert_eq!(t.driver_features, 0);
    assert!(!t.is_activated());
    // And the device can be brought up again.
    negotiate(&mut t);
    setup_queue(&mut t, 0, 16);
    w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
    assert!(t.is_activated());
}

#[test]
fn device_that_cannot_reset_reports_needs_reset() {
    let (mut t, _, _) = transport(false);
    negotiate(&mut t);
    setup_queue(&mut t, 0, 16);
    w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
    w(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_ne!(
        r(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}

#[test]
fn config_space_reads_any_width() {
    let (mut t, _, _) = transport(true);
    let mut eight = [0u8; 8];
    t.read(VIRTIO_MMIO_CONFIG.into(), &mut eight);
    assert_eq!(u64::from_le_bytes(eight), 42);
    let mut one = [0u8; 1];
    t.read(VIRTIO_MMIO_CONFIG.into(), &mut one);
    assert_eq!(one[0], 42);
    assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG + 8), 0);
    assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
}

#[test]
fn used_ring_is_written_where_the_driver_put_it() {
    // A descriptor placed by the "driver" is popped and returned through the used ring at
    // the addresses programmed through the registers.
    let (mut t, _, _) = transport(true);
    negotiate(&mut t);
    setup_queue(&mut t, 0, 16);
    w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
    let mem = t.mem.clone();
    let (desc, avail, used) = (0x10_0000u64, 0x10_4000u64, 0x10_8000u64);
    // Descriptor 0: 0x2000 bytes at 0x20_0000, device-writable.
    mem.write_obj(0x20_0000u64, GuestAddress(desc)).unwrap();
    mem.write_obj(0x2000u32, GuestAddress(desc + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap();
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap(); // ring[0] = desc 0
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap(); // avail idx = 1
    let q = &mut t.queues[0];
    let chain = q.pop_descriptor_chain(&mem).expect("one chain available");
    assert_eq!(chain.head_index(), 0);
    q.add_used(&mem, 0, 0x100).unwrap();
    let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    let used_len: u32 = mem.read_obj(GuestAddress(used + 8)).unwrap();
    assert_eq!((used_idx, used_len), (1, 0x100));
}

#[test]
fn ring_report_reads_both_sides_of_each_ready_queue() {
    let (mut t, _, _) = transport(true);
    assert_eq!(
        t.ring_report(),
        "vsock: status 0x0, interrupt status 0x0, no queue ready"
    );
    negotiate(&mut t);
    setup_queue(&mut t, 0, 16);
    setup_queue(&mut t, 1, 16);
    w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
    let mem = t.mem.clone();
    // Queue 1 (rings at 0x11_0000): the driver published 7 buffers and wants an interrupt at
    // used entry 5; the device used 6 and wants a kick once past 7.
    let (avail, used) = (0x11_4000u64, 0x11_8000u64);
    mem.write_obj(7u16, GuestAddress(avail + 2)).unwrap();
    mem.write_obj(5u16, GuestAddress(avail + 4 + 2 * 16))
        .unwrap();
    mem.write_obj(6u16, GuestAddress(used + 2)).unwrap();
    mem.write_obj(7u16, GuestAddress(used + 4 + 8 * 16))
        .unwrap();
    t.interrupt.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
    assert_eq!(
        t.ring_report(),
        "vsock: status 0xf, interrupt status 0x1, q0 avail 0/0 used 0/0, q1 avail 7/7 used 6/5"
    );
}

/// Linux's handler reads InterruptStatus, then acknowledges what it read, then looks at the
/// rings. A used entry added after the read is announced by an interrupt of its own: the
/// irqfd fires for every trigger, also when the bit was still pending, so that on an
/// edge-triggered line nothing depends on the driver seeing the bit again.
#[test]
fn an_interrupt_raised_while_the_driver_handles_one_fires_again() {
    let (mut t, _, irq) = transport(true);
    negotiate(&mut t);
    setup_queue(&mut t, 0, 16);
    w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
    t.interrupt.signal_used_queue().unwrap();
    assert_eq!(irq.read().unwrap(), 1);
    let status = r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS);
    assert_eq!(status, VIRTIO_MMIO_INT_VRING);
    // The device adds another used entry before the driver acknowledges.
    t.interrupt.signal_used_queue().unwrap();
    w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, status);
    assert_eq!(
        irq.read().unwrap(),
        1,
        "the second trigger fired the irqfd too"
    );
    assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}
