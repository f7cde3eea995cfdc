//! Unit tests of the descriptor-chain code (`queue`) and of the tap check.

use std::os::fd::AsFd;
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::queue::{gather, scatter, ChainError};
use super::*;
use crate::memory::{create_guest_memory, GuestMemoryMmap};

const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// A chain built from (addr, len, flags) triples on a mock queue over guest memory `mem`.
fn chain_of<'m>(
    mem: &'m GuestMemoryMmap,
    descs: &[(u64, u32, u16)],
) -> DescriptorChain<&'m GuestMemoryMmap> {
    let m = MockSplitQueue::new(mem, 16);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags | next, i as u16 + 1))
        })
        .collect();
    m.build_desc_chain(&raw).unwrap();
    let mut q: Queue = m.create_queue().unwrap();
    q.pop_descriptor_chain(mem).expect("a chain")
}

#[test]
fn tx_chain_is_gathered_across_descriptors() {
    let mem = create_guest_memory(16 << 20).unwrap();
    mem.write_slice(&[1u8; 12], GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&[2u8; 60], GuestAddress(0x20_0000))
        .unwrap();
    let chain = chain_of(&mem, &[(0x10_0000, 12, 0), (0x20_0000, 60, 0)]);
    let mut buf = vec![0u8; MAX_PACKET];
    assert_eq!(gather(&mem, chain, &mut buf), Ok(72));
    assert_eq!(&buf[..12], &[1u8; 12]);
    assert_eq!(&buf[12..72], &[2u8; 60]);
    assert_eq!(mem.last_addr(), GuestAddress((16 << 20) - 1));
}

#[test]
fn malformed_tx_chains_are_refused() {
    let mem = create_guest_memory(16 << 20).unwrap();
    let mut buf = vec![0u8; MAX_PACKET];
    // Shorter than header + Ethernet header.
    let c = chain_of(&mem, &[(0x10_0000, 20, 0)]);
    assert_eq!(gather(&mem, c, &mut buf), Err(ChainError::Length(20)));
    // A device-writable descriptor where the device must read.
    let c = chain_of(&mem, &[(0x10_0000, 12, 0), (0x20_0000, 60, F_WRITE)]);
    assert_eq!(gather(&mem, c, &mut buf), Err(ChainError::Direction));
    // Past the end of guest RAM, and straddling it.
    let c = chain_of(&mem, &[(0x4000_0000, 64, 0)]);
    assert_eq!(gather(&mem, c, &mut buf), Err(ChainError::Address));
    let c = chain_of(&mem, &[((16 << 20) - 8, 64, 0)]);
    assert_eq!(gather(&mem, c, &mut buf), Err(ChainError::Address));
    // Longer than any frame.
    let c = chain_of(
        &mem,
        &[
            (0x10_0000, 0x8000, 0),
            (0x20_0000, 0x8000, 0),
            (0x30_0000, 0x100, 0),
        ],
    );
    assert!(matches!(
        gather(&mem, c, &mut buf),
        Err(ChainError::Length(_))
    ));
}

#[test]
fn rx_chain_is_filled_across_descriptors_and_checked() {
    let mem = create_guest_memory(16 << 20).unwrap();
    let frame: Vec<u8> = (0..100u8).collect();
    let c = chain_of(
        &mem,
        &[(0x10_0000, 40, F_WRITE), (0x20_0000, 1500, F_WRITE)],
    );
    scatter(&mem, c, &frame).unwrap();
    let mut a = [0u8; 40];
    let mut b = [0u8; 60];
    mem.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
    mem.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
    assert_eq!([&a[..], &b[..]].concat(), frame);
    let c = chain_of(&mem, &[(0x10_0000, 40, F_WRITE)]);
    assert_eq!(scatter(&mem, c, &frame), Err(ChainError::Length(40)));
    let c = chain_of(&mem, &[(0x10_0000, 1500, 0)]);
    assert_eq!(scatter(&mem, c, &frame), Err(ChainError::Direction));
    let c = chain_of(&mem, &[(u64::MAX - 10, 1500, F_WRITE)]);
    assert_eq!(scatter(&mem, c, &frame), Err(ChainError::Address));
}

