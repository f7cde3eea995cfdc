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
    queue_evts: Vec<Arc<EventFd>>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`, with an eventfd per queue (to register as ioeventfds on QueueNotify,
    /// [`MmioTransport::queue_evts`]) and one for its interrupt (to register as its irqfd,
    /// [`MmioTransport::interrupt`]): the device's own if it made them
    /// ([`VirtioDevice::take_transport_fds`]), fresh ones otherwise.
    pub fn new(mut device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> std::io::Result<Self> {
        let fds = match device.take_transport_fds() {
            Some(fds) => fds,
            None => TransportFds::new(device.queue_max_sizes().len())?,
        };
        let sizes = device.queue_max_sizes();
        if fds.queue_evts.len() != sizes.len() {
            return Err(std::io::Error::other(format!(
                "{} queue eventfds for {} queues",
                fds.queue_evts.len(),
                sizes.len()
            )));
        }
        let mut queues = Vec::new();
        for &max in sizes {
            queues.push(
                Queue::new(max)
                    .map_err(|e| std::io::Error::other(format!("queue of size {max}: {e:?}")))?,
            );
        }
        let irq = fds.irq;
        let queue_evts = fds.queue_evts.into_iter().map(Arc::new).collect();
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
    pub fn queue_evts(&self) -> &[Arc<EventFd>] {
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

    /// One line on where the device and its driver stand, read from the registers and the
    /// rings in guest memory, for the report of a VM that was stopped: a guest that hangs
    /// waiting on a device shows here whether the device left a used entry the driver never
    /// took (a used index past the driver's `used_event`, the interrupt still pending in
    /// InterruptStatus) or the driver published buffers the device never took (an available
    /// index past `avail_event`). Per ready queue: `q<i> avail <driver's avail idx>/<device's
    /// avail_event> used <device's used idx>/<driver's used_event>` (the event fields mean
    /// something with EVENT_IDX only).
    pub fn ring_report(&self) -> String {
        let name = match self.device.device_type() {
            virtio_bindings::virtio_ids::VIRTIO_ID_NET => "net".to_string(),
            virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK => "vsock".to_string(),
            virtio_bindings::virtio_ids::VIRTIO_ID_FS => "fs".to_string(),
            other => format!("device {other}"),
        };
        let u16_at = |addr: u64| -> String {
            use vm_memory::Bytes;
            self.mem
                .read_obj::<u16>(vm_memory::GuestAddress(addr))
                .map_or_else(|_| "?".into(), |v| u16::from_le(v).to_string())
        };
        let queues: Vec<String> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .map(|(i, q)| {
                let size = u64::from(q.size());
                format!(
                    "q{i} avail {}/{} used {}/{}",
                    u16_at(q.avail_ring() + 2),
                    u16_at(q.used_ring() + 4 + 8 * size),
                    u16_at(q.used_ring() + 2),
                    u16_at(q.avail_ring() + 4 + 2 * size),
                )
            })
            .collect();
        format!(
            "{name}: status {:#x}, interrupt status {:#x}, {}",
            self.status,
            self.interrupt.status(),
            if queues.is_empty() {
                "no queue ready".to_string()
            } else {
                queues.join(", ")
            }
        )
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
                    notify: Arc::clone(e),
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
mod tests;
