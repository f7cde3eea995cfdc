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
use std::time::Duration;

/// The host's vsock CID.
const HOST_CID: u32 = 2;
/// How long one query may take end to end (resolvers retry on their own).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest DNS message over UDP with EDNS.
const MAX_MESSAGE: usize = 4096;

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
        let e = keep_serving(what, || take_query(&sock, &mut buf), std::thread::sleep);
        panic!("{what} on {addr}:53: {e}")
    })?;
    vital("dns-relay-tcp", LOST, move || {
        let what = "dns tcp relay";
        let e = keep_serving(what, || take_connection(&listener), std::thread::sleep);
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

/// Takes one TCP connection and passes it through to the host's TCP relay on a thread of its
/// own. A connection taken but not handed on (no thread) is closed: the resolver retries.
fn take_connection(listener: &TcpListener) -> io::Result<()> {
    let (conn, _) = listener.accept()?;
    std::thread::Builder::new()
        .name("dns-tcp".into())
        .spawn(move || {
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

/// Takes one UDP query and answers it on a thread of its own: a slow answer must not hold up
/// the next query. A query taken but not handed on is dropped: the resolver retries.
fn take_query(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<()> {
    let (n, client) = sock.recv_from(buf)?;
    let query = buf[..n].to_vec();
    let reply_sock = sock.try_clone()?;
    std::thread::Builder::new()
        .name("dns-query".into())
        .spawn(move || match relay(&query) {
            Ok(answer) => {
                let _ = reply_sock.send_to(&answer, client);
            }
            Err(e) => alog!("dns relay: query from {client} failed: {e}"),
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
                    let r = take_connection(&listener);
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
