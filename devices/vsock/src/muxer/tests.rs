//! Drives the muxer the way a virtio driver would: packets are placed in guest memory as
//! descriptor chains (virtio-queue's mock split queue) and host clients are real unix sockets.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::conn::{CONN_BUF_SIZE, HOST_BUF_SIZE};
use crate::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};

const GUEST_CID: u64 = 3;
const TX_HDR: u64 = 0x10_0000;
const TX_DATA: u64 = 0x20_0000;
const RX_HDR: u64 = 0x40_0000;
const RX_DATA: u64 = 0x50_0000;
/// Receive window the simulated guest advertises unless a test says otherwise.
const GUEST_BUF: u32 = 1 << 20;

struct Harness {
    mem: GuestMemoryMmap,
    muxer: VsockMuxer,
    dir: PathBuf,
    /// Bytes of payload the simulated guest has consumed (its fwd_cnt).
    guest_fwd: u32,
    guest_buf: u32,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        ..Header::default()
    }
}

impl Harness {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rootcell-vsock-unit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let muxer = VsockMuxer::new(GUEST_CID, &dir.join("v.sock")).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        Harness {
            mem,
            muxer,
            dir,
            guest_fwd: 0,
            guest_buf: GUEST_BUF,
        }
    }

    fn uds(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    /// Places a TX chain (header descriptor + optional data descriptor) and hands it over.
    fn send_raw(&mut self, bytes: &[u8], split_at: usize) -> Result<(), ChainError> {
        let (h, d) = bytes.split_at(split_at.min(bytes.len()));
        self.mem.write_slice(h, GuestAddress(TX_HDR)).unwrap();
        let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(
            TX_HDR,
            h.len() as u32,
            0,
            0,
        ))];
        if !d.is_empty() {
            self.mem.write_slice(d, GuestAddress(TX_DATA)).unwrap();
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                TX_DATA,
                d.len() as u32,
                0,
                0,
            )));
        }
        let q = MockSplitQueue::new(&self.mem, 16);
        let chain = q.build_desc_chain(&descs).unwrap();
        self.muxer.process_tx_chain(chain)
    }

    fn send(&mut self, mut h: Header, data: &[u8]) -> Result<(), ChainError> {
        h.len = data.len() as u32;
        h.buf_alloc = self.guest_buf;
        h.fwd_cnt = self.guest_fwd;
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(data);
        self.send_raw(&bytes, HEADER_SIZE)
    }

    /// Offers an RX chain of a header descriptor plus a `room`-byte data descriptor, like the
    /// Linux driver; returns the packet the device wrote, if any.
    fn recv_with(&mut self, room: u32) -> Option<(Header, Vec<u8>)> {
        if !self.muxer.has_pending_rx() {
            return None;
        }
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(
                RX_HDR,
                HEADER_SIZE as u32,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                RX_DATA,
                room,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        let q = MockSplitQueue::new(&self.mem, 16);
        let chain = q.build_desc_chain(&descs).unwrap();
        let len = self.muxer.fill_rx_chain(chain).unwrap() as usize;
        assert!(len >= HEADER_SIZE, "pending RX produced no packet");
        let mut hb = [0u8; HEADER_SIZE];
        self.mem.read_slice(&mut hb, GuestAddress(RX_HDR)).unwrap();
        let h = Header::decode(&hb).unwrap();
        assert_eq!(
            h.len as usize,
            len - HEADER_SIZE,
            "used length matches header"
        );
        let mut data = vec![0u8; h.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(RX_DATA))
            .unwrap();
        assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
        self.guest_fwd = self.guest_fwd.wrapping_add(h.len);
        Some((h, data))
    }

    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        self.recv_with(4096)
    }

    fn expect(&mut self, op: u16) -> (Header, Vec<u8>) {
        self.muxer.process_host_events();
        let (h, d) = self
            .recv()
            .unwrap_or_else(|| panic!("expected op {op}, nothing pending"));
        assert_eq!(h.op, op, "unexpected packet {h:?}");
        (h, d)
    }

    fn assert_quiet(&mut self) {
        self.muxer.process_host_events();
        if let Some((h, _)) = self.recv() {
            panic!("unexpected packet {h:?}");
        }
    }

    /// A host client connected to guest port `port` and acknowledged by the guest.
    fn host_conn(&mut self, port: u32) -> (UnixStream, Header) {
        let mut c = UnixStream::connect(self.uds()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.expect(op::REQUEST);
        assert_eq!(req.dst_port, port);
        assert!(req.src_port >= FIRST_LOCAL_PORT);
        assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
        self.send(hdr(op::RESPONSE, port, req.src_port), &[])
            .unwrap();
        let mut line = [0u8; 64];
        let expected = format!("OK {}\n", req.src_port);
        c.read_exact(&mut line[..expected.len()]).unwrap();
        assert_eq!(&line[..expected.len()], expected.as_bytes());
        (c, req)
    }
}

