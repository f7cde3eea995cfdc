//! Fuzzes the pure vsock packet parser: it must never panic, and whatever it accepts must
//! re-encode to the same header bytes and borrow exactly `len` payload bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rootcell_vsock::packet::{self, op, HEADER_SIZE, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = packet::parse(data) {
        assert_eq!(&p.hdr.encode()[..], &data[..HEADER_SIZE]);
        if p.hdr.op == op::RW {
            assert_eq!(p.data.len(), p.hdr.len as usize);
            assert!(p.data.len() <= MAX_PAYLOAD);
        } else {
            assert!(p.data.is_empty());
        }
    }
});
