//! The virtio-vsock packet header and pure parsing/serialising functions.
//!
//! Parsing works on a plain byte slice (the bytes the guest placed in a TX descriptor chain) so
//! it can be unit tested and fuzzed without guest memory.

use virtio_vsock::packet::PKT_HEADER_SIZE;

/// Size of the `virtio_vsock_hdr` structure on the wire.
pub const HEADER_SIZE: usize = PKT_HEADER_SIZE;
/// Largest payload a single packet may carry (the Linux driver's limit, 64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The well-known CID of the host.
pub const HOST_CID: u64 = 2;

/// `type` value of stream sockets, the only type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// Operation codes of `virtio_vsock_hdr.op`.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset / refused.
    pub const RST: u16 = 3;
    /// One side stops sending and/or receiving.
    pub const SHUTDOWN: u16 = 4;
    /// Stream data.
    pub const RW: u16 = 5;
    /// Unsolicited credit announcement.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Request for a credit announcement.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// The peer will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// The peer will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded `virtio_vsock_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation code.
    pub op: u16,
    /// Operation flags (shutdown bits).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

/// Why a byte slice is not a valid packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer bytes than a header.
    #[error("packet shorter than its {HEADER_SIZE}-byte header ({0} bytes)")]
    ShortHeader(usize),
    /// `len` exceeds the payload limit.
    #[error("payload length {0} exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLong(u32),
    /// `len` exceeds the bytes actually present.
    #[error("payload length {len} but only {available} bytes follow the header")]
    Truncated {
        /// Declared payload length.
        len: u32,
        /// Bytes present after the header.
        available: usize,
    },
}

/// A parsed packet borrowing its payload from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The header.
    pub hdr: Header,
    /// Exactly `hdr.len` payload bytes.
    pub data: &'a [u8],
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

impl Header {
    /// Decodes a header from the first [`HEADER_SIZE`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, PacketError> {
        if bytes.len() < HEADER_SIZE {
            return Err(PacketError::ShortHeader(bytes.len()));
        }
        Ok(Header {
            src_cid: le_u64(bytes, 0),
            dst_cid: le_u64(bytes, 8),
            src_port: le_u32(bytes, 16),
            dst_port: le_u32(bytes, 20),
            len: le_u32(bytes, 24),
            type_: le_u16(bytes, 28),
            op: le_u16(bytes, 30),
            flags: le_u32(bytes, 32),
            buf_alloc: le_u32(bytes, 36),
            fwd_cnt: le_u32(bytes, 40),
        })
    }

    /// Encodes the header into its little-endian wire form.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Parses a guest-to-host packet: a header followed by at least `len` payload bytes.
///
/// Trailing bytes beyond `len` are ignored (a driver may post a larger buffer than it fills);
/// only RW packets carry a payload, so for other ops the returned `data` is empty.
pub fn parse(bytes: &[u8]) -> Result<Packet<'_>, PacketError> {
    let hdr = Header::decode(bytes)?;
    if hdr.op != op::RW {
        return Ok(Packet { hdr, data: &[] });
    }
    if hdr.len as usize > MAX_PAYLOAD {
        return Err(PacketError::PayloadTooLong(hdr.len));
    }
    let available = bytes.len() - HEADER_SIZE;
    if hdr.len as usize > available {
        return Err(PacketError::Truncated {
            len: hdr.len,
            available,
        });
    }
    Ok(Packet {
        hdr,
        data: &bytes[HEADER_SIZE..HEADER_SIZE + hdr.len as usize],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 0x10000,
            fwd_cnt: 0xdead_beef,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn layout_matches_virtio_vsock_crate() {
        // Cross-check our encoding against rust-vmm's accessors for the same bytes.
        let mut raw = [0u8; HEADER_SIZE];
        // SAFETY: `raw` outlives the packet, which is only used within this scope.
        let mut pkt = unsafe { virtio_vsock::packet::VsockPacket::new(&mut raw, None) }.unwrap();
        pkt.set_header_from_raw(&sample().encode()).unwrap();
        assert_eq!(pkt.src_cid(), 3);
        assert_eq!(pkt.dst_cid(), 2);
        assert_eq!(pkt.src_port(), 0x1234_5678);
        assert_eq!(pkt.dst_port(), 1024);
        assert_eq!(pkt.len(), 5);
        assert_eq!(pkt.type_(), TYPE_STREAM);
        assert_eq!(pkt.op(), op::RW);
        assert_eq!(pkt.buf_alloc(), 0x10000);
        assert_eq!(pkt.fwd_cnt(), 0xdead_beef);
        // And the other way round: the crate's setters produce our decoding.
        let mut raw2 = [0u8; HEADER_SIZE];
        // SAFETY: as above.
        let mut pkt2 = unsafe { virtio_vsock::packet::VsockPacket::new(&mut raw2, None) }.unwrap();
        pkt2.set_src_cid(3)
            .set_dst_cid(2)
            .set_src_port(0x1234_5678)
            .set_dst_port(1024)
            .set_len(5)
            .set_type(TYPE_STREAM)
            .set_op(op::RW)
            .set_buf_alloc(0x10000)
            .set_fwd_cnt(0xdead_beef);
        assert_eq!(Header::decode(&raw2).unwrap(), sample());
    }

    #[test]
    fn parse_rw_takes_exactly_len_bytes() {
        let mut bytes = sample().encode().to_vec();
        bytes.extend_from_slice(b"helloEXTRA");
        let p = parse(&bytes).unwrap();
        assert_eq!(p.data, b"hello");
    }

    #[test]
    fn parse_rejects_short_header() {
        assert_eq!(parse(&[0u8; 10]), Err(PacketError::ShortHeader(10)));
        assert_eq!(parse(&[]), Err(PacketError::ShortHeader(0)));
    }

    #[test]
    fn parse_rejects_bad_lengths() {
        let mut h = sample();
        h.len = 100;
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(&[0; 10]);
        assert_eq!(
            parse(&bytes),
            Err(PacketError::Truncated {
                len: 100,
                available: 10
            })
        );
        h.len = u32::MAX;
        assert_eq!(
            parse(&h.encode()),
            Err(PacketError::PayloadTooLong(u32::MAX))
        );
    }

    #[test]
    fn non_rw_ops_ignore_len() {
        let mut h = sample();
        h.op = op::CREDIT_REQUEST;
        h.len = 7;
        let bytes = h.encode();
        let p = parse(&bytes).unwrap();
        assert!(p.data.is_empty());
    }
}