fn read_available(c: &mut UnixStream, want: usize) -> Vec<u8> {
    let mut out = vec![0u8; want];
    c.read_exact(&mut out).unwrap();
    out
}

#[test]
fn connect_line_parsing() {
    assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
    assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
    assert_eq!(parse_connect_line(b"CONNECT"), None);
    assert_eq!(parse_connect_line(b"CONNECT -1"), None);
    assert_eq!(parse_connect_line(b"connect 1"), None);
    assert_eq!(parse_connect_line(b"CONNECT 99999999999"), None);
}

#[test]
fn host_connect_and_data_both_ways() {
    let mut h = Harness::new();
    let (mut c, req) = h.host_conn(1024);
    c.write_all(b"ping").unwrap();
    let (rw, data) = h.expect(op::RW);
    assert_eq!((rw.src_port, rw.dst_port), (req.src_port, 1024));
    assert_eq!(data, b"ping");
    h.send(hdr(op::RW, 1024, req.src_port), b"pong").unwrap();
    assert_eq!(read_available(&mut c, 4), b"pong");
    assert_eq!(h.muxer.connection_count(), 1);
}

#[test]
fn bytes_after_connect_line_are_kept() {
    let mut h = Harness::new();
    let mut c = UnixStream::connect(h.uds()).unwrap();
    c.write_all(b"CONNECT 7\nearly").unwrap();
    let (req, _) = h.expect(op::REQUEST);
    h.send(hdr(op::RESPONSE, 7, req.src_port), &[]).unwrap();
    let (_, data) = h.expect(op::RW);
    assert_eq!(data, b"early");
}

#[test]
fn guest_reset_closes_pending_client() {
    let mut h = Harness::new();
    let mut c = UnixStream::connect(h.uds()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"CONNECT 4444\n").unwrap();
    let (req, _) = h.expect(op::REQUEST);
    h.send(hdr(op::RST, 4444, req.src_port), &[]).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(c.read(&mut buf).unwrap(), 0, "client sees EOF, no OK line");
    assert_eq!(h.muxer.connection_count(), 0);
    h.assert_quiet();
}

#[test]
fn bad_connect_line_closes_client() {
    let mut h = Harness::new();
    let mut c = UnixStream::connect(h.uds()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"HELLO\n").unwrap();
    h.muxer.process_host_events();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("ERR"));
    h.assert_quiet();
}

