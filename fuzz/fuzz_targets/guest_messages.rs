//! Fuzzes everything the host (and the agent) parses off a vsock connection the other side
//! controls, with the crate functions the runtime calls: agent frames (`recv::<AgentMessage>`,
//! the sandbox's control reader), stream hellos, host messages (what the agent reads), and the
//! DNS relay's length-prefixed messages. The first byte picks the parser and how the bytes
//! arrive (whole, or in reads of 1..=7 bytes, as a socket may deliver them); the rest is the
//! stream. Every parser must return (a message, a clean end or an error), never panic, and a
//! decoded message must survive a re-encode and decode unchanged.
#![no_main]

use std::io::{self, Read};

use libfuzzer_sys::fuzz_target;
use rootcell_protocol::{dns, recv, send, AgentMessage, HostMessage, StreamHello};

/// A reader that hands out at most `chunk` bytes per read (0: everything at once).
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = buf.len().min(self.data.len());
        if self.chunk > 0 {
            n = n.min(self.chunk);
        }
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Reads messages of type `T` until the stream ends or fails, checking each round-trips.
fn frames<T>(r: &mut Chunked<'_>)
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    for _ in 0..64 {
        match recv::<_, T>(r) {
            Ok(Some(msg)) => {
                let mut wire = Vec::new();
                send(&mut wire, &msg).expect("a decoded message encodes");
                let again: T = recv(&mut &wire[..]).expect("re-decode").expect("one frame");
                assert_eq!(again, msg);
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut r = Chunked {
        data: rest,
        chunk: usize::from(mode >> 4) % 8,
    };
    match mode & 0xf {
        0..=5 => frames::<AgentMessage>(&mut r),
        6 | 7 => frames::<StreamHello>(&mut r),
        8 | 9 => frames::<HostMessage>(&mut r),
        10 | 11 => {
            // The host's DNS relay (runtime/src/dns.rs) and the agent's read queries this way.
            for _ in 0..64 {
                match dns::read_message(&mut r) {
                    Ok(msg) => {
                        let mut wire = Vec::new();
                        dns::write_message(&mut wire, &msg).expect("fits u16");
                        assert_eq!(dns::read_message(&mut &wire[..]).unwrap(), msg);
                    }
                    Err(_) => break,
                }
            }
        }
        _ => {
            // A JSON body without the length prefix, as the frame reader hands it to serde.
            let _ = serde_json::from_slice::<AgentMessage>(rest);
            let _ = serde_json::from_slice::<StreamHello>(rest);
        }
    }
});
