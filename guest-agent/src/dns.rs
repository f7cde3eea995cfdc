//! Relays DNS queries sent to a loopback resolver address (Docker's embedded DNS at
//! 127.0.0.11, which lives in the container's network namespace on the host) to the host over
//! vsock, so name resolution on user-defined Docker networks works inside the VM: UDP queries
//! one by one, TCP connections (what resolvers fall back to for long answers) passed through.

use crate::alog;
use crate::threads::vital;
use nix::sys::socket::{connect, VsockAddr};
use rootcell_protocol::dns::{read_message, splice, write_message};
use rootcell_protocol::{DNS_RELAY_PORT, DNS_TCP_RELAY_PORT};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The host's vsock CID.
const HOST_CID: u32 = 2;
/// How long one query may take end to end (resolvers retry on their own).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest DNS message over UDP with EDNS.
const MAX_MESSAGE: usize = 4096;
/// Most UDP queries (and, apart, TCP connections) relayed at once: each holds a thread of the
/// agent and a vsock connection, and a container can send queries as fast as it likes. The
/// host's relay serves as many per port (runtime/src/dns.rs `MAX_ACTIVE`) and closes more.
const MAX_IN_FLIGHT: usize = 64;

/// What the container loses with a relay loop (for the log line that ends the agent).
const LOST: &str = "name resolution in the container would stop";
/// The pause after a relay loop's first failure in a row; doubled after each further one, up
/// to [`MAX_PAUSE`] (the backoff Go's HTTP server uses for failing accepts).
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause between a relay loop's attempts.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Binds `addr`:53 for UDP and TCP in the current network namespace and serves both on threads.
///
/// No other thread answers the container's queries, so a loop's failure must not end it
/// silently (name resolution would stop, with a console line for all trace). A failure of the
/// moment (out of fds, memory or threads) is waited out, as Docker's embedded DNS does; a
/// socket that cannot serve again ends the agent as any vital thread's end does (threads.rs):
/// the container ends with 137 and the log says why, rather than living on unable to resolve.
pub fn start(addr: IpAddr) -> io::Result<()> {
    let sock = UdpSocket::bind(SocketAddr::new(addr, 53))?;
    let listener = TcpListener::bind(SocketAddr::new(addr, 53))?;
    vital("dns-relay", LOST, move || {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let what = "dns relay";
        let queries = InFlight::new(what, MAX_IN_FLIGHT);
        let e = keep_serving(
            what,
            || take_query(&sock, &mut buf, &queries, relay),
            std::thread::sleep,
        );
        panic!("{what} on {addr}:53: {e}")
    })?;
    vital("dns-relay-tcp", LOST, move || {
        let what = "dns tcp relay";
        let conns = InFlight::new(what, MAX_IN_FLIGHT);
        let e = keep_serving(
            what,
            || take_connection(&listener, &conns),
            std::thread::sleep,
        );
        panic!("{what} on {addr}:53: {e}")
    })?;
    Ok(())
}

/// Runs a relay loop's `step` over and over, and returns the error that ends it: one after
/// which its socket cannot serve again ([`transient`]). After a transient failure it calls
/// `pause` (sleep, but for the tests), with a pause that grows from [`FIRST_PAUSE`] to
/// [`MAX_PAUSE`] while failures follow each other and starts over after a step that worked.
/// The first failure of a run and the recovery are logged, not every retry.
fn keep_serving(
    what: &str,
    mut step: impl FnMut() -> io::Result<()>,
    mut pause: impl FnMut(Duration),
) -> io::Error {
    let mut failed = 0u64;
    let mut next = FIRST_PAUSE;
    loop {
        match step() {
            Ok(()) if failed > 0 => {
                alog!("{what}: serving again after {failed} failed attempts");
                failed = 0;
                next = FIRST_PAUSE;
            }
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if transient(&e) => {
                if failed == 0 {
                    alog!("{what}: {e}; retrying until it works again");
                }
                failed += 1;
                pause(next);
                next = (next * 2).min(MAX_PAUSE);
            }
            Err(e) => return e,
        }
    }
}

/// Whether a relay socket that failed with `e` may serve again. It may after all errors but
/// those that say the socket itself is unusable (closed, not a socket, shut down, a bad
/// buffer), which only a bug in the agent causes and no retry mends. The others are a shortage
/// of the moment (EMFILE, ENFILE, ENOMEM, ENOBUFS; EAGAIN from a thread's spawn) or the
/// network errors accept(2) says to retry.
fn transient(e: &io::Error) -> bool {
    !matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::ENOTSOCK | libc::EINVAL | libc::EFAULT)
    )
}