#[test]
fn host_half_close_sends_shutdown_send_only() {
    let mut h = Harness::new();
    let (mut c, req) = h.host_conn(1024);
    c.write_all(b"last words").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (_, data) = h.expect(op::RW);
    assert_eq!(data, b"last words");
    let (sd, _) = h.expect(op::SHUTDOWN);
    assert_eq!(sd.flags, SHUTDOWN_SEND, "only SEND: the host still reads");
    // The guest can still answer.
    h.send(hdr(op::RW, 1024, req.src_port), b"reply").unwrap();
    assert_eq!(read_available(&mut c, 5), b"reply");
    // Guest finishes too: the host reads EOF and the device ends the connection with RST.
    let mut sd = hdr(op::SHUTDOWN, 1024, req.src_port);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    h.expect(op::RST);
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn guest_half_close_shuts_host_write_side_only() {
    let mut h = Harness::new();
    let (mut c, req) = h.host_conn(1024);
    h.send(hdr(op::RW, 1024, req.src_port), b"bye").unwrap();
    let mut sd = hdr(op::SHUTDOWN, 1024, req.src_port);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye", "data then EOF");
    // The host can still write to the guest.
    c.write_all(b"more").unwrap();
    let (_, data) = h.expect(op::RW);
    assert_eq!(data, b"more");
    assert_eq!(h.muxer.connection_count(), 1);
}

#[test]
fn guest_full_close_flushes_then_resets() {
    let mut h = Harness::new();
    let (mut c, req) = h.host_conn(1024);
    h.send(hdr(op::RW, 1024, req.src_port), b"final").unwrap();
    let mut sd = hdr(op::SHUTDOWN, 1024, req.src_port);
    sd.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    h.send(sd, &[]).unwrap();
    let (rst, _) = h.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 1024));
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"final");
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn host_to_guest_respects_credit_and_buffer_size() {
    let mut h = Harness::new();
    h.guest_buf = 1000;
    let (mut c, req) = h.host_conn(1024);
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    c.write_all(&payload).unwrap();
    h.muxer.process_host_events();
    let mut got = Vec::new();
    while let Some((p, data)) = h.recv_with(300) {
        assert_eq!(p.op, op::RW);
        assert!(data.len() <= 300, "respects the RX buffer size");
        got.extend(data);
    }
    assert_eq!(got.len(), 1000, "exactly the guest's credit");
    // The guest consumes and says so: the next window flows.
    h.send(hdr(op::CREDIT_UPDATE, 1024, req.src_port), &[])
        .unwrap();
    while let Some((_, data)) = h.recv_with(4096) {
        got.extend(data);
    }
    assert_eq!(got.len(), 2000);
    h.guest_buf = GUEST_BUF;
    h.send(hdr(op::CREDIT_UPDATE, 1024, req.src_port), &[])
        .unwrap();
    while let Some((_, data)) = h.recv() {
        got.extend(data);
    }
    assert_eq!(got, payload, "nothing lost or reordered");
}

