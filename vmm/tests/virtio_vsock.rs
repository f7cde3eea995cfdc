//! The virtio-vsock device driven the way the guest's driver drives it: virtio-mmio registers,
//! descriptor chains and rings in guest memory, notifications through the queue eventfds, and
//! the device's interrupt. The host side is real unix sockets (the hybrid socket and a
//! `<uds>_<port>` listener). No KVM needed.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::virtq::{Buf, MmioDriver};
use rootcell_vmm::devices::virtio::vsock::VsockDevice;
use rootcell_vmm::devices::virtio::VIRTIO_RING_F_EVENT_IDX;
use rootcell_vsock::VsockConfig;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS;

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
const HDR: usize = 44;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_RW: u16 = 5;
const T: Duration = Duration::from_secs(5);

/// `struct virtio_vsock_hdr`, encoded by hand from the spec (not with the device crate's code).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn guest(src_port: u32, dst_port: u32, op: u16) -> Self {
        Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: 1,
            op,
            buf_alloc: 256 * 1024,
            ..Default::default()
        }
    }

    fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(HDR + payload.len());
        v.extend_from_slice(&self.src_cid.to_le_bytes());
        v.extend_from_slice(&self.dst_cid.to_le_bytes());
        v.extend_from_slice(&self.src_port.to_le_bytes());
        v.extend_from_slice(&self.dst_port.to_le_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.type_.to_le_bytes());
        v.extend_from_slice(&self.op.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.buf_alloc.to_le_bytes());
        v.extend_from_slice(&self.fwd_cnt.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn decode(b: &[u8]) -> (Self, Vec<u8>) {
        assert!(b.len() >= HDR, "packet shorter than a header: {b:?}");
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        let h = Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        };
        let data = b[HDR..HDR + h.len as usize].to_vec();
        (h, data)
    }
}

/// A guest vsock driver on top of the generic virtio-mmio driver.
struct Guest {
    drv: MmioDriver,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

impl Guest {
    fn new(event_idx: bool) -> Self {
        let mut g = Self::unprobed();
        g.probe(event_idx);
        g
    }

    /// The device exists (its hybrid socket listens) but no driver has probed it yet.
    fn unprobed() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let dev = VsockDevice::new(&VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        })
        .unwrap();
        Guest {
            drv: MmioDriver::new(Box::new(dev)),
            uds,
            _dir: dir,
        }
    }

    fn probe(&mut self, event_idx: bool) {
        let features = self.drv.probe(
            VIRTIO_ID_VSOCK,
            if event_idx {
                VIRTIO_RING_F_EVENT_IDX
            } else {
                0
            },
            3,
        );
        assert_eq!(features & VIRTIO_RING_F_EVENT_IDX != 0, event_idx);
        assert_eq!(
            self.drv.config(8),
            GUEST_CID.to_le_bytes(),
            "guest_cid in config"
        );
        self.fill_rx();
        for _ in 0..4 {
            self.drv.offer(EVENT, &[Buf::Writable(8)]);
        }
        self.drv.notify(EVENT);
    }

    /// Tops the RX queue up with header + 4 KiB buffers, like the Linux driver.
    fn fill_rx(&mut self) {
        for _ in 0..8 {
            self.drv
                .offer(RX, &[Buf::Writable(HDR as u32), Buf::Writable(4096)]);
        }
        self.drv.notify(RX);
    }

    fn send(&mut self, h: Hdr, payload: &[u8]) {
        self.drv.send(TX, &[Buf::Readable(h.encode(payload))]);
        let used = self.drv.wait_used(TX, T).expect("TX chain returned");
        assert_eq!(used.len, 0, "TX buffers are only read");
    }

    /// The next RX packet other than a credit update, with the interrupt that announced it.
    fn recv(&mut self) -> (Hdr, Vec<u8>) {
        loop {
            let used = self.drv.wait_used(RX, T).expect("an RX packet arrives");
            assert!(self.drv.interrupted(T), "the device interrupted the guest");
            self.drv
                .offer(RX, &[Buf::Writable(HDR as u32), Buf::Writable(4096)]);
            self.drv.notify(RX);
            let (h, data) = Hdr::decode(&used.data);
            assert_eq!(used.len as usize, HDR + data.len());
            assert_eq!((h.src_cid, h.dst_cid, h.type_), (HOST_CID, GUEST_CID, 1));
            if h.op != 6 {
                return (h, data);
            }
        }
    }
}

