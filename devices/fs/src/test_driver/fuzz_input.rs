//! The FUSE request fuzz target's input format and oracle, here so that the fuzz target
//! (`fuzz/fuzz_targets/fs_request.rs`) and the regression tests replay inputs the same way.
//!
//! An input is one flags byte, then records `[len: u16 LE][shape: u8][len request bytes]`,
//! each sent to a fresh device over one share as one descriptor chain (header and arguments
//! as the guest kernel would send them, or anything else):
//!
//! - flags bit 0: the share is read-only; bit 1: the header's `len` field is set to the
//!   record's length (otherwise the bytes are taken as they are).
//! - shape bits 0-1: reply room (0, 15, 4096 or 32768 bytes after the out header); bit 2:
//!   the header gets a descriptor of its own; bit 3: the arguments are split once more, at
//!   `8 * (shape >> 4)` bytes in.
//!
//! Oracle, after every input: the device handed every chain back with a well-formed reply or
//! nothing (checked by [`Client::send_raw`]), nothing outside the share was read or written
//! ([`Arena::check`]), and once the device is dropped the process has the same number of fds
//! as before.

use super::arena::{open_fds, Arena};
use super::Client;

/// Most records one input is allowed to send.
pub const MAX_RECORDS: usize = 64;

/// One decoded record.
struct Record<'a> {
    bytes: &'a [u8],
    shape: u8,
}

fn records(mut data: &[u8]) -> Vec<Record<'_>> {
    let mut out = Vec::new();
    while data.len() >= 3 && out.len() < MAX_RECORDS {
        let len = u16::from_le_bytes([data[0], data[1]]) as usize;
        let shape = data[2];
        data = &data[3..];
        let take = len.min(data.len());
        out.push(Record {
            bytes: &data[..take],
            shape,
        });
        data = &data[take..];
    }
    out
}

/// Runs one input against a fresh device on `arena`'s share, panicking with what went wrong
/// if the oracle fails.
pub fn run(arena: &Arena, data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    arena.reset().expect("reset the share");
    let fds_before = open_fds();
    {
        let mut client = Client::new(arena.share(), flags & 1 != 0).expect("open the share");
        for record in records(rest) {
            let mut request = record.bytes.to_vec();
            if flags & 2 != 0 && request.len() >= 4 {
                let len = request.len() as u32;
                request[..4].copy_from_slice(&len.to_le_bytes());
            }
            let room = [0, 15, 4096, 32768][usize::from(record.shape & 3)];
            let mut splits = Vec::new();
            if record.shape & 4 != 0 {
                splits.push(40);
            }
            if record.shape & 8 != 0 {
                splits.push(40 + 8 * usize::from(record.shape >> 4));
            }
            client.send_raw(&request, &splits, room);
        }
    }
    if let Err(e) = arena.check() {
        panic!("escape: {e}");
    }
    let fds_after = open_fds();
    assert_eq!(
        fds_after,
        fds_before,
        "the dropped device left {} fds open",
        fds_after as isize - fds_before as isize
    );
}

/// Encodes requests in the input format (flags 2: header lengths fixed up, read-write share),
/// each with the header in a descriptor of its own and 32 KiB of reply room: how the seed
/// corpus and the tests write inputs.
pub fn encode(requests: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![2u8];
    for r in requests {
        out.extend_from_slice(&(r.len() as u16).to_le_bytes());
        out.push(4 | 3);
        out.extend_from_slice(r);
    }
    out
}