#[test]
fn host_reads_stop_at_buffer_bound_and_resume() {
    let mut h = Harness::new();
    h.guest_buf = 0;
    let (c, req) = h.host_conn(1024);
    c.set_nonblocking(true).unwrap();
    let mut writer = c.try_clone().unwrap();
    let total = 4 * HOST_BUF_SIZE;
    let payload: Vec<u8> = (0..total).map(|i| (i * 7 % 256) as u8).collect();
    let mut written = 0;
    // Fill the socket until it pushes back: the muxer must stop reading at its bound.
    for _ in 0..100 {
        match writer.write(&payload[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.muxer.process_host_events();
        assert!(h.recv().is_none(), "no credit, no data");
        if written == total {
            break;
        }
    }
    assert!(written < total, "backpressure reached the host writer");
    // Grant credit and drain everything while the writer continues.
    h.guest_buf = GUEST_BUF;
    h.send(hdr(op::CREDIT_UPDATE, 1024, req.src_port), &[])
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..100_000 {
        if written < total {
            match writer.write(&payload[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        h.muxer.process_host_events();
        while let Some((_, data)) = h.recv_with(64 * 1024) {
            got.extend(data);
        }
        // Keep the guest's window open as a driver would after consuming.
        h.send(hdr(op::CREDIT_UPDATE, 1024, req.src_port), &[])
            .unwrap();
        if got.len() == total {
            break;
        }
    }
    assert_eq!(got.len(), total);
    assert!(got == payload, "data intact");
}

#[test]
fn guest_to_slow_host_is_buffered_then_credit_announced() {
    let mut h = Harness::new();
    let (mut c, req) = h.host_conn(1024);
    // The guest may send up to our advertised window without the host reading anything.
    let payload: Vec<u8> = (0..CONN_BUF_SIZE).map(|i| (i % 253) as u8).collect();
    for chunk in payload.chunks(MAX_PAYLOAD) {
        h.send(hdr(op::RW, 1024, req.src_port), chunk).unwrap();
    }
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; CONN_BUF_SIZE as usize];
        c.read_exact(&mut got).unwrap();
        (got, c)
    });
    // Let the host drain; as writes complete the device announces the freed window.
    let mut fwd = 0;
    for _ in 0..1000 {
        h.muxer.process_host_events();
        while let Some((p, _)) = h.recv() {
            assert_eq!(p.op, op::CREDIT_UPDATE);
            fwd = p.fwd_cnt;
        }
        if reader.is_finished() && !h.muxer.has_pending_rx() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let (got, _c) = reader.join().unwrap();
    assert!(got == payload, "data intact");
    // Updates are batched: the guest gets at least three quarters of its window back unasked...
    assert!(
        fwd >= CONN_BUF_SIZE - CONN_BUF_SIZE / 4,
        "announced only {fwd}"
    );
    // ... and the exact count when it asks.
    h.send(hdr(op::CREDIT_REQUEST, 1024, req.src_port), &[])
        .unwrap();
    let (p, _) = h.expect(op::CREDIT_UPDATE);
    assert_eq!(p.fwd_cnt, CONN_BUF_SIZE);
}

#[test]
fn credit_request_is_answered() {
    let mut h = Harness::new();
    let (_c, req) = h.host_conn(1024);
    h.send(hdr(op::RW, 1024, req.src_port), b"abc").unwrap();
    h.send(hdr(op::CREDIT_REQUEST, 1024, req.src_port), &[])
        .unwrap();
    let (p, _) = h.expect(op::CREDIT_UPDATE);
    assert_eq!(p.fwd_cnt, 3);
    assert_eq!(p.buf_alloc, CONN_BUF_SIZE);
}

#[test]
fn guest_initiated_connection() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.dir.join("v.sock_5000")).unwrap();
    h.send(hdr(op::REQUEST, 777, 5000), &[]).unwrap();
    let (resp, _) = h.expect(op::RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 777));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.send(hdr(op::RW, 777, 5000), b"hi host").unwrap();
    assert_eq!(read_available(&mut s, 7), b"hi host");
    s.write_all(b"hi guest").unwrap();
    let (_, data) = h.expect(op::RW);
    assert_eq!(data, b"hi guest");
    // No listener on another port: refused.
    h.send(hdr(op::REQUEST, 778, 5001), &[]).unwrap();
    let (rst, _) = h.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (5001, 778));
}

/// A host service that does not accept (its backlog full) must cost the guest that connection
/// only: the device's one thread connecting to it must not wait until it accepts, which would
/// stop every other connection (the runtime's control connection among them).
#[test]
fn guest_connect_to_a_host_service_with_a_full_backlog_is_refused_at_once() {
    use std::os::fd::AsRawFd;
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.dir.join("v.sock_5000")).unwrap();
    // listen() again on a listening socket sets its backlog: 0 queues one connection.
    // SAFETY: a plain syscall on a socket `listener` owns.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let _queued = UnixStream::connect(h.dir.join("v.sock_5000")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        h.send(hdr(op::REQUEST, 777, 5000), &[]).unwrap();
        let _ = tx.send(h.expect(op::RST).0);
    });
    let rst = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the muxer answered within 5 s instead of waiting for the service to accept");
    assert_eq!((rst.src_port, rst.dst_port), (5000, 777));
    drop(listener);
}

#[test]
fn guest_connections_beyond_the_cap_are_refused() {
    // Room for the muxer's sockets and the listener's accepted ends.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.max(limit.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.dir.join("v.sock_1053")).unwrap();
    // Accept as they come, so the muxer's blocking connect never waits on a full backlog.
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            match s {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
            if held.len() == MAX_CONNECTIONS {
                break;
            }
        }
        held
    });
    for port in 0..MAX_CONNECTIONS as u32 {
        h.send(hdr(op::REQUEST, 10_000 + port, 1053), &[]).unwrap();
        let (resp, _) = h.expect(op::RESPONSE);
        assert_eq!(resp.dst_port, 10_000 + port);
    }
    let held = holder.join().unwrap();
    assert_eq!(held.len(), MAX_CONNECTIONS);
    // One more is refused, and the muxer holds no more sockets than the cap.
    h.send(hdr(op::REQUEST, 9_999, 1053), &[]).unwrap();
    let (rst, _) = h.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (1053, 9_999));
    assert_eq!(h.muxer.conns.len(), MAX_CONNECTIONS);
    // Once one closes (the guest resets it), a new connection is accepted again.
    h.send(hdr(op::RST, 10_000, 1053), &[]).unwrap();
    assert_eq!(h.muxer.conns.len(), MAX_CONNECTIONS - 1);
    drop(held);
}

