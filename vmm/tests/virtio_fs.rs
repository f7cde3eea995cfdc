//! The virtio-fs device driven the way the guest's driver drives it: virtio-mmio registers, FUSE
//! requests in descriptor chains in guest memory, queue eventfd notifications, the device's
//! interrupt. The share is a real temporary directory. No KVM needed.

mod common;

use std::time::Duration;

use common::virtq::{Buf, MmioDriver, EVENT_IDX};
use rootcell_fs::FsConfig;
use rootcell_vmm::devices::virtio::fs::VirtioFs;

const REQUEST_QUEUE: usize = 1;
const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_MKDIR: u32 = 9;
const FUSE_INIT: u32 = 26;
const ROOT: u64 = 1;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
const T: Duration = Duration::from_secs(10);
const CONTENT: &[u8] = b"read through virtio-fs on the built-in VMM\n";

/// A FUSE client on top of the virtio-mmio driver (structures encoded by hand from the FUSE
/// ABI, 7.31).
struct Client {
    drv: MmioDriver,
    unique: u64,
}

impl Client {
    fn new(dir: &std::path::Path, read_only: bool, event_idx: bool) -> Self {
        let dev = VirtioFs::new(
            &FsConfig {
                shared_dir: dir.to_owned(),
                read_only,
            },
            "rootcell",
        )
        .unwrap();
        let mut drv = MmioDriver::new(Box::new(dev));
        drv.probe(26, if event_idx { EVENT_IDX } else { 0 }, 2);
        let cfg = drv.config(40);
        assert_eq!(&cfg[..9], b"rootcell\0", "tag in config space");
        assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
        Client { drv, unique: 0 }
    }

    /// Sends one request; returns (error, reply body).
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8], reply: u32) -> (i32, Vec<u8>) {
        self.unique += 1;
        let mut req = Vec::new();
        req.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&self.unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding: root
        req.extend_from_slice(body);
        let head = self.drv.send(
            REQUEST_QUEUE,
            &[Buf::Readable(req), Buf::Writable(OUT_HEADER as u32 + reply)],
        );
        let used = self.drv.wait_used(REQUEST_QUEUE, T).expect("FUSE reply");
        assert_eq!(used.head, head);
        assert!(self.drv.interrupted(T), "the device interrupted the guest");
        let out = used.data;
        assert!(out.len() >= OUT_HEADER, "reply {out:?}");
        let len = u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize;
        let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(out[8..16].try_into().unwrap());
        assert_eq!((len, unique), (out.len(), self.unique));
        (error, out[OUT_HEADER..].to_vec())
    }

    fn init(&mut self) -> u32 {
        let mut body = Vec::new();
        for v in [7u32, 31, 0x20000, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let (err, out) = self.call(FUSE_INIT, 0, &body, 64);
        assert_eq!(err, 0);
        u32::from_le_bytes(out[0..4].try_into().unwrap())
    }

    /// LOOKUP: (nodeid, size).
    fn lookup(&mut self, parent: u64, name: &str) -> Result<(u64, u64), i32> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (err, out) = self.call(FUSE_LOOKUP, parent, &body, 128);
        if err != 0 {
            return Err(-err);
        }
        let nodeid = u64::from_le_bytes(out[0..8].try_into().unwrap());
        // entry_out: nodeid, generation, entry_valid, attr_valid, 2 x nsec, then attr (ino, size).
        let size = u64::from_le_bytes(out[48..56].try_into().unwrap());
        Ok((nodeid, size))
    }

    fn open(&mut self, nodeid: u64) -> u64 {
        let mut body = (libc::O_RDONLY as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        let (err, out) = self.call(FUSE_OPEN, nodeid, &body, 16);
        assert_eq!(err, 0, "OPEN");
        u64::from_le_bytes(out[0..8].try_into().unwrap())
    }

    fn read(&mut self, nodeid: u64, fh: u64, size: u32) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&fh.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes()); // offset
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&[0u8; 20]); // read_flags, lock_owner, flags, padding
        let (err, out) = self.call(FUSE_READ, nodeid, &body, size);
        assert_eq!(err, 0, "READ");
        out
    }
}

fn share() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), CONTENT).unwrap();
    dir
}

fn init_lookup_read(event_idx: bool) {
    let dir = share();
    let mut c = Client::new(dir.path(), false, event_idx);
    assert_eq!(c.init(), 7, "FUSE major version");
    let (node, size) = c.lookup(ROOT, "hello.txt").unwrap();
    assert_eq!(size, CONTENT.len() as u64);
    let fh = c.open(node);
    assert_eq!(c.read(node, fh, 4096), CONTENT);
    assert_eq!(c.lookup(ROOT, "missing"), Err(libc::ENOENT));
}

#[test]
fn fuse_init_lookup_read_through_the_queues() {
    init_lookup_read(false);
}

#[test]
fn fuse_init_lookup_read_with_event_idx() {
    init_lookup_read(true);
}

#[test]
fn read_only_share_refuses_writes_with_erofs() {
    let dir = share();
    let mut c = Client::new(dir.path(), true, false);
    c.init();
    let mut body = 0o755u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0u32.to_le_bytes()); // umask
    body.extend_from_slice(b"newdir\0");
    let (err, _) = c.call(FUSE_MKDIR, ROOT, &body, 128);
    assert_eq!(-err, libc::EROFS);
    assert!(!dir.path().join("newdir").exists());
}

#[test]
fn reset_and_probe_again_serves_a_fresh_session() {
    let dir = share();
    let mut c = Client::new(dir.path(), false, false);
    c.init();
    c.lookup(ROOT, "hello.txt").unwrap();
    c.drv.reset();
    assert_eq!(c.drv.read(0x70), 0);
    c.drv.probe(26, 0, 2);
    c.unique = 0;
    c.init();
    let (node, _) = c.lookup(ROOT, "hello.txt").unwrap();
    let fh = c.open(node);
    assert_eq!(c.read(node, fh, 4096), CONTENT);
}

#[test]
fn bad_share_and_tag_are_clear_errors() {
    let dir = share();
    let missing = VirtioFs::new(
        &FsConfig {
            shared_dir: dir.path().join("nope"),
            read_only: false,
        },
        "rootcell",
    )
    .unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
    let long = VirtioFs::new(
        &FsConfig {
            shared_dir: dir.path().to_owned(),
            read_only: false,
        },
        &"x".repeat(37),
    )
    .unwrap_err();
    assert!(long.to_string().contains("1..=36"), "{long}");
}
