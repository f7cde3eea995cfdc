//! Length-prefixed JSON framing: a 4-byte big-endian length, then that many bytes of JSON.

use serde::{de::DeserializeOwned, Serialize};
use std::io::{self, Read, Write};

/// Largest frame accepted; a peer announcing more is treated as broken, not trusted.
pub const MAX_FRAME_LEN: usize = 16 << 20;

/// Errors reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The underlying stream failed.
    #[error("i/o error on protocol stream: {0}")]
    Io(#[from] io::Error),
    /// The peer announced a frame larger than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    /// The stream ended inside a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The frame is not the JSON we expect.
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Serialises `msg` and writes it as one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame and decodes it; `Ok(None)` if the stream ends cleanly before a frame starts.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(serde_json::from_slice(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_eof_is_none() {
        let r: Option<u32> = read_frame(&mut io::empty()).unwrap();
        assert!(r.is_none());
    }

    #[test]
    fn truncated_header_and_body_are_errors() {
        let e = read_frame::<_, u32>(&mut &[0u8, 0][..]).unwrap_err();
        assert!(matches!(e, FrameError::Truncated));
        let e = read_frame::<_, u32>(&mut &[0u8, 0, 0, 5, b'1'][..]).unwrap_err();
        assert!(matches!(e, FrameError::Truncated));
    }

    #[test]
    fn oversized_frame_is_rejected_before_allocating() {
        let e = read_frame::<_, u32>(&mut &[0xffu8, 0xff, 0xff, 0xff][..]).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge(_)));
    }

    #[test]
    fn two_frames_in_sequence() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &1u32).unwrap();
        write_frame(&mut buf, &"two").unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read_frame::<_, u32>(&mut r).unwrap(), Some(1));
        assert_eq!(
            read_frame::<_, String>(&mut r).unwrap().as_deref(),
            Some("two")
        );
        assert_eq!(read_frame::<_, String>(&mut r).unwrap(), None);
    }
}
