//! The host end of the guest's loopback DNS relay: Docker's embedded DNS listens on 127.0.0.11
//! inside the container's network namespace on the host, which the VM cannot reach. The agent
//! relays queries to it over vsock; the sandbox (living in that namespace) forwards each to the
//! resolver over UDP and sends the answer back, and passes the guest's TCP connections (for
//! answers too long for UDP) through to the resolver's TCP port.

use anyhow::{Context, Result};
use oci_spec::runtime::Spec;
use rootcell_protocol::dns::{read_message, splice, write_message};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long the resolver may take to answer one query.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TCP connection to the resolver may stay silent.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long a guest connection to the UDP relay may stay silent (the agent sends its query at
/// once; a guest that connects and says nothing must not hold a host thread for good).
const QUERY_IDLE: Duration = Duration::from_secs(10);
/// Most guest connections served at once, per relay port: each holds a host thread, and a guest
/// can open connections as fast as it likes. More are closed at once (the guest's resolver
/// retries, as after a lost datagram).
const MAX_ACTIVE: usize = 64;

/// The first nameserver on a loopback address in the container's /etc/resolv.conf (a bind
/// mount in config.json, as Docker gives it), if any.
pub fn loopback_resolver(spec: &Spec, bundle: &Path) -> Option<IpAddr> {
    let mount = spec
        .mounts()
        .as_ref()?
        .iter()
        .find(|m| m.destination() == Path::new("/etc/resolv.conf"))?;
    let source = bundle.join(mount.source().as_ref()?);
    let text = std::fs::read_to_string(source).ok()?;
    first_loopback_nameserver(&text)
}

fn first_loopback_nameserver(resolv_conf: &str) -> Option<IpAddr> {
    resolv_conf.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<IpAddr>().ok())
            .flatten()
            .filter(|a| a.is_loopback())
    })
}

/// A running relay (both ports): dropping it stops it. Its listening threads end; connections
/// being served end by themselves (each is bounded by its idle time).
#[must_use = "dropping the relay stops it"]
pub struct Relay {
    /// A second handle of each listening socket, to shut it down with.
    listeners: Vec<OwnedFd>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for fd in &self.listeners {
            // A listening socket shut down fails its blocked and later accept() calls
            // (EINVAL), which ends its thread.
            // SAFETY: `fd` is a socket this relay owns; shutdown takes no pointers.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// Listens on the hybrid vsock paths of the two relay ports in the VM's `run_dir`: forwards
/// every UDP query to `resolver`:53, and passes every TCP connection through to it, each on a
/// thread of its own, until the returned [`Relay`] is dropped.
pub fn serve(run_dir: &Path, resolver: IpAddr) -> Result<Relay> {
    let udp_socket = run_dir.join(crate::paths::dns_relay_socket());
    let tcp_socket = run_dir.join(crate::paths::dns_tcp_relay_socket());
    let resolver = SocketAddr::new(resolver, 53);
    let mut relay = Relay {
        listeners: Vec::with_capacity(2),
    };
    relay.listeners.push(listen(&udp_socket, move |conn| {
        answer(conn, resolver, QUERY_IDLE)
    })?);
    relay.listeners.push(listen(&tcp_socket, move |conn| {
        pass_through(conn, resolver)
    })?);
    Ok(relay)
}

/// Passes one guest TCP connection through to the resolver's TCP port.
fn pass_through(conn: UnixStream, resolver: SocketAddr) -> Result<()> {
    let tcp = TcpStream::connect_timeout(&resolver, ANSWER_TIMEOUT)
        .with_context(|| format!("cannot reach the resolver at {resolver} over TCP"))?;
    Ok(splice(conn, tcp, TCP_IDLE)?)
}

/// Serves each connection to `socket` with `handle` on a thread of its own, at most
/// [`MAX_ACTIVE`] at a time (a connection beyond that is closed unanswered), until the socket
/// is shut down through the returned handle.
fn listen(
    socket: &Path,
    handle: impl Fn(UnixStream) -> Result<()> + Send + Sync + Copy + 'static,
) -> Result<OwnedFd> {
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    // Connecting needs write permission: the vsock back end connects as its own jailed uid.
    // Who reaches the socket at all is the run dir's to decide (root's, readable by that
    // uid's group only).
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .with_context(|| format!("cannot open {} to the vsock back end", socket.display()))?;
    let stop = OwnedFd::from(
        listener
            .try_clone()
            .with_context(|| format!("cannot keep a handle of {}", socket.display()))?,
    );
    let active = std::sync::Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("dns-relay".into())
        .spawn(move || loop {
            let conn = match listener.accept() {
                Ok((conn, _)) => conn,
                // Shut down: the relay was dropped.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
                Err(e) => {
                    tracing::debug!("dns relay: accept: {e}");
                    // Out of fds or memory for a moment: do not spin on it.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_ACTIVE {
                active.fetch_sub(1, Ordering::SeqCst);
                tracing::debug!("dns relay: {MAX_ACTIVE} connections busy, closing one");
                continue;
            }
            let done = active.clone();
            let spawned = std::thread::Builder::new()
                .name("dns-query".into())
                .spawn(move || {
                    if let Err(e) = handle(conn) {
                        tracing::debug!("dns relay: {e:#}");
                    }
                    done.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::SeqCst);
            }
        })
        .context("cannot start the DNS relay thread")?;
    Ok(stop)
}

/// Answers the queries of one guest connection; a connection silent for `idle` is closed.
fn answer(mut conn: UnixStream, resolver: SocketAddr, idle: Duration) -> Result<()> {
    conn.set_read_timeout(Some(idle))?;
    let bind: SocketAddr = if resolver.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    }
    .parse()?;
    let udp = UdpSocket::bind(bind).context("cannot open a UDP socket")?;
    udp.connect(resolver)
        .with_context(|| format!("cannot reach the resolver at {resolver}"))?;
    udp.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut buf = vec![0u8; u16::MAX as usize];
    while let Ok(query) = read_message(&mut conn) {
        udp.send(&query).context("cannot send the query")?;
        let n = udp.recv(&mut buf).context("no answer from the resolver")?;
        write_message(&mut conn, &buf[..n]).context("cannot return the answer")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_loopback_nameserver_needs_the_relay() {
        let docker = "search example.org\nnameserver 127.0.0.11\noptions ndots:0\n";
        assert_eq!(
            first_loopback_nameserver(docker),
            Some("127.0.0.11".parse().unwrap())
        );
        assert_eq!(
            first_loopback_nameserver("nameserver 8.8.8.8\nnameserver 1.1.1.1\n"),
            None
        );
        assert_eq!(
            first_loopback_nameserver("# nameserver 127.0.0.1\nnameserver\n"),
            None
        );
    }

    #[test]
    fn queries_reach_the_resolver_and_answers_come_back() {
        let resolver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = resolver.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            for _ in 0..2 {
                let (n, from) = resolver.recv_from(&mut buf).unwrap();
                let mut reply = b"answer:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                resolver.send_to(&reply, from).unwrap();
            }
        });
        let (mut guest, host) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || answer(host, addr, QUERY_IDLE));
        for q in [&b"q1"[..], b"q2"] {
            write_message(&mut guest, q).unwrap();
            assert_eq!(read_message(&mut guest).unwrap(), [b"answer:", q].concat());
        }
        drop(guest);
        relay.join().unwrap().unwrap();
    }