#[test]
fn host_client_disappearing_resets_guest() {
    let mut h = Harness::new();
    let (c, req) = h.host_conn(1024);
    drop(c);
    // EOF first (the host may only have half-closed) ...
    let (sd, _) = h.expect(op::SHUTDOWN);
    assert_eq!(sd.flags, SHUTDOWN_SEND);
    // ... and the next guest write finds the peer gone.
    h.send(hdr(op::RW, 1024, req.src_port), b"anyone?").unwrap();
    h.expect(op::RST);
    assert_eq!(h.muxer.connection_count(), 0);
}

#[test]
fn many_connections_are_served_round_robin() {
    let mut h = Harness::new();
    let mut clients = Vec::new();
    for i in 0..20u32 {
        clients.push(h.host_conn(2000 + i));
    }
    for (i, (c, _)) in clients.iter_mut().enumerate() {
        c.write_all(&vec![i as u8; 10_000]).unwrap();
    }
    h.muxer.process_host_events();
    // The first 20 packets must come from 20 different connections.
    let mut first = std::collections::HashSet::new();
    for _ in 0..20 {
        let (p, _) = h.recv().unwrap();
        first.insert(p.src_port);
    }
    assert_eq!(first.len(), 20);
    let mut per_conn = std::collections::HashMap::<u32, usize>::new();
    while let Some((p, d)) = h.recv() {
        assert!(d.iter().all(|&b| b as u32 == p.dst_port - 2000));
        *per_conn.entry(p.dst_port).or_default() += d.len();
    }
    assert_eq!(per_conn.len(), 20);
    for (c, req) in &mut clients {
        h.send(hdr(op::RW, req.dst_port, req.src_port), b"x")
            .unwrap();
        assert_eq!(read_available(c, 1), b"x");
    }
}