/// How many of a relay's queries (or connections) are being answered, each by a thread of its
/// own, out of at most `max`. One beyond that is dropped, as a DNS server under overload drops
/// what it cannot serve (the resolver retries, as after a lost datagram); the first drop of a
/// run and the recovery are logged, not every drop.
struct InFlight {
    what: &'static str,
    max: usize,
    now: AtomicUsize,
    dropped: AtomicUsize,
}

/// One query's place among those [`InFlight`] counts, given back when dropped (by its thread's
/// end, a panic included, or at once when the thread could not be started).
struct Slot(Arc<InFlight>);

impl InFlight {
    fn new(what: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            max,
            now: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
        })
    }

    /// A slot for one more query, or `None` (the query is to be dropped) when `max` are in
    /// flight.
    fn enter(self: &Arc<Self>) -> Option<Slot> {
        if self.now.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.now.fetch_sub(1, Ordering::SeqCst);
            if self.dropped.fetch_add(1, Ordering::SeqCst) == 0 {
                alog!(
                    "{}: {} in flight, dropping more until one is answered",
                    self.what,
                    self.max
                );
            }
            return None;
        }
        let dropped = self.dropped.swap(0, Ordering::SeqCst);
        if dropped > 0 {
            alog!("{}: serving again after dropping {dropped}", self.what);
        }
        Some(Slot(self.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes one TCP connection and passes it through to the host's TCP relay on a thread of its
/// own. A connection taken but not handed on (no thread, or `conns` full) is closed: the
/// resolver retries.
fn take_connection(listener: &TcpListener, conns: &Arc<InFlight>) -> io::Result<()> {
    let (conn, _) = listener.accept()?;
    let Some(slot) = conns.enter() else {
        return Ok(());
    };
    std::thread::Builder::new()
        .name("dns-tcp".into())
        .spawn(move || {
            let _slot = slot;
            if let Err(e) = pass_through(conn) {
                alog!("dns tcp relay: {e}");
            }
        })?;
    Ok(())
}

fn pass_through(conn: TcpStream) -> io::Result<()> {
    let host = connect_host(DNS_TCP_RELAY_PORT)?;
    splice(conn, host, QUERY_TIMEOUT)
}

/// Takes one UDP query and answers it with `relay` (the host, but for the tests) on a thread
/// of its own: a slow answer must not hold up the next query. A query taken but not handed on
/// (no thread, or `queries` full) is dropped: the resolver retries.
fn take_query(
    sock: &UdpSocket,
    buf: &mut [u8],
    queries: &Arc<InFlight>,
    relay: fn(&[u8]) -> io::Result<Vec<u8>>,
) -> io::Result<()> {
    let (n, client) = sock.recv_from(buf)?;
    let Some(slot) = queries.enter() else {
        return Ok(());
    };
    let query = buf[..n].to_vec();
    let reply_sock = sock.try_clone()?;
    std::thread::Builder::new()
        .name("dns-query".into())
        .spawn(move || {
            let _slot = slot;
            match relay(&query) {
                Ok(answer) => {
                    let _ = reply_sock.send_to(&answer, client);
                }
                Err(e) => alog!("dns relay: query from {client} failed: {e}"),
            }
        })?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    use nix::sys::socket::{shutdown, Shutdown};

    fn os(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    /// Transient failures are retried with a growing pause that starts over after a step that
    /// worked, EINTR at once; a broken socket's error ends the loop without a retry.
    #[test]
    fn transient_failures_are_retried_and_a_broken_socket_ends_the_loop() {
        let mut script = vec![
            Err(os(libc::EMFILE)),
            Err(os(libc::ENOBUFS)),
            Err(os(libc::EINTR)),
            Err(os(libc::EAGAIN)),
            Ok(()),
            Err(os(libc::ENOMEM)),
            Ok(()),
            Err(os(libc::EBADF)),
            Ok(()),
        ]
        .into_iter();
        let mut steps = 0;
        let mut pauses = Vec::new();
        let e = keep_serving(
            "test",
            || {
                steps += 1;
                script.next().expect("the loop went on after EBADF")
            },
            |d| pauses.push(d),
        );
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        assert_eq!(steps, 8);
        let ms = |n| Duration::from_millis(n);
        assert_eq!(pauses, [ms(5), ms(10), ms(20), ms(5)]);
    }

    #[test]
    fn the_pause_stops_growing_at_its_maximum() {
        let mut left = 12;
        let mut pauses = Vec::new();
        let e = keep_serving(
            "test",
            || {
                left -= 1;
                let errno = if left == 0 {
                    libc::EINVAL
                } else {
                    libc::ENFILE
                };
                Err(os(errno))
            },
            |d| pauses.push(d),
        );
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(pauses.len(), 11);
        assert_eq!(pauses[7], Duration::from_millis(640));
        assert!(pauses[8..].iter().all(|d| *d == MAX_PAUSE), "{pauses:?}");
    }

    /// Released by the test below: until then, its relay's answers wait.
    static RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// A relay that echoes the query once [`RELEASE`] is set.
    fn held_echo(query: &[u8]) -> io::Result<Vec<u8>> {
        while !RELEASE.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(query.to_vec())
    }

    /// On a real UDP socket: with `max` queries waiting on slow answers, one more is taken off
    /// the socket and dropped (no thread, no answer), not queued behind them or given a thread;
    /// the waiting ones are answered; their ends give their places back, and a query after that
    /// is answered again.
    #[test]
    fn queries_beyond_the_bound_are_dropped_until_one_is_answered() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let queries = InFlight::new("test dns relay", 2);
        let mut buf = vec![0u8; MAX_MESSAGE];
        for q in ["q1", "q2", "q3"] {
            client.send(q.as_bytes()).unwrap();
            take_query(&server, &mut buf, &queries, held_echo).unwrap();
        }
        assert_eq!(queries.now.load(Ordering::SeqCst), 2, "two in flight");
        assert_eq!(queries.dropped.load(Ordering::SeqCst), 1, "q3 dropped");
        RELEASE.store(true, Ordering::SeqCst);
        let mut answers = Vec::new();
        let mut answer = [0u8; 16];
        while let Ok(n) = client.recv(&mut answer) {
            answers.push(String::from_utf8_lossy(&answer[..n]).into_owned());
        }
        answers.sort();
        assert_eq!(answers, ["q1", "q2"], "the two in flight answered, q3 not");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while queries.now.load(Ordering::SeqCst) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "places not given back"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        client.send(b"q4").unwrap();
        take_query(&server, &mut buf, &queries, held_echo).unwrap();
        let n = client.recv(&mut answer).unwrap();
        assert_eq!(&answer[..n], b"q4");
        assert_eq!(queries.dropped.load(Ordering::SeqCst), 0, "serving again");
    }

    /// A query whose relay panics gives its place back too (the slot goes with its thread).
    #[test]
    fn a_panicking_query_gives_its_place_back() {
        fn panics(_: &[u8]) -> io::Result<Vec<u8>> {
            panic!("test relay panics")
        }
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"q", server.local_addr().unwrap()).unwrap();
        let queries = InFlight::new("test dns relay", 1);
        take_query(&server, &mut [0u8; 64], &queries, panics).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while queries.now.load(Ordering::SeqCst) > 0 {
            assert!(std::time::Instant::now() < deadline, "place not given back");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The TCP relay's real loop on a real socket: accept(2) fails with EMFILE (the process is
    /// out of fds; before, this ended the relay for good), the loop waits, and once fds are
    /// free again it takes the connection that waited; a listener shut down ends it. In a
    /// process of its own, whose fd limit it lowers.
    #[test]
    fn a_relay_out_of_fds_serves_again_once_they_are_free() {
        const CHILD: &str = "RC_AGENT_DNS_EMFILE_TEST";
        if std::env::var_os(CHILD).is_some() {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let stop = listener.try_clone().unwrap();
            let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
            // The lowest free fd: with the limit there, no new fd can be had.
            let lowest = std::fs::File::open("/dev/null").unwrap().as_raw_fd();
            setrlimit(Resource::RLIMIT_NOFILE, lowest as u64, hard).unwrap();
            let mut served = 0;
            let mut pauses = Vec::new();
            let e = keep_serving(
                "test tcp relay",
                || {
                    let r = take_connection(&listener, &InFlight::new("test", 1));
                    if r.is_ok() {
                        served += 1;
                        shutdown(stop.as_raw_fd(), Shutdown::Both).unwrap();
                    }
                    r
                },
                |d| {
                    pauses.push(d);
                    if pauses.len() == 3 {
                        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
                    }
                },
            );
            println!(
                "ended by {:?} after {served} served, pauses {pauses:?}",
                e.raw_os_error()
            );
            return;
        }
        let name = "dns::tests::a_relay_out_of_fds_serves_again_once_they_are_free";
        let o = rootcell_test_support::rerun_test_alone(name, CHILD, "1");
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{out}\n{err}");
        assert!(
            out.contains(&format!(
                "ended by Some({}) after 1 served, pauses [5ms, 10ms, 20ms]",
                libc::EINVAL
            )),
            "{out}\n{err}"
        );
        assert!(err.contains("test tcp relay: Too many open files"), "{err}");
        assert!(
            err.contains("serving again after 3 failed attempts"),
            "{err}"
        );
    }
}
