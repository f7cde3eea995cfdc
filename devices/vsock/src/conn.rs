//! One vsock stream connection between a guest port and a host unix socket.
//!
//! Holds the credit accounting of both directions and the two bounded buffers that decouple the
//! guest's queues from the host socket, so a slow side never makes the device drop data.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use crate::packet::{op, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer we advertise to the guest (`buf_alloc`): bounds the guest->host backlog.
pub(crate) const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Bound on host bytes read ahead of the guest's credit.
pub(crate) const HOST_BUF_SIZE: usize = 256 * 1024;
/// Announce freed space once this much was forwarded unannounced (a quarter of the window, so
/// the guest never stalls waiting for credit while data flows).
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// Lifecycle of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data may flow.
    Established,
}

/// What the muxer must do after a connection handled an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Keep the connection.
    Keep,
    /// Drop the connection and tell the guest with an RST.
    Reset,
    /// Drop the connection silently (the guest already reset it).
    Forget,
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Connection {
    /// The host unix socket (non-blocking).
    pub stream: UnixStream,
    /// Port on the host side (CID 2).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
    pub state: State,
    /// Whether this connection currently sits in the muxer's RX ready list.
    pub queued: bool,
    /// Events currently registered in the muxer's epoll (0 = not registered).
    pub registered: u32,
    /// The muxer's epoll token for this connection.
    pub token: u64,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Payload bytes received from the guest and written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last announced to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest data not yet written to the host socket.
    tx_buf: VecDeque<u8>,
    /// Host data not yet sent to the guest.
    rx_buf: VecDeque<u8>,
    host_eof: bool,
    shutdown_sent: bool,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    host_wr_shut: bool,
    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
}

