//! The transport-independent vsock device: multiplexes guest stream connections onto host unix
//! sockets.
//!
//! A transport (vhost-user here, in-process virtio-mmio in the built-in VMM) drives it like this:
//! - when the guest kicks the TX queue, pass every available chain to
//!   [`VsockMuxer::process_tx_chain`] and return it to the used ring with length 0;
//! - when [`VsockMuxer::epoll_fd`] becomes readable, call [`VsockMuxer::process_host_events`];
//! - after either, and when the guest kicks the RX queue, pop RX chains while
//!   [`VsockMuxer::has_pending_rx`] is true and fill each with [`VsockMuxer::fill_rx_chain`],
//!   returning it to the used ring with the length it reports;
//! - the event queue only needs to exist (no transport reset events are sent).
//!
//! The muxer never blocks: host sockets are non-blocking and watched by its own epoll instance.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::conn::{Connection, Verdict};
use crate::packet::{
    self, op, Header, PacketError, HEADER_SIZE, HOST_CID, MAX_PAYLOAD, TYPE_STREAM,
};
use crate::Error;

/// `(host-side port, guest-side port)`.
type ConnKey = (u32, u32);

const LISTENER_TOKEN: u64 = 0;
/// Host-initiated connections get host-side ports from here up, away from the ports guests
/// usually connect to.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 64;
/// Most connections the muxer holds at once. Each is a host socket (and, behind the host
/// services a guest reaches, often a thread); a guest can ask for a connection per packet, so
/// past this a guest's connection request is refused with RST. Far above what a sandbox uses
/// (a control connection, a few streams per process, DNS relay queries).
pub const MAX_CONNECTIONS: usize = 1024;

/// What an epoll token refers to.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Conn(ConnKey),
    Handshake,
}

