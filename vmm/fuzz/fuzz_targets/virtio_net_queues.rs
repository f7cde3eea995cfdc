//! Fuzzes the virtio-net queue handling: arbitrary descriptor tables and available rings (every
//! address, length, flag and next index guest-controlled) drained as TX (into /dev/null) and
//! filled as RX must never panic, never write outside the buffers the guest offered, and must
//! hand back exactly the chains the guest made available.
#![no_main]

use std::os::fd::AsFd;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rootcell_vmm::devices::virtio::net::{
    deliver_rx_frame, drain_tx_queue, NetCounters, RxOutcome, MAX_PACKET,
};
use rootcell_vmm::memory::{create_guest_memory, GuestMemoryMmap};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const MEM: u64 = 1 << 20;

fn memory() -> GuestMemoryMmap {
    static M: OnceLock<GuestMemoryMmap> = OnceLock::new();
    M.get_or_init(|| create_guest_memory(MEM).expect("guest memory")).clone()
}

fn queue(mem: &GuestMemoryMmap) -> Queue {
    let mut q = Queue::new(SIZE).expect("queue");
    q.set_size(SIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

fuzz_target!(|input: &[u8]| {
    // [0]: mode, [1..3]: avail idx, [3..35]: avail ring, [35..291]: descriptor table, rest: a
    // frame and buffer contents. Short inputs are zero-padded, so small inputs already reach
    // the queue code.
    let mut padded = input.to_vec();
    if padded.len() < 291 {
        padded.resize(291, 0);
    }
    let data = &padded[..];
    let mem = memory();
    mem.write_slice(&[0u8; 0x3000], GuestAddress(0)).unwrap();
    mem.write_slice(&data[35..291], GuestAddress(DESC)).unwrap();
    mem.write_slice(&data[1..3], GuestAddress(AVAIL + 2)).unwrap();
    mem.write_slice(&data[3..35], GuestAddress(AVAIL + 4)).unwrap();
    let payload = &data[291..];
    mem.write_slice(&payload[..payload.len().min(0x1000)], GuestAddress(0x8000))
        .unwrap();
    // A canary the device must never touch: only guest-offered buffers may be written.
    let canary = [0x5au8; 64];
    mem.write_slice(&canary, GuestAddress(MEM - 64)).unwrap();
    let mut q = queue(&mem);
    q.set_event_idx(data[0] & 2 != 0);
    let avail_idx = u16::from_le_bytes([data[1], data[2]]);
    if data[0] & 1 == 0 {
        static NULL: OnceLock<std::fs::File> = OnceLock::new();
        let null = NULL.get_or_init(|| {
            std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap()
        });
        let counters = NetCounters::default();
        let mut buf = vec![0u8; MAX_PACKET];
        for _ in 0..4 {
            let (_, more) = drain_tx_queue(&mut q, &mem, null.as_fd(), &mut buf, &counters, 8);
            if !more {
                break;
            }
        }
    } else {
        let mut frame = payload.to_vec();
        for _ in 0..(usize::from(SIZE) + 1) {
            if deliver_rx_frame(&mut q, &mem, &mut frame).0 == RxOutcome::NoBuffer {
                break;
            }
        }
    }
    // Whatever was handed back is no more than what was made available.
    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    if avail_idx <= SIZE {
        assert!(used <= avail_idx, "used {used} > avail {avail_idx}");
    }
    let mut after = [0u8; 64];
    mem.read_slice(&mut after, GuestAddress(MEM - 64)).unwrap();
    let canary_in_a_write_buffer = (0..usize::from(SIZE)).any(|i| {
        let d = &data[35 + i * 16..35 + i * 16 + 16];
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
        let len = u64::from(u32::from_le_bytes(d[8..12].try_into().unwrap()));
        let flags = u16::from_le_bytes([d[12], d[13]]);
        flags & 2 != 0 && addr < MEM && addr.saturating_add(len) > MEM - 64
    });
    if !canary_in_a_write_buffer {
        assert_eq!(after, canary, "a write outside the offered buffers");
    }
});
