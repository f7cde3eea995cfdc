//! A virtio-mmio split-queue driver for device tests, written from the driver's side of the
//! spec: it probes the device through the MMIO registers, lays descriptor tables and rings out
//! in guest memory, notifies queues through their eventfds (what KVM's ioeventfd does), and
//! waits for the device's interrupt before reading the used ring.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use rootcell_vmm::devices::virtio::mmio::{MmioTransport, MMIO_MAGIC};
use rootcell_vmm::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use rootcell_vmm::devices::MmioDevice;
use rootcell_vmm::memory::{create_guest_memory, GuestMemoryMmap};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Queue size the driver picks (if the device allows that many).
const QUEUE_SIZE: u16 = 64;
/// Where queue `i`'s rings live.
const RINGS_BASE: u64 = 0x10_0000;
/// Where data buffers live: one 68 KiB slot per (queue, descriptor).
const BUFFERS_BASE: u64 = 0x100_0000;
const BUFFER_SLOT: u64 = 0x1_1000;
/// Guest RAM of the test "VM".
const MEM_SIZE: u64 = 64 << 20;

/// One buffer of a chain as the driver offers it.
pub enum Buf {
    /// Device-readable bytes.
    Readable(Vec<u8>),
    /// Device-writable space of this many bytes.
    Writable(u32),
    /// A descriptor the test places itself (e.g. outside guest RAM); nothing is written there.
    At {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u32,
        /// Device-writable.
        writable: bool,
    },
}

/// A used-ring entry with the bytes the device wrote.
#[derive(Debug)]
pub struct Used {
    /// Head descriptor of the chain.
    pub head: u16,
    /// `len` of the used element.
    pub len: u32,
    /// The first `len` bytes of the chain's writable buffers.
    pub data: Vec<u8>,
}

/// A chain the device has not returned yet: its descriptors and writable (address, size) buffers.
type InFlight = (Vec<u16>, Vec<(u64, u32)>);

struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    /// Each chain in flight, by head.
    chains: HashMap<u16, InFlight>,
    avail_idx: u16,
    used_idx: u16,
    /// The device's used index read right after the last interrupt: entries below it were
    /// announced by an interrupt.
    covered: u16,
    /// `avail_idx` when the driver last decided whether to kick ([`MmioDriver::kick`]).
    kicked_at: u16,
    /// An interrupt found new used entries here and the callback that takes them has not
    /// finished ([`MmioDriver::take_used`]).
    armed: bool,
}

/// A driver bound to one device behind a virtio-mmio transport.
pub struct MmioDriver {
    /// The transport (the register window).
    pub transport: MmioTransport,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The device's irqfd, as KVM would see it.
    pub irq: EventFd,
    queues: Vec<DriverQueue>,
    event_idx: bool,
    /// Interrupts taken so far (irqfd fired with the used-ring bit set).
    pub interrupts: u64,
}

