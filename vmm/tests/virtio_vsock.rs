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

    /// Probes the device up to DRIVER_OK: no buffer posted yet.
    fn probe_bare(&mut self, event_idx: bool) {
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
    }

    fn probe(&mut self, event_idx: bool) {
        self.probe_bare(event_idx);
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

// ---------------------------------------------------------------------------------------------
// A guest that takes notifications as Linux's virtio-vsock driver does: it kicks a queue only
// when the device asked for it (`MmioDriver::kick`: `avail_event` with EVENT_IDX, the NO_NOTIFY
// flag without), reads a used ring only in its interrupt-driven callback (`take_used`, with the
// re-check after re-enabling callbacks), refills RX only when fewer than half of its buffers
// are left (`virtio_transport_rx_work`), reclaims TX buffers only on interrupts, and keeps the
// stream's credit in both directions. The existing tests' driver kicks on every buffer and polls
// the used rings; this one stalls where a guest would, so a notification the device (or the
// transport) loses in either direction ends a test with the rings' state instead of passing.
// ---------------------------------------------------------------------------------------------

const OP_CREDIT_UPDATE: u16 = 6;
/// Linux's RX buffer: header and payload in one 4 KiB descriptor.
const RX_BUF: u32 = 4096;
/// The guest's receive window (Linux's default `buf_alloc`).
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload a Linux guest puts in one TX packet (4 KiB, `VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE`).
const TX_CHUNK: usize = 4096 - HDR;
/// Longest a strict guest waits for an interrupt before calling the device stuck.
const STALL: Duration = Duration::from_secs(5);

/// Bytes `i..` of the test pattern `seed` (so a lost, doubled or reordered byte shows).
fn pattern(seed: u8, from: usize, len: usize) -> Vec<u8> {
    (from..from + len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8 ^ seed)
        .collect()
}

/// One connection of the strict guest, host port `host_port`, guest port `port`.
struct StrictStream {
    port: u32,
    host_port: u32,
    /// Payload bytes the guest consumed (its `fwd_cnt`) and the value last announced.
    fwd_cnt: u32,
    fwd_announced: u32,
    /// Payload bytes the guest sent, and the host's credit as last announced.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    received: Vec<u8>,
}

impl StrictStream {
    fn header(&mut self, op: u16) -> Hdr {
        self.fwd_announced = self.fwd_cnt;
        Hdr {
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
            ..Hdr::guest(self.port, self.host_port, op)
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A probed vsock device whose driver follows the notification rules above.
struct StrictGuest {
    g: Guest,
    /// RX buffers in flight, and the most ever posted (Linux's `rx_buf_nr`, `rx_buf_max_nr`).
    rx_posted: usize,
    rx_max: usize,
    /// Most RX buffers the guest keeps posted (a smaller ring than the device's).
    rx_limit: usize,
}

impl StrictGuest {
    /// Probes the device; the guest keeps up to `rx_buffers` RX buffers posted (as many as fit
    /// if `None`), none at first if that is 0.
    fn new(event_idx: bool, rx_buffers: Option<usize>) -> Self {
        let mut g = Guest::unprobed();
        g.probe_bare(event_idx);
        let mut s = StrictGuest {
            g,
            rx_posted: 0,
            rx_max: 0,
            rx_limit: rx_buffers.unwrap_or(usize::MAX),
        };
        if s.rx_limit > 0 {
            s.fill_rx();
            assert!(
                s.g.drv.kick(RX),
                "a fresh device wants to hear of RX buffers"
            );
        }
        s
    }

    /// Posts RX buffers until `rx_limit` are in flight or the ring is full; not kicked yet.
    fn fill_rx(&mut self) {
        while self.g.drv.free_descriptors(RX) > 0 && self.rx_posted < self.rx_limit {
            self.g.drv.offer(RX, &[Buf::Writable(RX_BUF)]);
            self.rx_posted += 1;
        }
        self.rx_max = self.rx_max.max(self.rx_posted);
    }

    fn stuck(&self, what: &str) -> String {
        format!(
            "{what}: no interrupt within {STALL:?}\n{}\n{}",
            self.g.drv.ring_state(RX),
            self.g.drv.ring_state(TX)
        )
    }

    /// Waits for the next interrupt; panics with the rings' state if none comes.
    fn wait(&mut self, what: &str) {
        if !self.g.drv.wait_interrupt(STALL) {
            panic!("{}", self.stuck(what));
        }
    }

    /// The RX packets the callback takes now; refills (and kicks if asked) like `rx_work`.
    fn rx(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        let used = self.g.drv.take_used(RX);
        self.rx_posted -= used.len();
        if self.rx_posted < self.rx_max / 2 {
            self.fill_rx();
            self.g.drv.kick(RX);
        }
        used.iter()
            .map(|u| {
                let (h, data) = Hdr::decode(&u.data);
                assert_eq!(u.len as usize, HDR + data.len());
                assert_eq!((h.src_cid, h.dst_cid, h.type_), (HOST_CID, GUEST_CID, 1));
                (h, data)
            })
            .collect()
    }

    /// Reclaims TX buffers the callback may take now.
    fn reclaim_tx(&mut self) {
        for u in self.g.drv.take_used(TX) {
            assert_eq!(u.len, 0, "TX buffers are only read");
        }
    }

    /// Queues one TX packet and kicks if the device asked; waits for TX buffers if none is
    /// free (RX packets that arrive meanwhile are returned for the caller).
    fn send(&mut self, h: Hdr, payload: &[u8]) -> Vec<(Hdr, Vec<u8>)> {
        let mut got = Vec::new();
        while self.g.drv.free_descriptors(TX) == 0 {
            self.wait("TX ring full");
            self.reclaim_tx();
            got.extend(self.rx());
        }
        self.g.drv.offer(TX, &[Buf::Readable(h.encode(payload))]);
        self.g.drv.kick(TX);
        got
    }

    /// The next RX packet other than a credit update, waiting on interrupts.
    fn recv(&mut self) -> (Hdr, Vec<u8>) {
        loop {
            self.reclaim_tx();
            if let Some(p) = self
                .rx()
                .into_iter()
                .find(|(h, _)| h.op != OP_CREDIT_UPDATE)
            {
                return p;
            }
            self.wait("waiting for an RX packet");
        }
    }

    /// The runtime's way in: a host client connects to guest `port` through the hybrid socket,
    /// the guest accepts; returns the host end (past its `OK` line) and the guest's stream.
    fn accept_host_client(&mut self, port: u32) -> (UnixStream, StrictStream) {
        let mut host = UnixStream::connect(&self.g.uds).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (req, _) = self.recv();
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, port), "{req:?}");
        let mut s = StrictStream {
            port,
            host_port: req.src_port,
            fwd_cnt: 0,
            fwd_announced: 0,
            tx_cnt: 0,
            peer_buf_alloc: req.buf_alloc,
            peer_fwd_cnt: req.fwd_cnt,
            received: Vec::new(),
        };
        let h = s.header(OP_RESPONSE);
        assert!(self.send(h, &[]).is_empty());
        let ok = format!("OK {}\n", s.host_port);
        assert_eq!(read_exactly(&mut host, ok.len()), ok.as_bytes());
        (host, s)
    }
}

/// Takes what `pkts` say for stream `s`: payload, the host's credit.
fn absorb(s: &mut StrictStream, pkts: Vec<(Hdr, Vec<u8>)>) {
    for (h, data) in pkts {
        assert_eq!((h.src_port, h.dst_port), (s.host_port, s.port), "{h:?}");
        s.peer_buf_alloc = h.buf_alloc;
        s.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RW => {
                s.fwd_cnt = s.fwd_cnt.wrapping_add(data.len() as u32);
                s.received.extend_from_slice(&data);
            }
            OP_CREDIT_UPDATE => {}
            other => panic!("unexpected op {other} in a stream: {h:?}"),
        }
    }
}

/// `to_guest` bytes from a host client to the guest and `to_host` bytes back at once, through
/// a guest that takes notifications like Linux's driver (see above), with the guest's credit
/// announced as Linux does (once less than 64 KiB of its window is left unannounced).
fn strict_stream_both_ways(
    event_idx: bool,
    rx_buffers: Option<usize>,
    to_guest: usize,
    to_host: usize,
) {
    let mut g = StrictGuest::new(event_idx, rx_buffers);
    let (host, mut s) = g.accept_host_client(1024);
    // Held open until the end: the host end closing would be a SHUTDOWN in the stream.
    let _open = host.try_clone().unwrap();
    let mut host_w = host.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for from in (0..to_guest).step_by(10_000) {
            let n = 10_000.min(to_guest - from);
            host_w.write_all(&pattern(1, from, n)).unwrap();
        }
    });
    let mut host_r = host;
    let reader = std::thread::spawn(move || {
        host_r.set_read_timeout(Some(STALL * 2)).unwrap();
        let mut got = vec![0u8; to_host];
        host_r.read_exact(&mut got).map(|()| got)
    });

    let mut sent = 0;
    while s.received.len() < to_guest || sent < to_host {
        let mut progressed = false;
        // Guest -> host, within the host's credit.
        while sent < to_host && s.credit() > 0 {
            let n = TX_CHUNK.min(to_host - sent).min(s.credit() as usize);
            let h = s.header(OP_RW);
            let pkts = g.send(h, &pattern(2, sent, n));
            s.tx_cnt = s.tx_cnt.wrapping_add(n as u32);
            sent += n;
            absorb(&mut s, pkts);
            progressed = true;
        }
        g.reclaim_tx();
        let pkts = g.rx();
        progressed |= !pkts.is_empty();
        absorb(&mut s, pkts);
        // Linux (virtio_transport_stream_do_dequeue): a credit update once the host could run
        // out of window before it hears of the space freed.
        if s.fwd_cnt.wrapping_sub(s.fwd_announced) > GUEST_BUF_ALLOC - 64 * 1024 {
            let h = s.header(OP_CREDIT_UPDATE);
            let pkts = g.send(h, &[]);
            absorb(&mut s, pkts);
            progressed = true;
        }
        if !progressed {
            let what = format!(
                "stream: {} of {to_guest} bytes received, {sent} of {to_host} sent (host credit {})",
                s.received.len(),
                s.credit()
            );
            g.wait(&what);
        }
    }
    writer.join().unwrap();
    let got = reader
        .join()
        .unwrap()
        .expect("the host read everything the guest sent");
    assert!(
        got == pattern(2, 0, to_host),
        "guest->host bytes arrive in order"
    );
    assert!(
        s.received == pattern(1, 0, to_guest),
        "host->guest bytes arrive in order"
    );
}

