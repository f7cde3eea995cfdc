//! A minimal virtio split-queue driver for tests and fuzzing: it lays out descriptor chains, the
//! available ring and the used ring in guest memory exactly as a guest driver does, then reads the
//! device's answers back from the used ring. [`Client`] speaks FUSE through it, and [`arena`]
//! gives hostile requests a share they can be checked against.
//!
//! Built for this crate's tests and with the `test-driver` feature (the fuzz targets and the
//! hostile-guest tests); not part of the device.

pub mod arena;
mod client;
pub mod fuzz_input;

pub use client::{Client, Reply};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const BUFFERS: u64 = 0x10000;
const MEM_SIZE: usize = 0x100000;
/// Buffer space of one chain (see [`Driver::offer`]).
pub const SLOT_SIZE: u64 = 0x10000;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// One buffer of a descriptor chain, as the driver offers it.
pub enum Buf<'a> {
    /// Device-readable bytes.
    Readable(&'a [u8]),
    /// Device-writable space of this many bytes.
    Writable(u32),
}

/// Guest memory plus one split virtqueue, driven from the driver side.
pub struct Driver {
    /// Guest RAM (1 MiB) holding the rings and the buffers.
    pub mem: GuestMemoryMmap,
    /// The device's view of the queue, as the transport would hand it over.
    pub queue: Queue,
    next_desc: u16,
    avail_idx: u16,
    used_idx: u16,
}

impl Default for Driver {
    fn default() -> Self {
        Self::new()
    }
}

impl Driver {
    /// Guest memory with one empty, ready queue of 16 entries.
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&mem));
        Driver {
            mem,
            queue,
            next_desc: 0,
            avail_idx: 0,
            used_idx: 0,
        }
    }

    /// Offers one chain; returns the head index and the addresses of the writable buffers.
    pub fn offer(&mut self, bufs: &[Buf<'_>]) -> (u16, Vec<(GuestAddress, u32)>) {
        assert!(bufs.len() <= 4, "test chains are short");
        let room: u64 = bufs
            .iter()
            .map(|b| match b {
                Buf::Readable(bytes) => (bytes.len() as u64).max(1).next_multiple_of(64),
                Buf::Writable(len) => u64::from(*len).max(1).next_multiple_of(64),
            })
            .sum();
        assert!(
            room <= SLOT_SIZE,
            "a chain's buffers fit its {SLOT_SIZE}-byte slot"
        );
        // Each chain gets a fixed slot of 4 descriptors and 64 KiB of buffer space, so slots
        // can be reused round-robin without tracking which the device gave back.
        let slot = self.next_desc / 4;
        self.next_desc = (self.next_desc + 4) % QUEUE_SIZE;
        let head = slot * 4;
        let mut addr = BUFFERS + u64::from(slot) * SLOT_SIZE;
        let mut writable = Vec::new();
        for (i, buf) in bufs.iter().enumerate() {
            let index = head + i as u16;
            let (len, mut flags) = match buf {
                Buf::Readable(bytes) => {
                    self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
                    (bytes.len() as u32, 0)
                }
                Buf::Writable(len) => {
                    writable.push((GuestAddress(addr), *len));
                    (*len, VIRTQ_DESC_F_WRITE)
                }
            };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let desc = DESC_TABLE + u64::from(index) * 16;
            self.mem.write_obj(addr, GuestAddress(desc)).unwrap();
            self.mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
            self.mem
                .write_obj(index + 1, GuestAddress(desc + 14))
                .unwrap();
            addr += u64::from(len.max(1)).next_multiple_of(64);
        }
        let ring_slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL_RING + 4 + ring_slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The index store publishes the entry (the device reads it with acquire ordering).
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
        (head, writable)
    }

    /// Takes the next used-ring entry: (descriptor head, bytes written).
    pub fn take_used(&mut self) -> Option<(u16, u32)> {
        let device_idx: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        if device_idx == self.used_idx {
            return None;
        }
        let entry = USED_RING + 4 + u64::from(self.used_idx % QUEUE_SIZE) * 8;
        let id: u32 = self.mem.read_obj(GuestAddress(entry)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(entry + 4)).unwrap();
        self.used_idx = self.used_idx.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Reads `len` bytes spread over the writable buffers, in chain order.
    pub fn read_back(&self, writable: &[(GuestAddress, u32)], len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(addr, size) in writable {
            let n = left.min(size as usize);
            let mut buf = vec![0u8; n];
            self.mem.read_slice(&mut buf, addr).unwrap();
            out.extend_from_slice(&buf);
            left -= n;
        }
        out
    }
}
