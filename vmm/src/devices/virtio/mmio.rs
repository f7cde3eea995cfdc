//! The virtio-mmio transport (virtio 1.2 §4.2, register layout version 2): a register-level
//! state machine in front of a [`VirtioDevice`].
//!
//! Queue notifications normally never reach this code: the VMM registers each queue's eventfd
//! as a KVM ioeventfd on QueueNotify (datamatch = queue index). A write that does arrive here
//! (no ioeventfd, e.g. in tests) signals the same eventfd, so devices see one mechanism.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::MmioDevice;

// virtio-bindings has the register offsets (`VIRTIO_MMIO_*`, from Linux's
// uapi/linux/virtio_mmio.h) but not the values the identification registers hold: the Linux
// driver spells the magic out where it checks it, and the version it accepts by number.

/// The MagicValue register's content, "virt" in little endian (virtio 1.2 §4.2.2; not in
/// virtio-bindings).
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The Version register's content: the modern (non-legacy) register layout (not in
/// virtio-bindings).
pub const MMIO_VERSION: u32 = 2;
/// Vendor id we report ("RCEL"): ours, so in no header.
pub const VENDOR_ID: u32 = 0x4c45_4352;

/// One virtio-mmio device window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd to register as the device's irqfd.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(
                Queue::new(max)
                    .map_err(|e| std::io::Error::other(format!("queue of size {max}: {e:?}")))?,
            );
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The per-queue notification eventfds, in queue order (to register as ioeventfds).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt (its eventfd is the irqfd).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device has been activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The VM is pausing: quiesce the device (see [`VirtioDevice::pause`]).
    pub fn pause(&mut self) -> bool {
        self.device.pause()
    }

    /// The VM resumes: let the device serve its queues again.
    pub fn resume(&mut self) {
        self.device.resume()
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only while features are negotiated, the driver is not yet
    /// running, and the selected queue is not enabled.
    fn queue_writable(&mut self) -> bool {
        self.status
            & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED)
            == VIRTIO_CONFIG_S_FEATURES_OK
            && self.selected_queue().is_some_and(|q| !q.ready())
    }

    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            // The device cannot start over: tell the driver instead of pretending.
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            let _ = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
            return;
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Applies a status write following the driver initialisation sequence (§3.1.1); writes
    /// that skip a step or clear bits (other than reset) are ignored.
    fn write_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        let old = self.status;
        if new & old != old {
            return; // only reset may clear bits
        }
        let added = new & !old;
        let ok = match added {
            VIRTIO_CONFIG_S_ACKNOWLEDGE => old == 0,
            VIRTIO_CONFIG_S_DRIVER => old == VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_FEATURES_OK => {
                old == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                    && self.driver_features & VIRTIO_F_VERSION_1 != 0
            }
            VIRTIO_CONFIG_S_DRIVER_OK => {
                old == VIRTIO_CONFIG_S_ACKNOWLEDGE
                    | VIRTIO_CONFIG_S_DRIVER
                    | VIRTIO_CONFIG_S_FEATURES_OK
            }
            0 => true,
            _ => false,
        };
        if !ok {
            return;
        }
        self.status = new;
        if added == VIRTIO_CONFIG_S_FEATURES_OK {
            self.device.ack_features(self.driver_features);
        }
        if added == VIRTIO_CONFIG_S_DRIVER_OK {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        let active: std::io::Result<Vec<ActiveQueue>> = self
            .queues
            .iter()
            .zip(&self.queue_evts)
            .filter(|(q, _)| q.ready())
            .map(|(q, e)| {
                let queue = Queue::try_from(q.state())
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
                Ok(ActiveQueue {
                    queue,
                    notify: e.try_clone()?,
                })
            })
            .collect();
        let result = match (valid, active) {
            (true, Ok(queues)) => self
                .device
                .activate(self.mem.clone(), self.interrupt.clone(), queues)
                .map_err(|e| e.to_string()),
            (false, _) => Err("a ready queue has invalid addresses or size".into()),
            (_, Err(e)) => Err(e.to_string()),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(_) => {
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                let _ = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        let features_writable =
            self.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED) == 0
                && self.status & VIRTIO_CONFIG_S_DRIVER != 0;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if features_writable => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                // Only offered bits can be accepted.
                let part = (u64::from(v) << shift) & self.offered_features();
                self.driver_features = (self.driver_features & !(0xffff_ffffu64 << shift)) | part;
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if self.queue_writable() => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if self.queue_writable() || v == 0 => {
                let writable = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
                if let Some(q) = self.selected_queue().filter(|_| writable) {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
                if self.queue_writable() =>
            {
                let q = self
                    .selected_queue()
                    .expect("queue_writable checked the selection");
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                match offset & !4 {
                    VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.write_status(v),
            _ => {} // read-only, unknown, or not writable in this state
        }
    }
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match register(offset) {
            Err(config) => self.device.read_config(config, data),
            Ok(reg) if data.len() == 4 && reg.is_multiple_of(4) => {
                data.copy_from_slice(&self.read_reg(reg).to_le_bytes());
            }
            Ok(_) => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match register(offset) {
            Err(config) => {
                // Config writes are only meaningful once the driver owns the device.
                if self.status & VIRTIO_CONFIG_S_DRIVER != 0 {
                    self.device.write_config(config, data);
                    self.config_generation = self.config_generation.wrapping_add(1);
                }
            }
            Ok(reg) if data.len() == 4 && reg.is_multiple_of(4) => self.write_reg(
                reg,
                u32::from_le_bytes(data.try_into().expect("length checked")),
            ),
            Ok(_) => {}
        }
    }
}

/// Where an access at `offset` in the window lands: `Ok` a register (below
/// [`VIRTIO_MMIO_CONFIG`], so it fits the bindings' `u32` offsets), `Err` an offset into the
/// device's config space.
fn register(offset: u64) -> std::result::Result<u32, u64> {
    match offset.checked_sub(u64::from(VIRTIO_MMIO_CONFIG)) {
        Some(config) => Err(config),
        None => Ok(u32::try_from(offset).expect("below VIRTIO_MMIO_CONFIG")),
    }
}

#[cfg(test)]
mod tests {
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
        notify: Vec<EventFd>,
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
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Box::new(TestDevice {
                seen: seen.clone(),
                resettable,
            }),
            mem,
            irq.try_clone().unwrap(),
        )
        .unwrap();
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
}