/// A host client that has not finished its `CONNECT <port>\n` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Errors from handling one descriptor chain; the chain is still returned to the guest.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain's buffers are not in guest memory or are laid out wrongly.
    #[error("invalid descriptor chain: {0}")]
    Chain(#[from] virtio_queue::Error),
    /// Copying from or to guest memory failed.
    #[error("guest memory access: {0}")]
    Memory(#[from] io::Error),
    /// The bytes do not form a valid packet.
    #[error("malformed packet: {0}")]
    Packet(#[from] PacketError),
    /// An RX buffer too small for a header.
    #[error("RX buffer of {0} bytes cannot hold a packet header")]
    RxBufferTooSmall(usize),
}

/// The vsock device logic: connections, credit accounting and the hybrid host socket.
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    slots: HashMap<u64, Slot>,
    handshakes: HashMap<u64, Handshake>,
    next_token: u64,
    next_local_port: u32,
    /// Packets not tied to a live connection (RSTs), sent before connection traffic.
    ctrl_rx: VecDeque<Header>,
    /// Connections that may have something for the guest, served round-robin.
    rx_ready: VecDeque<ConnKey>,
    scratch: Vec<u8>,
    pkt_buf: Vec<u8>,
    /// Remove the socket file when dropped (see [`VsockMuxer::leave_socket_file`]).
    remove_on_drop: bool,
}

impl std::fmt::Debug for VsockMuxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockMuxer")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl VsockMuxer {
    /// Binds the hybrid socket at `uds_path` (replacing a stale socket file) and builds a muxer.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if meta.file_type().is_socket() {
                // A leftover from a previous run would make bind fail with EADDRINUSE.
                let _ = std::fs::remove_file(uds_path);
            }
        }
        let bind_err = |source| Error::BindHybrid {
            path: uds_path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(|source| Error::Setup {
            what: "muxer epoll",
            source,
        })?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(|source| Error::Setup {
                what: "muxer epoll",
                source,
            })?;
        Ok(VsockMuxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            slots: HashMap::new(),
            handshakes: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            ctrl_rx: VecDeque::new(),
            rx_ready: VecDeque::new(),
            scratch: vec![0; 64 * 1024],
            pkt_buf: vec![0; HEADER_SIZE + MAX_PAYLOAD],
            remove_on_drop: true,
        })
    }

    /// Leaves the socket file in place when the muxer is dropped: for a muxer that ends on a
    /// thread that may not unlink files (a confined device thread), whose owner removes the
    /// file itself.
    pub fn leave_socket_file(&mut self) {
        self.remove_on_drop = false;
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The hybrid socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// An fd that becomes readable when host sockets need [`Self::process_host_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections (handshakes in progress not counted).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Forgets every connection and pending packet, as a device reset requires; host clients see
    /// their sockets closed. The hybrid listener stays open.
    pub fn reset(&mut self) {
        for conn in self.conns.values() {
            if conn.registered != 0 {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        self.conns.clear();
        let handshakes: Vec<u64> = self.handshakes.keys().copied().collect();
        for token in handshakes {
            self.drop_handshake(token);
        }
        self.slots.clear();
        self.ctrl_rx.clear();
        self.rx_ready.clear();
    }

    /// Handles all ready host-side events without blocking.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        // Bounded so one busy socket cannot starve the transport's other work.
        for _ in 0..16 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock muxer epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                self.handle_host_event(ev.data(), ev.events());
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn handle_host_event(&mut self, token: u64, events: u32) {
        if token == LISTENER_TOKEN {
            self.accept_clients();
            return;
        }
        match self.slots.get(&token).copied() {
            Some(Slot::Handshake) => self.read_handshake(token),
            Some(Slot::Conn(key)) => {
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                let verdict = conn.on_host_event(events, &mut self.scratch);
                self.settle(key, verdict);
            }
            // Already removed while earlier events of this batch were handled.
            None => {}
        }
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.alloc_token();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            stream.as_raw_fd(),
                            EpollEvent::new(EventSet::IN, token),
                        )
                        .is_err()
                    {
                        continue;
                    }
                    self.slots.insert(token, Slot::Handshake);
                    self.handshakes.insert(
                        token,
                        Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                    // The client usually sent its line together with connect(): take it now.
                    self.read_handshake(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("accepting on {}: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    fn drop_handshake(&mut self, token: u64) -> Option<Handshake> {
        self.slots.remove(&token);
        let hs = self.handshakes.remove(&token)?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            hs.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(hs)
    }

    fn read_handshake(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let done = loop {
            match hs.stream.read(&mut buf) {
                Ok(0) => break Err(()),
                Ok(n) => {
                    hs.line.extend_from_slice(&buf[..n]);
                    if hs.line.contains(&b'\n') {
                        break Ok(());
                    }
                    if hs.line.len() > MAX_CONNECT_LINE {
                        break Err(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        let Some(hs) = self.drop_handshake(token) else {
            return;
        };
        if done.is_err() {
            return;
        }
        let nl = hs
            .line
            .iter()
            .position(|&b| b == b'\n')
            .expect("checked above");
        let Some(peer_port) = parse_connect_line(&hs.line[..nl]) else {
            tracing::debug!(
                "bad hybrid vsock handshake {:?}",
                String::from_utf8_lossy(&hs.line)
            );
            let mut stream = hs.stream;
            let _ = stream.write_all(b"ERR bad CONNECT line\n");
            return;
        };
        let local_port = self.alloc_local_port(peer_port);
        let conn = Connection::connecting(hs.stream, local_port, peer_port, &hs.line[nl + 1..]);
        self.insert(conn);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    fn insert(&mut self, mut conn: Connection) {
        let key = (conn.local_port, conn.peer_port);
        conn.token = self.alloc_token();
        self.slots.insert(conn.token, Slot::Conn(key));
        if let Some(old) = self.conns.insert(key, conn) {
            // Cannot happen with fresh keys; do not leak the old socket's registration.
            self.slots.remove(&old.token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.settle(key, Verdict::Keep);
    }

    /// Applies a connection's verdict, then refreshes its epoll interest and RX readiness.
    fn settle(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {}
            Verdict::Reset | Verdict::Forget => {
                if let Some(conn) = self.conns.remove(&key) {
                    self.slots.remove(&conn.token);
                    if conn.registered != 0 {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            conn.stream.as_raw_fd(),
                            EpollEvent::default(),
                        );
                    }
                    if verdict == Verdict::Reset {
                        self.ctrl_rx.push_back(Header {
                            src_port: conn.local_port,
                            dst_port: conn.peer_port,
                            type_: TYPE_STREAM,
                            op: op::RST,
                            ..Header::default()
                        });
                    }
                }
                return;
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want = conn.interest();
        if want != conn.registered {
            let fd = conn.stream.as_raw_fd();
            let ev = EpollEvent::new(EventSet::from_bits_truncate(want), conn.token);
            // An fd with no interest is removed rather than kept with an empty mask: epoll
            // would still report HUP for it and spin the event loop.
            let res = if want == 0 {
                self.epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            } else if conn.registered == 0 {
                self.epoll.ctl(ControlOperation::Add, fd, ev)
            } else {
                self.epoll.ctl(ControlOperation::Modify, fd, ev)
            };
            match res {
                Ok(()) => conn.registered = want,
                Err(e) => tracing::warn!("vsock epoll_ctl: {e}"),
            }
        }
        if !conn.queued && conn.has_rx() {
            conn.queued = true;
            self.rx_ready.push_back(key);
        }
    }

    /// Handles one guest-to-host packet given as raw bytes (header followed by payload).
    ///
    /// Malformed packets are rejected with an error and otherwise ignored.
    pub fn handle_guest_packet(&mut self, bytes: &[u8]) -> Result<(), PacketError> {
        let pkt = packet::parse(bytes)?;
        let h = pkt.hdr;
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            // Not addressed from this guest to the host: nothing to answer on its behalf.
            tracing::debug!(
                src = h.src_cid,
                dst = h.dst_cid,
                "dropping misaddressed packet"
            );
            return Ok(());
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            self.reply_rst(&h);
            return Ok(());
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            let verdict = conn.on_guest_packet(&h, pkt.data);
            self.settle(key, verdict);
            return Ok(());
        }
        match h.op {
            op::REQUEST => self.guest_connect(&h),
            op::RST => {}
            _ => self.reply_rst(&h),
        }
        Ok(())
    }

    fn reply_rst(&mut self, h: &Header) {
        if h.op == op::RST {
            return;
        }
        self.ctrl_rx.push_back(Header {
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        });
    }

    /// A guest connects to host port P: forward to `<uds_path>_<P>` if something listens there.
    fn guest_connect(&mut self, h: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!(
                port = h.dst_port,
                "guest connect refused: {MAX_CONNECTIONS} connections open"
            );
            self.reply_rst(h);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("guest connect to {}: {e}", Path::new(&path).display());
                self.reply_rst(h);
                return;
            }
        };
        self.insert(Connection::accepted(stream, h.dst_port, h));
    }

    /// Whether [`Self::fill_rx`] / [`Self::fill_rx_chain`] has a packet to deliver.
    pub fn has_pending_rx(&mut self) -> bool {
        if !self.ctrl_rx.is_empty() {
            return true;
        }
        while let Some(key) = self.rx_ready.front() {
            match self.conns.get_mut(key) {
                Some(c) if c.has_rx() => return true,
                Some(c) => c.queued = false,
                None => {}
            }
            self.rx_ready.pop_front();
        }
        false
    }

    /// Writes the next host-to-guest packet into `buf`; returns its length, or `None` if
    /// nothing is pending or `buf` cannot hold a header.
    pub fn fill_rx(&mut self, buf: &mut [u8]) -> Option<usize> {
        if buf.len() < HEADER_SIZE {
            return None;
        }
        let (hdr_buf, data) = buf.split_at_mut(HEADER_SIZE);
        let max = data.len().min(MAX_PAYLOAD);
        if let Some(mut h) = self.ctrl_rx.pop_front() {
            h.src_cid = HOST_CID;
            h.dst_cid = self.guest_cid;
            hdr_buf.copy_from_slice(&h.encode());
            return Some(HEADER_SIZE);
        }
        // Connections with only payload due cannot use a header-only buffer: requeue them.
        let mut skipped = Vec::new();
        let mut written = None;
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let Some((mut h, n)) = conn.next_rx(&mut data[..max]) else {
                skipped.push(key);
                continue;
            };
            h.src_cid = HOST_CID;
            h.dst_cid = self.guest_cid;
            hdr_buf.copy_from_slice(&h.encode());
            let verdict = conn.after_rx();
            self.settle(key, verdict);
            written = Some(HEADER_SIZE + n);
            break;
        }
        for key in skipped {
            self.settle(key, Verdict::Keep);
        }
        written
    }

    /// Reads one packet from a TX chain (device-readable buffers) and handles it.
    pub fn process_tx_chain<M>(&mut self, chain: DescriptorChain<M>) -> Result<(), ChainError>
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
    {
        let mem = chain.memory();
        let mut reader: Reader<'_, _> = Reader::new(mem, chain.clone())?;
        let len = reader.available_bytes().min(HEADER_SIZE + MAX_PAYLOAD);
        // The scratch buffer keeps its full size: re-zeroing it per packet costs more than the copy.
        let mut buf = std::mem::take(&mut self.pkt_buf);
        let res = reader.read_exact(&mut buf[..len]).map_err(ChainError::from);
        let res = res.and_then(|()| {
            self.handle_guest_packet(&buf[..len])
                .map_err(ChainError::from)
        });
        self.pkt_buf = buf;
        res
    }

    /// Fills one RX chain (device-writable buffers) with the next packet; returns the number of
    /// bytes written for the used ring (0 if nothing was pending).
    pub fn fill_rx_chain<M>(&mut self, chain: DescriptorChain<M>) -> Result<u32, ChainError>
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
    {
        let mem = chain.memory();
        let mut writer: Writer<'_, _> = Writer::new(mem, chain.clone())?;
        let room = writer.available_bytes();
        if room < HEADER_SIZE {
            return Err(ChainError::RxBufferTooSmall(room));
        }
        let mut buf = std::mem::take(&mut self.pkt_buf);
        let room = room.min(buf.len());
        let res = match self.fill_rx(&mut buf[..room]) {
            Some(n) => writer
                .write_all(&buf[..n])
                .map(|()| n as u32)
                .map_err(ChainError::from),
            None => Ok(0),
        };
        self.pkt_buf = buf;
        res
    }
}

impl VsockMuxer {
    /// Drains a TX queue into the muxer; returns whether the guest should be notified.
    ///
    /// Works with or without `VIRTIO_RING_F_EVENT_IDX` (as negotiated on `queue`): it re-arms
    /// notifications and re-checks, so no kick is lost between the last pop and the re-arm.
    pub fn process_tx_queue<Q, M>(&mut self, queue: &mut Q, mem: &M) -> Result<bool, ChainError>
    where
        Q: QueueT,
        M: GuestMemory,
    {
        let mut used = false;
        loop {
            queue.disable_notification(mem)?;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                if let Err(e) = self.process_tx_chain(chain) {
                    tracing::debug!("vsock TX packet rejected: {e}");
                }
                queue.add_used(mem, head, 0)?;
                used = true;
            }
            if !queue.enable_notification(mem)? || avail_ring_broken(queue, mem) {
                break;
            }
        }
        Ok(used && queue.needs_notification(mem)?)
    }

    /// Fills RX buffers from `queue` while packets are pending; returns whether the guest should
    /// be notified. When buffers run out, notifications stay armed so the guest's next kick
    /// (new buffers) brings the transport back here.
    pub fn process_rx_queue<Q, M>(&mut self, queue: &mut Q, mem: &M) -> Result<bool, ChainError>
    where
        Q: QueueT,
        M: GuestMemory,
    {
        let mut used = false;
        loop {
            queue.disable_notification(mem)?;
            while self.has_pending_rx() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                let len = self.fill_rx_chain(chain).unwrap_or_else(|e| {
                    tracing::debug!("vsock RX buffer unusable: {e}");
                    0
                });
                queue.add_used(mem, head, len)?;
                used = true;
            }
            if !queue.enable_notification(mem)?
                || !self.has_pending_rx()
                || avail_ring_broken(queue, mem)
            {
                break;
            }
        }
        Ok(used && queue.needs_notification(mem)?)
    }
}

/// True if the driver published an available index no valid ring can have (more than a
/// queue's worth ahead of the device): `pop_descriptor_chain` then finds nothing while
/// `enable_notification` keeps reporting more, and a loop on the two would never end.
fn avail_ring_broken<Q: QueueT, M: GuestMemory>(queue: &mut Q, mem: &M) -> bool {
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => idx.0.wrapping_sub(queue.next_avail()) > queue.size(),
        Err(_) => true,
    }
}

/// Connects a non-blocking unix stream socket to `path`. A blocking connect waits while the
/// listener's backlog is full, for as long as the service there does not accept: on the
/// device's one thread that stops every connection (the runtime's control connection too).
/// Non-blocking, a unix socket's connect completes at once or fails (`EAGAIN` when the backlog
/// is full), never `EINPROGRESS`.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Room for the terminating NUL, as the kernel reads a pathname.
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: plain syscall; the descriptor it returns is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: `addr` is a sockaddr_un valid for `len` (< its size) bytes.
    let r = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// Parses `CONNECT <port>` (an optional trailing `\r` tolerated).
fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

impl AsRawFd for VsockMuxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll_fd()
    }
}

#[cfg(test)]
mod tests;