#[test]
fn tx_drain_stops_at_its_budget_and_resumes() {
    let mem = create_guest_memory(16 << 20).unwrap();
    let m = MockSplitQueue::new(&mem, 16);
    let descs: Vec<RawDescriptor> = (0..5u64)
        .map(|i| RawDescriptor::from(SplitDescriptor::new(0x10_0000 + i * 0x1000, 64, 0, 0)))
        .collect();
    m.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = m.create_queue().unwrap();
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let counters = NetCounters::default();
    let mut buf = vec![0u8; MAX_PACKET];
    let used_idx =
        |mem: &GuestMemoryMmap| -> u16 { mem.read_obj(m.used_addr().unchecked_add(2)).unwrap() };
    let mut drain = |q: &mut Queue| drain_tx_queue(q, &mem, null.as_fd(), &mut buf, &counters, 2);
    assert_eq!(drain(&mut q), (true, true));
    assert_eq!(used_idx(&mem), 2);
    assert_eq!(drain(&mut q), (true, true));
    assert_eq!(
        drain(&mut q),
        (true, false),
        "the last chain, then nothing left"
    );
    assert_eq!(used_idx(&mem), 5);
    assert_eq!(
        counters
            .tx_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
}

#[test]
fn rx_delivery_reports_each_outcome() {
    let mem = create_guest_memory(16 << 20).unwrap();
    let m = MockSplitQueue::new(&mem, 16);
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x10_0000, 1526, F_WRITE, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x20_0000, 1526, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x30_0000, 30, F_WRITE, 0)),
    ];
    m.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = m.create_queue().unwrap();
    let mut frame = vec![0xaau8; 100];
    let (o, _) = deliver_rx_frame(&mut q, &mem, &mut frame);
    assert_eq!(o, RxOutcome::Delivered);
    let mut got = vec![0u8; 100];
    mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(
        got[..12],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        "header rewritten"
    );
    assert_eq!(got[12..], [0xaa; 88]);
    assert_eq!(
        deliver_rx_frame(&mut q, &mem, &mut frame).0,
        RxOutcome::BadChain
    );
    assert_eq!(
        deliver_rx_frame(&mut q, &mem, &mut frame).0,
        RxOutcome::TooBig
    );
    // The too-small buffer stays available for a frame that fits.
    let mut small = vec![0u8; 30];
    assert_eq!(
        deliver_rx_frame(&mut q, &mem, &mut small).0,
        RxOutcome::Delivered
    );
    assert_eq!(
        deliver_rx_frame(&mut q, &mem, &mut frame).0,
        RxOutcome::NoBuffer
    );
}

#[test]
fn an_impossible_avail_index_ends_the_tx_pass() {
    // The driver claims 1000 new chains in a 16-entry ring: nothing is valid to pop, and
    // the pass must end instead of re-checking forever (bounded here by a timeout).
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mem = create_guest_memory(16 << 20).unwrap();
        let m = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = m.create_queue().unwrap();
        mem.write_obj(1000u16, m.avail_addr().unchecked_add(2))
            .unwrap();
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let mut buf = vec![0u8; MAX_PACKET];
        let counters = NetCounters::default();
        let tx = drain_tx_queue(&mut q, &mem, null.as_fd(), &mut buf, &counters, 128);
        let rx = deliver_rx_frame(&mut q, &mem, &mut [0u8; 64]).0;
        let _ = done_tx.send((tx, rx));
    });
    let got = done_rx.recv_timeout(std::time::Duration::from_secs(10));
    assert_eq!(got, Ok(((false, false), RxOutcome::NoBuffer)));
}

#[test]
fn a_plain_file_is_not_a_tap() {
    let f = tempfile::tempfile().unwrap();
    let err = NetDevice::new(&NetConfig {
        tap: Arc::new(f.into()),
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 1500,
    })
    .unwrap_err();
    assert!(matches!(err, NetDeviceError::NotATap(_)), "{err}");
}
