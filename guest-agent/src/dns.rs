//! Relays DNS queries sent to a loopback resolver address (Docker's embedded DNS at
//! 127.0.0.11, which lives in the container's network namespace on the host) to the host over
//! vsock, so name resolution on user-defined Docker networks works inside the VM: UDP queries
//! one by one, TCP connections (what resolvers fall back to for long answers) passed through.

use crate::alog;
use nix::sys::socket::{connect, VsockAddr};
use rootcell_protocol::dns::{read_message, splice, write_message};
use rootcell_protocol::{DNS_RELAY_PORT, DNS_TCP_RELAY_PORT};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The host's vsock CID.
const HOST_CID: u32 = 2;
/// How long one query may take end to end (resolvers retry on their own).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest DNS message over UDP with EDNS.
const MAX_MESSAGE: usize = 4096;

/// Binds `addr`:53 for UDP and TCP in the current network namespace and serves both on threads.
pub fn start(addr: IpAddr) -> io::Result<()> {
    let sock = UdpSocket::bind(SocketAddr::new(addr, 53))?;
    let listener = TcpListener::bind(SocketAddr::new(addr, 53))?;
    std::thread::Builder::new()
        .name("dns-relay".into())
        .spawn(move || serve(sock))?;
    std::thread::Builder::new()
        .name("dns-relay-tcp".into())
        .spawn(move || serve_tcp(listener))?;
    Ok(())
}

/// Passes each TCP connection through to the host's TCP relay.
fn serve_tcp(listener: TcpListener) {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return alog!("dns tcp relay stopped: {e}"),
        };
        let _ = std::thread::Builder::new()
            .name("dns-tcp".into())
            .spawn(move || {
                if let Err(e) = pass_through(conn) {
                    alog!("dns tcp relay: {e}");
                }
            });
    }
}

fn pass_through(conn: TcpStream) -> io::Result<()> {
    let host = connect_host(DNS_TCP_RELAY_PORT)?;
    splice(conn, host, QUERY_TIMEOUT)
}

fn serve(sock: UdpSocket) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, client) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                alog!("dns relay stopped: {e}");
                return;
            }
        };
        let query = buf[..n].to_vec();
        let Ok(reply_sock) = sock.try_clone() else {
            continue;
        };
        // One thread per query: a slow answer must not hold up the next query.
        let _ = std::thread::Builder::new()
            .name("dns-query".into())
            .spawn(move || match relay(&query) {
                Ok(answer) => {
                    let _ = reply_sock.send_to(&answer, client);
                }
                Err(e) => alog!("dns relay: query from {client} failed: {e}"),
            });
    }
}

/// Sends one query to the host and returns its answer.
fn relay(query: &[u8]) -> io::Result<Vec<u8>> {
    let mut conn = connect_host(DNS_RELAY_PORT)?;
    conn.set_read_timeout(Some(QUERY_TIMEOUT))?;
    conn.set_write_timeout(Some(QUERY_TIMEOUT))?;
    write_message(&mut conn, query)?;
    read_message(&mut conn)
}

/// A vsock stream to `port` on the host.
fn connect_host(port: u32) -> io::Result<UnixStream> {
    let fd = crate::listener::vsock_stream()?;
    connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, port))?;
    // A std UnixStream is used purely as a connected stream socket (plain read/write calls).
    Ok(UnixStream::from(fd))
}