#[test]
fn strict_guest_streams_both_ways_without_event_idx() {
    strict_stream_both_ways(false, None, 3 << 20, 3 << 20);
}

#[test]
fn strict_guest_streams_both_ways_with_event_idx() {
    strict_stream_both_ways(true, None, 3 << 20, 3 << 20);
}

/// Guest to host only: past the host's 256 KiB window the guest goes on only with the credit
/// updates the device sends (in RX packets of their own, each announced by an interrupt).
#[test]
fn strict_guest_sends_a_stream_on_the_hosts_credit_updates() {
    for event_idx in [false, true] {
        strict_stream_both_ways(event_idx, None, 0, 3 << 20);
    }
}

// Four RX buffers: the device runs out of them all the time and must ask for the refill kick
// each time (the guest refills once two came back). Host to guest only, so that no TX traffic
// wakes the device up instead (the guest's credit updates aside).

#[test]
fn strict_guest_with_few_rx_buffers_receives_a_stream_without_event_idx() {
    strict_stream_both_ways(false, Some(4), 1 << 20, 0);
}

#[test]
fn strict_guest_with_few_rx_buffers_receives_a_stream_with_event_idx() {
    strict_stream_both_ways(true, Some(4), 1 << 20, 0);
}

#[test]
fn strict_guest_with_few_rx_buffers_streams_both_ways() {
    for event_idx in [false, true] {
        strict_stream_both_ways(event_idx, Some(4), 1 << 20, 1 << 20);
    }
}