/// A FUSE request: the 40-byte in header (as root, `unique` 7) and `args`.
pub fn request(opcode: u32, nodeid: u64, args: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(40 + args.len());
    r.extend_from_slice(&((40 + args.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&7u64.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    r.extend_from_slice(args);
    r
}

/// Little-endian concatenation of u64/u32 fields and NUL-terminated names.
fn args(words: &[u64], halves: &[u32], names: &[&str]) -> Vec<u8> {
    let mut a = Vec::new();
    for w in words {
        a.extend_from_slice(&w.to_le_bytes());
    }
    for h in halves {
        a.extend_from_slice(&h.to_le_bytes());
    }
    for n in names {
        a.extend_from_slice(n.as_bytes());
        a.push(0);
    }
    a
}

/// Seed inputs for the fuzz corpus, one per kind of request sequence a guest sends: the
/// nodeids are the ones a fresh share hands out in order (root 1, then 2, 3, ...), file
/// handles start at 1.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let init = request(26, 0, &args(&[], &[7, 31, 0x20000, 0], &[]));
    let lookup = |parent, name: &str| request(1, parent, &args(&[], &[], &[name]));
    let getattr = |n| request(3, n, &[0u8; 16]);
    let open = |n, flags: u32| request(14, n, &args(&[], &[flags, 0], &[]));
    // ReadIn: fh, offset, size, read_flags, lock_owner, flags, padding.
    let read = |n, fh, off, size| {
        let mut a = args(&[fh, off], &[size, 0], &[]);
        a.extend_from_slice(&args(&[0], &[0, 0], &[]));
        request(15, n, &a)
    };
    let mut write_args = args(&[1, 0], &[5, 0], &[]);
    write_args.extend_from_slice(&args(&[0], &[0, 0], &[]));
    write_args.extend_from_slice(b"hello");
    vec![
        (
            "lookup_read",
            encode(&[
                init.clone(),
                lookup(1, "hello.txt"),
                getattr(2),
                open(2, 0),
                read(2, 1, 0, 4096),
                read(2, 1, u64::MAX - 1, 4096),
                request(18, 2, &args(&[1], &[0, 0], &[])),
                request(2, 2, &args(&[1], &[], &[])),
            ]),
        ),
        (
            "dotdot_and_links",
            encode(&[
                init.clone(),
                lookup(1, ".."),
                lookup(1, "abs-link"),
                request(5, 3, &[]),
                lookup(1, "rel-link"),
                lookup(1, "dir"),
                lookup(5, "up-link"),
                lookup(5, ".."),
                lookup(1, "dotdot-link"),
                open(3, 0),
                lookup(1, "../outside"),
            ]),
        ),
        (
            "create_write",
            encode(&[
                init.clone(),
                request(35, 1, &args(&[], &[0o101, 0o100644, 0, 0], &["new.txt"])),
                request(16, 2, &write_args),
                request(9, 1, &args(&[], &[0o755, 0], &["newdir"])),
                request(6, 1, &args(&[], &[], &["sl", "../outside/canary"])),
                request(8, 1, &args(&[], &[0o20644, 0x0103, 0, 0], &["node"])),
                lookup(1, "node"),
                open(5, 2),
            ]),
        ),
        (
            "rename_link_unlink",
            encode(&[
                init.clone(),
                lookup(1, "hello.txt"),
                lookup(1, "dir"),
                request(12, 1, &args(&[3], &[], &["hello.txt", "moved"])),
                request(13, 2, &args(&[1], &[], &["hard"])),
                request(10, 1, &args(&[], &[], &["rel-link"])),
                request(11, 3, &args(&[], &[], &["sub"])),
                request(45, 1, &args(&[3], &[1, 0], &["dir", "dir2"])),
            ]),
        ),
        (
            "readdir_xattr_setattr",
            encode(&[
                init.clone(),
                request(27, 1, &args(&[], &[0, 0], &[])),
                {
                    let mut a = args(&[1, 0], &[4096, 0], &[]);
                    a.extend_from_slice(&args(&[0], &[0, 0], &[]));
                    request(44, 1, &a)
                },
                request(21, 1, &args(&[], &[5, 0], &["user.x", "value"])),
                request(22, 1, &args(&[], &[256, 0], &["user.x"])),
                request(23, 1, &args(&[], &[256, 0], &[])),
                {
                    // SetattrIn: valid, padding, fh, size, lock_owner, atime, mtime, ctime,
                    // atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5.
                    let mut a = args(&[], &[0x8 | 0x1, 0], &[]);
                    a.extend_from_slice(&args(&[0, u64::MAX, 0, 0, 0, 0], &[0; 8], &[]));
                    request(4, 1, &a)
                },
                request(
                    42,
                    0,
                    &args(&[], &[2, 0], &[])
                        .into_iter()
                        .chain(args(&[2, 1, 3, 1], &[], &[]))
                        .collect::<Vec<_>>(),
                ),
            ]),
        ),
        (
            "fallocate_lseek_copy",
            encode(&[
                init,
                lookup(1, "hello.txt"),
                open(2, 2),
                request(43, 2, &args(&[1, 0, 1 << 40], &[0, 0], &[])),
                request(46, 2, &args(&[1, 3], &[3, 0], &[])),
                request(47, 2, &args(&[1, 0, 2, 1, 100, 1 << 30, 0], &[], &[])),
                request(17, 1, &[]),
                request(0, 1, &[]),
                request(0xffff_ffff, 1, &[]),
            ]),
        ),
    ]
}
