//! virtio devices behind the MMIO transport.
//!
//! A device implements [`VirtioDevice`] (what it offers, its config space, what to do once the
//! driver is ready); [`mmio::MmioTransport`] does everything register-related. The same device
//! logic can be served by other transports (vhost-user in the QEMU backend), so the trait says
//! nothing about MMIO.
//!
//! The spec's numbers come from `virtio-bindings` (the Linux uapi headers): device ids
//! (`virtio_ids`), status bits (`virtio_config::VIRTIO_CONFIG_S_*`), feature bit numbers (turned
//! into masks by [`feature_mask`] alone), MMIO register offsets and interrupt bits
//! (`virtio_mmio`), descriptor flags (`virtio_ring`), the virtio-net header and config layout.
//! What it lacks stays here, each with the reason: the MMIO magic value and version
//! ([`mmio::MMIO_MAGIC`], [`mmio::MMIO_VERSION`]) and our vendor id.

pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;
mod worker;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_bindings::{virtio_config, virtio_ring};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

/// The mask of feature bit number `bit`. virtio-bindings numbers feature bits (as the Linux
/// headers do: `VIRTIO_F_VERSION_1` is 32); the transport and the devices pass features around
/// as 64-bit masks, and every mask in this crate is made here.
pub const fn feature_mask(bit: u32) -> u64 {
    1 << bit
}

/// Mask of [`virtio_config::VIRTIO_F_VERSION_1`]: the device conforms to virtio 1.x (mandatory
/// for the MMIO v2 transport, which offers it for every device).
pub const VIRTIO_F_VERSION_1: u64 = feature_mask(virtio_config::VIRTIO_F_VERSION_1);
/// Mask of [`virtio_ring::VIRTIO_RING_F_INDIRECT_DESC`]: virtio-queue walks indirect tables
/// itself.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = feature_mask(virtio_ring::VIRTIO_RING_F_INDIRECT_DESC);
/// Mask of [`virtio_ring::VIRTIO_RING_F_EVENT_IDX`]: fewer interrupts and notifications; the
/// device crates' queue helpers handle both modes.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = feature_mask(virtio_ring::VIRTIO_RING_F_EVENT_IDX);

/// The interrupt a device raises towards the guest: a status word the driver reads and
/// acknowledges through the transport, and an eventfd KVM injects as the device's IRQ (irqfd).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    /// Wraps the irqfd eventfd.
    pub fn new(irq: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Marks `bits` pending and raises the IRQ.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irq.write(1)
    }

    /// Tells the driver a used ring has new entries.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.trigger(VIRTIO_MMIO_INT_VRING)
    }

    /// Pending bits (InterruptStatus register).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits (InterruptACK register).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd to register as irqfd.
    pub fn irq_fd(&self) -> &EventFd {
        &self.irq
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
#[error("activating virtio device: {0}")]
pub struct ActivateError(pub String);

/// A queue handed to an activated device, with the eventfd that fires when the guest notifies it.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The configured virtqueue.
    pub queue: Queue,
    /// Signalled on every QueueNotify for this queue (via ioeventfd, or by the transport).
    /// The transport's own eventfd, shared rather than duplicated: a device thread with an fd
    /// table of its own has the transport's number for it in its table (see
    /// [`TransportFds`]), but not a duplicate's made later.
    pub notify: std::sync::Arc<EventFd>,
}

/// The eventfds a transport raises a device's queue notifications and interrupt with. A
/// device whose I/O thread serves from an fd table of its own ([`fs::VirtioFs`] with its share
/// as root) makes them before that thread takes its copy of the process's table, and hands
/// them over ([`VirtioDevice::take_transport_fds`]): only fds that exist at that moment are
/// in its table, at the same numbers.
#[derive(Debug)]
pub struct TransportFds {
    /// One per queue, in queue order (registered as ioeventfds on QueueNotify).
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt (registered as its irqfd).
    pub irq: EventFd,
}

impl TransportFds {
    /// Fresh non-blocking eventfds for `queues` queues and the interrupt.
    pub fn new(queues: usize) -> std::io::Result<Self> {
        Ok(TransportFds {
            queue_evts: (0..queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<std::io::Result<_>>()?,
            irq: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Their numbers in the calling thread's table.
    pub fn raw_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.queue_evts
            .iter()
            .chain([&self.irq])
            .map(|e| e.as_raw_fd())
            .collect()
    }
}

/// The device side of virtio, independent of the transport.
pub trait VirtioDevice: Send {
    /// virtio device id (`virtio_bindings::virtio_ids::VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers ([`VIRTIO_F_VERSION_1`] is added by the transport).
    fn features(&self) -> u64;
    /// The eventfds the transport must use for this device, if it made them itself (see
    /// [`TransportFds`]); taken once, when the device is attached. None: the transport makes
    /// its own.
    fn take_transport_fds(&mut self) -> Option<TransportFds> {
        None
    }
    /// The features the driver accepted (a subset of what was offered), before activation.
    fn ack_features(&mut self, _features: u64) {}
    /// Reads device config space at `offset`; bytes beyond its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (most devices ignore this).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: start serving `queues` from `mem`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: std::sync::Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop using the queues. Returns false if the device cannot
    /// be reset (the transport then reports DEVICE_NEEDS_RESET instead of 0).
    fn reset(&mut self) -> bool {
        true
    }
    /// The VM is pausing: stop touching guest memory and raising interrupts. Returns false if
    /// the device could not (in time).
    fn pause(&mut self) -> bool {
        true
    }
    /// The VM resumes: serve the queues again.
    fn resume(&mut self) {}
}

/// Copies the part of `config` at `offset` into `data`; bytes past the end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