/// The host queued a packet (the runtime's `CONNECT`) while the guest's RX queue had no
/// buffers: once the guest posts some, the device has asked for that kick, fills a buffer and
/// raises the interrupt.
fn rx_buffers_posted_after_the_host_queued_a_packet(event_idx: bool) {
    let mut g = StrictGuest::new(event_idx, Some(0));
    let mut host = UnixStream::connect(&g.g.uds).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    // Let the I/O thread take the handshake and find no buffer.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        g.g.drv.take_used(RX).is_empty() && !g.g.drv.wait_interrupt(Duration::from_millis(50)),
        "nothing to deliver into"
    );
    g.rx_limit = 8;
    g.fill_rx();
    assert!(
        g.g.drv.kick(RX),
        "the starved device asked for the refill kick"
    );
    g.wait("the REQUEST for the buffers just posted");
    let pkts = g.rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (OP_REQUEST, 1024));
}

#[test]
fn rx_buffers_posted_after_the_host_queued_a_packet_without_event_idx() {
    rx_buffers_posted_after_the_host_queued_a_packet(false);
}

#[test]
fn rx_buffers_posted_after_the_host_queued_a_packet_with_event_idx() {
    rx_buffers_posted_after_the_host_queued_a_packet(true);
}

/// The runtime's boot handshake as it happens in a guest that is slow to take its interrupts:
/// the host's `hello` arrives while the guest still handles the RESPONSE's TX completion; it
/// must be announced by an interrupt of its own (or found by the re-check), never left unseen.
fn hello_after_accept(event_idx: bool) {
    for _ in 0..50 {
        let mut g = StrictGuest::new(event_idx, None);
        let (mut host, mut s) = g.accept_host_client(1024);
        host.write_all(b"{\"hello\":1}").unwrap();
        while s.received.len() < 11 {
            g.reclaim_tx();
            let pkts = g.rx();
            if pkts.is_empty() {
                g.wait("the host's hello after the guest accepted");
            }
            absorb(&mut s, pkts);
        }
        assert_eq!(s.received, b"{\"hello\":1}");
        let h = s.header(OP_RW);
        let pkts = g.send(h, b"{\"hello\":2}");
        absorb(&mut s, pkts);
        assert_eq!(read_exactly(&mut host, 11), b"{\"hello\":2}");
    }
}

#[test]
fn hello_after_accept_reaches_a_strict_guest_without_event_idx() {
    hello_after_accept(false);
}

#[test]
fn hello_after_accept_reaches_a_strict_guest_with_event_idx() {
    hello_after_accept(true);
}