impl Connection {
    /// A host-initiated connection: a REQUEST is to be sent to the guest.
    pub fn connecting(stream: UnixStream, local_port: u32, peer_port: u32, early: &[u8]) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::Connecting);
        c.need_request = true;
        // Bytes the client sent right after its CONNECT line are host data like any other.
        c.rx_buf.extend(early);
        c
    }

    /// A guest-initiated connection that the host accepted: a RESPONSE is to be sent.
    pub fn accepted(stream: UnixStream, local_port: u32, hdr: &Header) -> Self {
        let mut c = Self::new(stream, local_port, hdr.src_port, State::Established);
        c.need_response = true;
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            queued: false,
            registered: 0,
            token: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            rx_buf: VecDeque::new(),
            host_eof: false,
            shutdown_sent: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_wr_shut: false,
            need_request: false,
            need_response: false,
            need_credit_update: false,
        }
    }

    /// Bytes the guest can still accept right now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn shutdown_due(&self) -> bool {
        self.state == State::Established
            && self.host_eof
            && self.rx_buf.is_empty()
            && !self.shutdown_sent
            && !self.guest_shut_rcv
    }

    fn data_due(&self) -> bool {
        self.state == State::Established
            && !self.rx_buf.is_empty()
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest's RX queue.
    pub fn has_rx(&self) -> bool {
        self.need_request
            || self.need_response
            || self.need_credit_update
            || self.data_due()
            || self.shutdown_due()
    }

    /// Epoll events the host socket should be watched for.
    pub fn interest(&self) -> u32 {
        let mut ev = 0;
        let want_read = self.state == State::Established
            && !self.host_eof
            && (self.rx_buf.len() < HOST_BUF_SIZE || self.guest_shut_rcv);
        if want_read {
            ev |= libc::EPOLLIN as u32;
        }
        if !self.tx_buf.is_empty() {
            ev |= libc::EPOLLOUT as u32;
        }
        ev
    }

    fn header(&mut self, op: u16, len: u32, flags: u32) -> Header {
        // Every header carries our current counters, so it doubles as a credit update.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.need_credit_update = false;
        Header {
            src_cid: 0,
            dst_cid: 0,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Produces the next packet for the guest into `data` (at most `data.len()` payload bytes).
    ///
    /// Returns the header (CIDs left for the muxer to fill) and the payload length, or `None`
    /// when nothing is due.
    pub fn next_rx(&mut self, data: &mut [u8]) -> Option<(Header, usize)> {
        if self.need_request {
            self.need_request = false;
            return Some((self.header(op::REQUEST, 0, 0), 0));
        }
        if self.need_response {
            self.need_response = false;
            return Some((self.header(op::RESPONSE, 0, 0), 0));
        }
        if self.data_due() && !data.is_empty() {
            let n = data
                .len()
                .min(self.rx_buf.len())
                .min(self.peer_credit() as usize);
            let (a, b) = self.rx_buf.as_slices();
            let from_a = n.min(a.len());
            data[..from_a].copy_from_slice(&a[..from_a]);
            data[from_a..n].copy_from_slice(&b[..n - from_a]);
            self.rx_buf.drain(..n);
            self.rx_cnt += Wrapping(n as u32);
            return Some((self.header(op::RW, n as u32, 0), n));
        }
        if self.shutdown_due() {
            self.shutdown_sent = true;
            // SEND only: the host client half-closed, it still wants to read the guest's reply.
            return Some((self.header(op::SHUTDOWN, 0, SHUTDOWN_SEND), 0));
        }
        if self.need_credit_update {
            return Some((self.header(op::CREDIT_UPDATE, 0, 0), 0));
        }
        None
    }

    /// Handles a packet the guest sent on this connection (header already validated).
    pub fn on_guest_packet(&mut self, hdr: &Header, data: &[u8]) -> Verdict {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            op::RST => return Verdict::Forget,
            op::RESPONSE => {
                if self.state != State::Connecting {
                    return Verdict::Reset;
                }
                self.state = State::Established;
                let reply = format!("OK {}\n", self.local_port);
                // A fresh socket's send buffer is empty, so this short line cannot block; if it
                // does not go out whole the client is gone or broken.
                match send_nosignal(&self.stream, reply.as_bytes()) {
                    Ok(n) if n == reply.len() => {}
                    _ => return Verdict::Reset,
                }
            }
            op::RW => {
                if self.state != State::Established {
                    return Verdict::Reset;
                }
                if self.guest_shut_send || self.host_wr_shut {
                    // Data after the guest's own SHUTDOWN(SEND) is a driver bug; ignore it.
                    return Verdict::Keep;
                }
                if self.tx_buf.len() + data.len() > 2 * CONN_BUF_SIZE as usize {
                    tracing::warn!(
                        port = self.local_port,
                        "guest ignored our credit; resetting"
                    );
                    return Verdict::Reset;
                }
                self.tx_buf.extend(data);
                if let Err(e) = self.flush_to_host() {
                    tracing::debug!(port = self.local_port, "host write failed: {e}");
                    return Verdict::Reset;
                }
            }
            op::SHUTDOWN => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    self.guest_shut_send = true;
                }
                if hdr.flags & SHUTDOWN_RCV != 0 {
                    self.guest_shut_rcv = true;
                    self.rx_buf.clear();
                }
            }
            op::CREDIT_REQUEST => self.need_credit_update = true,
            op::CREDIT_UPDATE => {}
            // REQUEST on a live connection, or an op the muxer should have filtered.
            _ => return Verdict::Reset,
        }
        self.settle()
    }

    /// Writes buffered guest data to the host socket until it would block.
    fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match send_nosignal(&self.stream, a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.need_credit_update = true;
        }
        Ok(())
    }

    /// Applies shutdown consequences once buffers allow; decides whether the connection ends.
    fn settle(&mut self) -> Verdict {
        if self.guest_shut_send && self.tx_buf.is_empty() && !self.host_wr_shut {
            // Host client reads EOF but may keep writing to the guest.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_wr_shut = true;
        }
        let guest_done = self.host_wr_shut && self.guest_shut_rcv;
        let both_half_closed = self.host_wr_shut && self.shutdown_sent;
        if guest_done || both_half_closed {
            // Nothing can flow either way any more: full close, as the spec's RST ends it.
            return Verdict::Reset;
        }
        Verdict::Keep
    }

    /// Handles readiness of the host socket.
    pub fn on_host_event(&mut self, events: u32, scratch: &mut [u8]) -> Verdict {
        if events & libc::EPOLLOUT as u32 != 0 || !self.tx_buf.is_empty() {
            if let Err(e) = self.flush_to_host() {
                tracing::debug!(port = self.local_port, "host write failed: {e}");
                return Verdict::Reset;
            }
        }
        if events & (libc::EPOLLIN | libc::EPOLLHUP) as u32 != 0
            && self.interest() & libc::EPOLLIN as u32 != 0
        {
            loop {
                let room = if self.guest_shut_rcv {
                    scratch.len()
                } else {
                    HOST_BUF_SIZE
                        .saturating_sub(self.rx_buf.len())
                        .min(scratch.len())
                };
                if room == 0 {
                    break;
                }
                match self.stream.read(&mut scratch[..room]) {
                    Ok(0) => {
                        self.host_eof = true;
                        break;
                    }
                    Ok(n) => {
                        if !self.guest_shut_rcv {
                            self.rx_buf.extend(&scratch[..n]);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!(port = self.local_port, "host read failed: {e}");
                        return Verdict::Reset;
                    }
                }
            }
        } else if events & libc::EPOLLERR as u32 != 0 {
            return Verdict::Reset;
        }
        self.settle()
    }

    /// Called after a packet was sent to the guest: a SHUTDOWN may have completed the close.
    pub fn after_rx(&mut self) -> Verdict {
        self.settle()
    }
}

/// `write` without SIGPIPE: a host client that went away must cost a connection, not the process.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes and the fd is owned by `stream`.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