#[test]
fn malformed_packets_are_rejected_without_panicking() {
    let mut h = Harness::new();
    let (_c, req) = h.host_conn(1024);

    // Short header.
    assert!(matches!(
        h.send_raw(&[1, 2, 3], 3),
        Err(ChainError::Packet(PacketError::ShortHeader(3)))
    ));
    // Declared length beyond the bytes present.
    let mut bad = hdr(op::RW, 1024, req.src_port);
    bad.len = 100;
    let mut bytes = bad.encode().to_vec();
    bytes.extend_from_slice(&[0; 10]);
    assert!(matches!(
        h.send_raw(&bytes, HEADER_SIZE),
        Err(ChainError::Packet(PacketError::Truncated { .. }))
    ));
    // Declared length beyond the protocol limit.
    bad.len = u32::MAX;
    assert!(matches!(
        h.send_raw(&bad.encode(), HEADER_SIZE),
        Err(ChainError::Packet(PacketError::PayloadTooLong(_)))
    ));
    // Header split across descriptors in an odd place still parses.
    let mut ok = hdr(op::RW, 1024, req.src_port);
    ok.len = 2;
    ok.buf_alloc = GUEST_BUF;
    let mut bytes = ok.encode().to_vec();
    bytes.extend_from_slice(b"ok");
    h.send_raw(&bytes, 7).unwrap();
    h.assert_quiet();

    // Misaddressed: silently dropped.
    let mut wrong_cid = hdr(op::REQUEST, 1, 2);
    wrong_cid.src_cid = 99;
    h.send(wrong_cid, &[]).unwrap();
    h.assert_quiet();

    // Unknown op for no connection, and a non-stream type: answered with RST.
    h.send(hdr(99, 5, 6), &[]).unwrap();
    let (rst, _) = h.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (6, 5));
    let mut dgram = hdr(op::REQUEST, 5, 6);
    dgram.type_ = 2;
    h.send(dgram, &[]).unwrap();
    h.expect(op::RST);
    // Data for a connection that does not exist.
    h.send(hdr(op::RW, 5, 6), b"zz").unwrap();
    h.expect(op::RST);
    // An RST for nothing gets no answer.
    h.send(hdr(op::RST, 5, 6), &[]).unwrap();
    h.assert_quiet();

    // Unknown op on a live connection resets it.
    h.send(hdr(42, 1024, req.src_port), &[]).unwrap();
    h.expect(op::RST);
    assert_eq!(h.muxer.connection_count(), 0);

    // A TX chain made only of device-writable buffers carries no readable bytes.
    let q = MockSplitQueue::new(&h.mem, 16);
    let chain = q
        .build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(
            TX_HDR,
            64,
            VRING_DESC_F_WRITE as u16,
            0,
        ))])
        .unwrap();
    assert!(h.muxer.process_tx_chain(chain).is_err());

    // An RX buffer too small for a header is refused.
    let (mut c2, _) = h.host_conn(1025);
    c2.write_all(b"data").unwrap();
    h.muxer.process_host_events();
    let q = MockSplitQueue::new(&h.mem, 16);
    let chain = q
        .build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(
            RX_HDR,
            20,
            VRING_DESC_F_WRITE as u16,
            0,
        ))])
        .unwrap();
    assert!(matches!(
        h.muxer.fill_rx_chain(chain),
        Err(ChainError::RxBufferTooSmall(20))
    ));
    // A descriptor pointing outside guest memory.
    let q = MockSplitQueue::new(&h.mem, 16);
    let chain = q
        .build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(
            0x2000_0000,
            64,
            0,
            0,
        ))])
        .unwrap();
    assert!(h.muxer.process_tx_chain(chain).is_err());
    // The data is still delivered afterwards.
    let (_, data) = h.expect(op::RW);
    assert_eq!(data, b"data");
}

#[test]
fn socket_file_removed_on_drop() {
    let h = Harness::new();
    let path = h.uds();
    assert!(path.exists());
    let dir = h.dir.clone();
    drop(h);
    assert!(!path.exists());
    assert!(!dir.exists());
}

/// Descriptors for one chain placed at `first` in the table, linked with NEXT flags.
fn linked(first: u16, parts: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i + 1 == parts.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i as u16 + 1))
        })
        .collect()
}

fn used_elem(mem: &GuestMemoryMmap, used_addr: GuestAddress, i: u64) -> (u32, u32) {
    let at = used_addr.0 + 4 + 8 * i;
    let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
    let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
    (id, len)
}

