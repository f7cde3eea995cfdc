//! Framing of relayed DNS messages (see [`crate::DNS_RELAY_PORT`]): each message is prefixed
//! with its length as a big-endian u16, as DNS over TCP does.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Writes `msg` with its big-endian u16 length in front.
pub fn write_message(w: &mut impl Write, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 64 KiB"))?;
    let mut frame = Vec::with_capacity(2 + msg.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(msg);
    w.write_all(&frame)
}

/// Reads one length-prefixed message.
pub fn read_message(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len)?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    r.read_exact(&mut msg)?;
    Ok(msg)
}

/// A connected stream that [`splice`] can copy both ways.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    /// A second handle on the same connection.
    fn duplicate(&self) -> io::Result<Self>;
    /// Ends the sending direction (the peer reads EOF).
    fn shutdown_write(&self);
    /// Bounds every read.
    fn read_timeout(&self, t: Duration) -> io::Result<()>;
}

macro_rules! duplex {
    ($t:ty) => {
        impl Duplex for $t {
            fn duplicate(&self) -> io::Result<Self> {
                self.try_clone()
            }
            fn shutdown_write(&self) {
                let _ = self.shutdown(Shutdown::Write);
            }
            fn read_timeout(&self, t: Duration) -> io::Result<()> {
                self.set_read_timeout(Some(t))
            }
        }
    };
}
duplex!(TcpStream);
duplex!(UnixStream);

/// Copies bytes both ways between `a` and `b` until both directions have ended (EOF, an error,
/// or `idle` without data), passing each EOF on; returns when both copies are done.
pub fn splice(a: impl Duplex, b: impl Duplex, idle: Duration) -> io::Result<()> {
    a.read_timeout(idle)?;
    b.read_timeout(idle)?;
    let (mut a_in, mut b_out) = (a.duplicate()?, b.duplicate()?);
    let back = std::thread::Builder::new()
        .name("splice".into())
        .spawn(move || {
            let _ = io::copy(&mut a_in, &mut b_out);
            b_out.shutdown_write();
        })?;
    let (mut b_in, mut a_out) = (b, a);
    let _ = io::copy(&mut b_in, &mut a_out);
    a_out.shutdown_write();
    let _ = back.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_a_length_prefix() {
        let mut wire = Vec::new();
        write_message(&mut wire, b"query").unwrap();
        assert_eq!(wire, b"\x00\x05query");
        assert_eq!(read_message(&mut &wire[..]).unwrap(), b"query");
        assert!(read_message(&mut &b"\x00\x09short"[..]).is_err());
    }

    #[test]
    fn splice_copies_both_ways_and_passes_eof_on() {
        let (mut client, a) = UnixStream::pair().unwrap();
        let (b, mut server) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || splice(a, b, Duration::from_secs(5)));
        client.write_all(b"query").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"query");
        server.write_all(b"answer").unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"answer");
        t.join().unwrap().unwrap();
    }
}