    #[test]
    fn a_silent_guest_connection_is_closed_after_the_idle_time() {
        let resolver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (guest, host) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = answer(
                host,
                resolver.local_addr().unwrap(),
                Duration::from_millis(200),
            );
            let _ = tx.send(r.is_ok());
        });
        // Bounded: without the idle limit the relay would wait on the guest for good.
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        drop(guest);
    }

    #[test]
    fn connections_beyond_the_cap_are_closed_unanswered() {
        use std::io::Read;
        static RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("relay.sock");
        // A handler that holds its connection until released, as a silent guest would.
        listen(&socket, |_conn| {
            while !RELEASE.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })
        .unwrap();
        let held: Vec<UnixStream> = (0..MAX_ACTIVE)
            .map(|_| UnixStream::connect(&socket).unwrap())
            .collect();
        // The one past the cap is closed by the relay: EOF, not a wait.
        let mut extra = UnixStream::connect(&socket).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(extra.read(&mut buf).unwrap(), 0);
        // The held ones were all taken (none closed), and the relay serves again once they end.
        for mut c in &held {
            c.set_nonblocking(true).unwrap();
            let r = c.read(&mut buf);
            assert!(matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock));
        }
        RELEASE.store(true, Ordering::SeqCst);
        drop(held);
        std::thread::sleep(Duration::from_millis(200));
        RELEASE.store(false, Ordering::SeqCst);
        let mut again = UnixStream::connect(&socket).unwrap();
        again
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let r = again.read(&mut buf);
        assert!(
            r.is_err(),
            "a connection under the cap is served (held), not closed: {r:?}"
        );
        RELEASE.store(true, Ordering::SeqCst);
    }

    #[test]
    fn tcp_connections_pass_through_to_the_resolver() {
        use std::io::Read;
        let resolver = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = resolver.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = resolver.accept().unwrap();
            let q = read_message(&mut c).unwrap();
            write_message(&mut c, &[b"long answer to ", &q[..]].concat()).unwrap();
        });
        let (mut guest, host) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || pass_through(host, addr));
        write_message(&mut guest, b"q").unwrap();
        assert_eq!(read_message(&mut guest).unwrap(), b"long answer to q");
        // The resolver closed its end: the guest sees EOF, and the relay ends.
        let mut rest = Vec::new();
        guest.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(guest);
        relay.join().unwrap().unwrap();
    }

    /// A relay given up (a pool VM's, on a cold fallback) stops listening: its threads end and
    /// a guest connecting to its sockets is refused (its threads lingered for good).
    #[test]
    fn a_dropped_relay_stops_listening() {
        let dir = tempfile::tempdir().unwrap();
        let relay = serve(dir.path(), "127.0.0.1".parse().unwrap()).unwrap();
        let sockets = [
            dir.path().join(crate::paths::dns_relay_socket()),
            dir.path().join(crate::paths::dns_tcp_relay_socket()),
        ];
        for s in &sockets {
            UnixStream::connect(s).unwrap_or_else(|e| panic!("{}: {e}", s.display()));
        }
        drop(relay);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for s in &sockets {
            while UnixStream::connect(s).is_ok() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} still accepts connections 5 s after the relay was dropped",
                    s.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