#[test]
fn queue_helpers_drive_split_queues_like_a_driver() {
    use virtio_queue::Queue;
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.dir.join("v.sock_5000")).unwrap();
    let mem = h.mem.clone();
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x0), 16);
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    let mut tx: Queue = txq.create_queue().unwrap();
    let mut rx: Queue = rxq.create_queue().unwrap();

    // TX: a REQUEST (header only) and an RW split over two descriptors.
    let mut req = hdr(op::REQUEST, 777, 5000);
    req.buf_alloc = GUEST_BUF;
    mem.write_slice(&req.encode(), GuestAddress(TX_HDR))
        .unwrap();
    let mut rw = hdr(op::RW, 777, 5000);
    rw.len = 5;
    rw.buf_alloc = GUEST_BUF;
    mem.write_slice(&rw.encode(), GuestAddress(TX_HDR + 0x100))
        .unwrap();
    mem.write_slice(b"hello", GuestAddress(TX_DATA)).unwrap();
    txq.add_desc_chains(&linked(0, &[(TX_HDR, HEADER_SIZE as u32, 0)]), 0)
        .unwrap();
    txq.add_desc_chains(
        &linked(
            1,
            &[(TX_HDR + 0x100, HEADER_SIZE as u32, 0), (TX_DATA, 5, 0)],
        ),
        1,
    )
    .unwrap();
    assert!(h.muxer.process_tx_queue(&mut tx, &mem).unwrap());
    assert_eq!(used_elem(&mem, txq.used_addr(), 0), (0, 0));
    assert_eq!(used_elem(&mem, txq.used_addr(), 1), (1, 0));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_available(&mut s, 5), b"hello");

    // RX: one buffer receives the RESPONSE; with nothing else pending the second stays.
    let w = VRING_DESC_F_WRITE as u16;
    rxq.add_desc_chains(&linked(0, &[(RX_HDR, 4096, w)]), 0)
        .unwrap();
    rxq.add_desc_chains(
        &linked(
            1,
            &[(RX_DATA, HEADER_SIZE as u32, w), (RX_DATA + 0x100, 4096, w)],
        ),
        1,
    )
    .unwrap();
    assert!(h.muxer.process_rx_queue(&mut rx, &mem).unwrap());
    assert_eq!(used_elem(&mem, rxq.used_addr(), 0), (0, HEADER_SIZE as u32));
    let mut hb = [0u8; HEADER_SIZE];
    mem.read_slice(&mut hb, GuestAddress(RX_HDR)).unwrap();
    assert_eq!(Header::decode(&hb).unwrap().op, op::RESPONSE);
    assert!(
        !h.muxer.process_rx_queue(&mut rx, &mem).unwrap(),
        "nothing pending"
    );

    // Host data lands in the second buffer, header and payload in separate descriptors.
    s.write_all(b"world").unwrap();
    h.muxer.process_host_events();
    assert!(h.muxer.process_rx_queue(&mut rx, &mem).unwrap());
    assert_eq!(
        used_elem(&mem, rxq.used_addr(), 1),
        (1, HEADER_SIZE as u32 + 5)
    );
    mem.read_slice(&mut hb, GuestAddress(RX_DATA)).unwrap();
    let got = Header::decode(&hb).unwrap();
    assert_eq!(
        (got.op, got.len, got.src_port, got.dst_port),
        (op::RW, 5, 5000, 777)
    );
    let mut data = [0u8; 5];
    mem.read_slice(&mut data, GuestAddress(RX_DATA + 0x100))
        .unwrap();
    assert_eq!(&data, b"world");

    // Out of RX buffers: the packet waits, nothing is lost.
    s.write_all(b"later").unwrap();
    h.muxer.process_host_events();
    assert!(!h.muxer.process_rx_queue(&mut rx, &mem).unwrap());
    assert!(h.muxer.has_pending_rx());
}

#[test]
fn reset_closes_everything_but_keeps_listening() {
    let mut h = Harness::new();
    let (mut c, _) = h.host_conn(1024);
    c.write_all(b"pending").unwrap();
    h.muxer.process_host_events();
    let mut pending = UnixStream::connect(h.uds()).unwrap();
    pending
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    h.muxer.process_host_events();
    h.muxer.reset();
    assert_eq!(h.muxer.connection_count(), 0);
    assert!(!h.muxer.has_pending_rx());
    let mut buf = [0u8; 8];
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    assert_eq!(pending.read(&mut buf).unwrap(), 0);
    // New clients are still served.
    let (_c2, _) = h.host_conn(1025);
}

#[test]
fn header_only_rx_buffer_does_not_lose_pending_data() {
    let mut h = Harness::new();
    let (mut c, _) = h.host_conn(1024);
    c.write_all(b"abc").unwrap();
    h.muxer.process_host_events();
    let mut only_header = [0u8; HEADER_SIZE];
    assert_eq!(h.muxer.fill_rx(&mut only_header), None);
    assert!(h.muxer.has_pending_rx(), "data still pending");
    let (_, data) = h.expect(op::RW);
    assert_eq!(data, b"abc");
}

#[test]
fn an_avail_index_a_queue_ahead_does_not_spin() {
    use virtio_queue::Queue;
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x0), 16);
    let mut tx: Queue = txq.create_queue().unwrap();
    // A hostile driver publishes idx 1000 on a 16-entry ring: nothing can be popped, yet
    // enable_notification keeps reporting more. The loop must return (the test would hang).
    mem.write_obj(1000u16, GuestAddress(txq.avail_addr().0 + 2))
        .unwrap();
    assert!(!h.muxer.process_tx_queue(&mut tx, &mem).unwrap());
}
