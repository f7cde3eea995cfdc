//! Fuzzes the muxer's guest-facing state machine: the input is a sequence of guest packets
//! (each a header plus its declared payload); after each one the RX side is drained. Host
//! listeners exist for guest ports 1..=4 so connections really open, carry data and close.
//! Nothing may panic and every packet the device produces must be well formed.
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use rootcell_vsock::packet::{self, Header, HEADER_SIZE, MAX_PAYLOAD};
use rootcell_vsock::VsockMuxer;

struct Env {
    path: PathBuf,
    listeners: Vec<UnixListener>,
}

static ENV: Mutex<Option<Env>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut env = ENV.lock().unwrap();
    let env = env.get_or_insert_with(|| {
        let dir = std::env::temp_dir().join(format!("rootcell-vsock-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let listeners = (1..=4)
            .map(|p| {
                let l = UnixListener::bind(format!("{}_{p}", path.display())).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        Env { path, listeners }
    });
    let mut muxer = VsockMuxer::new(3, &env.path).expect("muxer");
    let mut rest = data;
    let mut rx = vec![0u8; HEADER_SIZE + 4096];
    while rest.len() >= HEADER_SIZE {
        let len = Header::decode(rest).map(|h| h.len as usize).unwrap_or(0);
        let take = (HEADER_SIZE + len.min(MAX_PAYLOAD)).min(rest.len());
        let _ = muxer.handle_guest_packet(&rest[..take]);
        rest = &rest[take..];
        muxer.process_host_events();
        let mut budget = 64;
        while muxer.has_pending_rx() && budget > 0 {
            budget -= 1;
            if let Some(n) = muxer.fill_rx(&mut rx) {
                let p = packet::parse(&rx[..n]).expect("device produced a malformed packet");
                assert_eq!((p.hdr.src_cid, p.hdr.dst_cid), (2, 3));
            }
        }
    }
    drop(muxer);
    // Accept and drop what this input connected, so backlogs never fill (connect would block).
    for l in &env.listeners {
        while l.accept().is_ok() {}
    }
});