fn port_path(uds: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", uds.display()))
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(T)).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn guest_connects_to_host_listener(event_idx: bool) {
    let mut g = Guest::new(event_idx);
    let listener = UnixListener::bind(port_path(&g.uds, 5000)).unwrap();
    g.send(Hdr::guest(1234, 5000, OP_REQUEST), &[]);
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.src_port, h.dst_port),
        (OP_RESPONSE, 5000, 1234),
        "{h:?}"
    );
    listener.set_nonblocking(false).unwrap();
    let (mut host, _) = listener.accept().unwrap();

    g.send(Hdr::guest(1234, 5000, OP_RW), b"ping from the guest");
    assert_eq!(read_exactly(&mut host, 19), b"ping from the guest");

    host.write_all(b"pong from the host").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, 5000, 1234));
    assert_eq!(data, b"pong from the host");

    // A guest reset closes the host end.
    g.send(Hdr::guest(1234, 5000, OP_RST), &[]);
    host.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0, "host sees EOF after RST");
}

#[test]
fn guest_request_reaches_host_listener_and_data_flows_both_ways() {
    guest_connects_to_host_listener(false);
}

#[test]
fn guest_request_with_event_idx() {
    guest_connects_to_host_listener(true);
}

#[test]
fn host_connect_is_answered_by_guest_response() {
    let mut g = Guest::new(true);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024), "{req:?}");
    let host_port = req.src_port;
    g.send(Hdr::guest(1024, host_port, OP_RESPONSE), &[]);
    let ok = read_exactly(&mut host, format!("OK {host_port}\n").len());
    assert_eq!(String::from_utf8(ok).unwrap(), format!("OK {host_port}\n"));

    host.write_all(b"hello guest").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, host_port, 1024));
    assert_eq!(data, b"hello guest");

    g.send(Hdr::guest(1024, host_port, OP_RW), b"hello host");
    assert_eq!(read_exactly(&mut host, 10), b"hello host");
}

#[test]
fn guest_request_to_nothing_is_reset() {
    let mut g = Guest::new(false);
    g.send(Hdr::guest(77, 6000, OP_REQUEST), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 6000, 77));
}

#[test]
fn device_reset_drops_connections_and_the_device_comes_back() {
    let mut g = Guest::new(false);
    let listener = UnixListener::bind(port_path(&g.uds, 5001)).unwrap();
    g.send(Hdr::guest(1, 5001, OP_REQUEST), &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    g.drv.reset();
    assert_eq!(g.drv.read(VIRTIO_MMIO_STATUS), 0, "reset completed");
    host.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0, "host end closed by reset");
    // Probe again: the hybrid socket still listens and the device works.
    g.probe(false);
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    assert_eq!(g.recv().0.op, OP_REQUEST);
}

#[test]
fn dropping_the_device_removes_the_socket() {
    let g = Guest::new(false);
    let uds = g.uds.clone();
    assert!(uds.exists());
    drop(g);
    assert!(!uds.exists(), "hybrid socket file left behind");
}

#[test]
fn host_connect_before_the_driver_is_ready_is_delivered_after_activation() {
    let mut g = Guest::unprobed();
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.write_all(b"CONNECT 1025\n").unwrap();
    // Give the I/O thread time to take the handshake while no queue exists.
    std::thread::sleep(Duration::from_millis(50));
    g.probe(false);
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1025), "{req:?}");
    g.send(Hdr::guest(1025, req.src_port, OP_RESPONSE), &[]);
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(read_exactly(&mut host, ok.len()), ok.as_bytes());
}

#[test]
fn bulk_data_crosses_in_many_packets_both_ways() {
    let mut g = Guest::new(true);
    let listener = UnixListener::bind(port_path(&g.uds, 5002)).unwrap();
    g.send(Hdr::guest(9, 5002, OP_REQUEST), &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();

    // Guest -> host: 48 packets of 4 KiB.
    let blob: Vec<u8> = (0..48 * 4096).map(|i| (i * 7 % 251) as u8).collect();
    let reader = std::thread::spawn(move || {
        let got = read_exactly(&mut host, 48 * 4096);
        (host, got)
    });
    for chunk in blob.chunks(4096) {
        g.send(Hdr::guest(9, 5002, OP_RW), chunk);
    }
    let (mut host, got) = reader.join().unwrap();
    assert!(got == blob, "guest->host bytes arrive in order");

    // Host -> guest: 200 KiB (within the guest's 256 KiB buf_alloc) in as many RX packets as
    // it takes.
    let blob: Vec<u8> = (0..200 * 1024).map(|i| (i * 13 % 253) as u8).collect();
    let writer = {
        let blob = blob.clone();
        std::thread::spawn(move || host.write_all(&blob).map(|()| host))
    };
    let mut got = Vec::new();
    let mut packets = 0;
    while got.len() < blob.len() {
        let (h, data) = g.recv();
        assert_eq!(h.op, OP_RW, "{h:?}");
        got.extend_from_slice(&data);
        packets += 1;
    }
    let _host = writer.join().unwrap().unwrap();
    assert!(got == blob, "host->guest bytes arrive in order");
    assert!(
        packets >= 50,
        "4 KiB RX buffers mean many packets ({packets})"
    );
}
