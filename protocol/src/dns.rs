//! Framing of relayed DNS messages (see [`crate::DNS_RELAY_PORT`]): each message is prefixed
//! with its length as a big-endian u16, as DNS over TCP does.

use std::io::{self, Read, Write};

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
}
