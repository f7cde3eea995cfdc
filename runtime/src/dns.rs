//! The host end of the guest's loopback DNS relay: Docker's embedded DNS listens on 127.0.0.11
//! inside the container's network namespace on the host, which the VM cannot reach. The agent
//! relays queries to it over vsock; the sandbox (living in that namespace) forwards each to the
//! resolver over UDP and sends the answer back.

use anyhow::{Context, Result};
use oci_spec::runtime::Spec;
use rootcell_protocol::dns::{read_message, write_message};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// How long the resolver may take to answer one query.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Listens on `socket` (the hybrid vsock path for the relay port) and forwards every query to
/// `resolver`:53 on a thread of its own.
pub fn serve(socket: &Path, resolver: IpAddr) -> Result<()> {
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    std::thread::Builder::new()
        .name("dns-relay".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = std::thread::Builder::new()
                    .name("dns-query".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, SocketAddr::new(resolver, 53)) {
                            tracing::debug!("dns relay: {e:#}");
                        }
                    });
            }
        })
        .context("cannot start the DNS relay thread")?;
    Ok(())
}

/// Answers the queries of one guest connection.
fn answer(mut conn: UnixStream, resolver: SocketAddr) -> Result<()> {
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
        let relay = std::thread::spawn(move || answer(host, addr));
        for q in [&b"q1"[..], b"q2"] {
            write_message(&mut guest, q).unwrap();
            assert_eq!(read_message(&mut guest).unwrap(), [b"answer:", q].concat());
        }
        drop(guest);
        relay.join().unwrap().unwrap();
    }
}