impl MmioDriver {
    /// Puts `device` behind a transport with fresh guest memory.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = create_guest_memory(MEM_SIZE).unwrap();
        let transport = MmioTransport::new(device, mem.clone()).unwrap();
        let irq = transport.interrupt().irq_fd().try_clone().unwrap();
        MmioDriver {
            transport,
            mem,
            irq,
            queues: Vec::new(),
            event_idx: false,
            interrupts: 0,
        }
    }

    /// Reads a 32-bit register.
    pub fn read(&mut self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off.into(), &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write(&mut self, off: u32, v: u32) {
        self.transport.write(off.into(), &v.to_le_bytes());
    }

    /// Reads `len` bytes of device config space.
    pub fn config(&mut self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.transport.read(VIRTIO_MMIO_CONFIG.into(), &mut b);
        b
    }

    /// The Linux probe sequence: identify, negotiate `wanted` features (plus VERSION_1), set
    /// up `nqueues` queues and set DRIVER_OK. Returns the negotiated features.
    pub fn probe(&mut self, device_id: u32, wanted: u64, nqueues: usize) -> u64 {
        assert_eq!(self.read(VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(self.read(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(self.read(VIRTIO_MMIO_DEVICE_ID), device_id);
        self.write(VIRTIO_MMIO_STATUS, 0);
        self.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        let mut offered = 0u64;
        for sel in 0..2 {
            self.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(VIRTIO_MMIO_DEVICE_FEATURES)) << (32 * sel);
        }
        assert_ne!(offered & VIRTIO_F_VERSION_1, 0, "modern device");
        let features = offered & (wanted | VIRTIO_F_VERSION_1);
        for sel in 0..2 {
            self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.write(VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write(VIRTIO_MMIO_STATUS, s);
        assert_eq!(
            self.read(VIRTIO_MMIO_STATUS),
            s,
            "device accepted the features"
        );
        self.event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        self.queues.clear();
        for i in 0..nqueues {
            self.write(VIRTIO_MMIO_QUEUE_SEL, i as u32);
            let max = self.read(VIRTIO_MMIO_QUEUE_NUM_MAX) as u16;
            assert!(max > 0, "queue {i} exists");
            let size = max.min(QUEUE_SIZE);
            let base = RINGS_BASE + i as u64 * 0x1_0000;
            let q = DriverQueue {
                size,
                desc: base,
                avail: base + 0x4000,
                used: base + 0x8000,
                free: (0..size).rev().collect(),
                chains: HashMap::new(),
                avail_idx: 0,
                used_idx: 0,
                covered: 0,
                kicked_at: 0,
                armed: false,
            };
            // Fresh rings: zeroed indices and flags.
            self.mem
                .write_slice(&[0u8; 0x1_0000], GuestAddress(base))
                .unwrap();
            self.write(VIRTIO_MMIO_QUEUE_NUM, size.into());
            for (reg, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail),
                (VIRTIO_MMIO_QUEUE_USED_LOW, q.used),
            ] {
                self.write(reg, addr as u32);
                self.write(reg + 4, (addr >> 32) as u32);
            }
            self.write(VIRTIO_MMIO_QUEUE_READY, 1);
            self.queues.push(q);
        }
        self.write(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        let status = self.read(VIRTIO_MMIO_STATUS);
        assert_eq!(
            status & VIRTIO_CONFIG_S_NEEDS_RESET,
            0,
            "device activation failed"
        );
        assert_eq!(status, s | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(self.transport.is_activated());
        features
    }

    /// Writes 0 to the status register (device reset).
    pub fn reset(&mut self) {
        self.write(VIRTIO_MMIO_STATUS, 0);
    }

    /// Offers one chain on queue `qi` (not yet notified); returns its head.
    pub fn offer(&mut self, qi: usize, bufs: &[Buf]) -> u16 {
        let mem = self.mem.clone();
        let q = &mut self.queues[qi];
        assert!(q.free.len() >= bufs.len(), "queue {qi} out of descriptors");
        let ids: Vec<u16> = (0..bufs.len()).map(|_| q.free.pop().unwrap()).collect();
        let mut writable = Vec::new();
        for (n, (buf, &id)) in bufs.iter().zip(&ids).enumerate() {
            let mut addr =
                BUFFERS_BASE + (qi as u64 * u64::from(QUEUE_SIZE) + u64::from(id)) * BUFFER_SLOT;
            let (len, mut flags) = match buf {
                Buf::Readable(bytes) => {
                    assert!(bytes.len() as u64 <= BUFFER_SLOT);
                    mem.write_slice(bytes, GuestAddress(addr)).unwrap();
                    (bytes.len() as u32, 0)
                }
                Buf::Writable(len) => {
                    assert!(u64::from(*len) <= BUFFER_SLOT);
                    writable.push((addr, *len));
                    (*len, VRING_DESC_F_WRITE as u16)
                }
                Buf::At {
                    addr: at,
                    len,
                    writable: w,
                } => {
                    addr = *at;
                    (*len, if *w { VRING_DESC_F_WRITE as u16 } else { 0 })
                }
            };
            let next = ids.get(n + 1).copied().unwrap_or(0);
            if n + 1 < ids.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = q.desc + u64::from(id) * 16;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        let head = ids[0];
        let slot = u64::from(q.avail_idx % q.size);
        mem.write_obj(head, GuestAddress(q.avail + 4 + slot * 2))
            .unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(q.avail_idx, GuestAddress(q.avail + 2))
            .unwrap();
        q.chains.insert(head, (ids, writable));
        head
    }

    /// Notifies queue `qi` by signalling its eventfd, as KVM's ioeventfd does.
    pub fn notify(&mut self, qi: usize) {
        self.transport.queue_evts()[qi].write(1).unwrap();
    }

    /// Offers a chain and notifies.
    pub fn send(&mut self, qi: usize, bufs: &[Buf]) -> u16 {
        let head = self.offer(qi, bufs);
        self.notify(qi);
        head
    }

    fn pop_used(&mut self, qi: usize) -> Option<Used> {
        let event_idx = self.event_idx;
        let device_idx = self.used_index(qi);
        let q = &self.queues[qi];
        if device_idx == q.used_idx {
            return None;
        }
        // Without EVENT_IDX every used entry must be followed by an interrupt. With it, a
        // driver legitimately finds entries by re-checking after moving used_event (the
        // device may skip the interrupt then), so only the total count is checked by tests.
        let announced = q.covered.wrapping_sub(q.used_idx);
        if !event_idx && (announced == 0 || announced >= 0x8000) {
            return None;
        }
        let used = self.next_used_entry(qi);
        if event_idx {
            // used_event: interrupt me again as soon as the next entry arrives.
            self.set_used_event(qi);
        }
        Some(used)
    }

    /// The device's used index of queue `qi`.
    fn used_index(&self, qi: usize) -> u16 {
        let q = &self.queues[qi];
        self.mem.read_obj(GuestAddress(q.used + 2)).unwrap()
    }

    /// With EVENT_IDX: asks for an interrupt as soon as the entry after those taken arrives
    /// (`used_event` = the driver's used index).
    fn set_used_event(&mut self, qi: usize) {
        let q = &self.queues[qi];
        let used_event = q.avail + 4 + u64::from(q.size) * 2;
        self.mem
            .write_obj(q.used_idx, GuestAddress(used_event))
            .unwrap();
    }

    /// Takes the next used entry of queue `qi` (the caller checked there is one) and frees
    /// its descriptors.
    fn next_used_entry(&mut self, qi: usize) -> Used {
        let mem = self.mem.clone();
        let q = &mut self.queues[qi];
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let e = q.used + 4 + u64::from(q.used_idx % q.size) * 8;
        let head = mem.read_obj::<u32>(GuestAddress(e)).unwrap() as u16;
        let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
        q.used_idx = q.used_idx.wrapping_add(1);
        let (ids, writable) = q.chains.remove(&head).expect("used head was offered");
        q.free.extend(ids);
        let mut data = Vec::new();
        let mut left = len as usize;
        for (addr, size) in writable {
            let n = left.min(size as usize);
            let mut b = vec![0u8; n];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            data.extend_from_slice(&b);
            left -= n;
        }
        Used { head, len, data }
    }

    /// Notifies queue `qi` only if the device asked for it, as Linux's `virtqueue_kick`
    /// decides: with EVENT_IDX when the available index passed the device's `avail_event`
    /// since the last decision, without it unless the device set `VRING_USED_F_NO_NOTIFY`.
    /// Returns whether it notified.
    pub fn kick(&mut self, qi: usize) -> bool {
        // Linux: the avail index is published before the device's word is read (virtio_mb).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let q = &mut self.queues[qi];
        let (new, old) = (q.avail_idx, q.kicked_at);
        q.kicked_at = new;
        let needed = if self.event_idx {
            let at = q.used + 4 + u64::from(q.size) * 8;
            let avail_event: u16 = self.mem.read_obj(GuestAddress(at)).unwrap();
            // vring_need_event(avail_event, new, old)
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = self.mem.read_obj(GuestAddress(q.used)).unwrap();
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if needed {
            self.notify(qi);
        }
        needed
    }

    /// The used entries of queue `qi` that a Linux driver's interrupt-driven callback takes
    /// now: those an interrupt announced, then those its re-check finds after it re-enabled
    /// callbacks (`used_event` moved to its position with EVENT_IDX, a full barrier, the used
    /// index read again: `virtqueue_enable_cb`), for as long as that finds more. Nothing else:
    /// it never polls, so an interrupt the device owed and did not raise leaves entries unseen
    /// here, as it would leave them in a guest.
    pub fn take_used(&mut self, qi: usize) -> Vec<Used> {
        let mut out = Vec::new();
        loop {
            while self.queues[qi].used_idx != self.queues[qi].covered {
                out.push(self.next_used_entry(qi));
            }
            if !self.queues[qi].armed {
                return out;
            }
            if self.event_idx {
                self.set_used_event(qi);
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let idx = self.used_index(qi);
            let q = &mut self.queues[qi];
            if idx == q.used_idx {
                q.armed = false;
                return out;
            }
            q.covered = idx;
        }
    }

    /// Free descriptors of queue `qi`.
    pub fn free_descriptors(&self, qi: usize) -> usize {
        self.queues[qi].free.len()
    }

    /// A line on queue `qi`'s ring state, for a test's failure message.
    pub fn ring_state(&self, qi: usize) -> String {
        let q = &self.queues[qi];
        let avail_event: u16 = self
            .mem
            .read_obj(GuestAddress(q.used + 4 + u64::from(q.size) * 8))
            .unwrap();
        let used_event: u16 = self
            .mem
            .read_obj(GuestAddress(q.avail + 4 + u64::from(q.size) * 2))
            .unwrap();
        format!(
            "queue {qi}: avail idx {} (kicked at {}), device used idx {}, driver used idx {} (covered {}), avail_event {avail_event}, used_event {used_event}, {} chains in flight, interrupt status {:#x}",
            q.avail_idx,
            q.kicked_at,
            self.used_index(qi),
            q.used_idx,
            q.covered,
            q.chains.len(),
            self.transport.interrupt().status(),
        )
    }

    /// Waits for the irqfd (bounded), acknowledges the interrupt; true if one arrived.
    pub fn wait_interrupt(&mut self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n != 1 || self.irq.read().is_err() {
            return false;
        }
        let status = self.read(VIRTIO_MMIO_INTERRUPT_STATUS);
        self.write(VIRTIO_MMIO_INTERRUPT_ACK, status);
        if status & VIRTIO_MMIO_INT_VRING != 0 {
            self.interrupts += 1;
            // Read after the interrupt: everything published before it is announced.
            // Linux's vm_interrupt: every queue with new used entries gets its callback.
            for q in &mut self.queues {
                q.covered = self.mem.read_obj(GuestAddress(q.used + 2)).unwrap();
                if q.covered != q.used_idx {
                    q.armed = true;
                }
            }
        }
        true
    }

    /// Whether the device has interrupted the driver at least once, waiting up to `timeout`
    /// (with EVENT_IDX an entry can be seen before the interrupt announcing it arrives).
    pub fn interrupted(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.interrupts == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.wait_interrupt(left);
        }
        true
    }

    /// The next used entry of queue `qi`, waiting for interrupts up to `timeout`. Without
    /// EVENT_IDX only entries an interrupt announced are returned.
    pub fn wait_used(&mut self, qi: usize, timeout: Duration) -> Option<Used> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.pop_used(qi) {
                return Some(u);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.wait_interrupt(left.min(Duration::from_millis(200)));
        }
    }
}
