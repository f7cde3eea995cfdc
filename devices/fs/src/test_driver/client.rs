//! A FUSE client speaking to an [`FsDevice`] through the [`Driver`]'s virtqueue, the way the
//! guest's virtio-fs driver does: the request header and arguments in device-readable buffers,
//! the reply header and payload in device-writable ones.

use std::mem::size_of;
use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::{EntryOut, InHeader, InitIn, OutHeader};
use vm_memory::ByteValued;

use super::{Buf, Driver, SLOT_SIZE};
use crate::{Error, FsConfig, FsDevice};

/// The device's answer to one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A FUSE reply: the errno (0 for success) and the payload after the out header.
    Fuse(i32, Vec<u8>),
    /// The chain came back with nothing written (FORGET, or a request the device dropped).
    Nothing,
}

/// A FUSE client for one device over one queue.
pub struct Client {
    /// The device under test.
    pub device: FsDevice,
    /// The driver side of its request queue.
    pub driver: Driver,
    unique: u64,
}

/// FUSE_INIT's opcode.
const INIT: u32 = 26;
/// FUSE_LOOKUP's opcode.
const LOOKUP: u32 = 1;
/// Reply payload room offered with every request (a READ or READDIR of up to this much fits).
pub const REPLY_ROOM: u32 = 32 * 1024;

impl Client {
    /// Opens `dir` as a share and negotiates FUSE 7.31 with it.
    pub fn new(dir: &Path, read_only: bool) -> Result<Self, Error> {
        let config = FsConfig {
            shared_dir: dir.to_owned(),
            read_only,
        };
        Self::with_device(FsDevice::new(&config)?)
    }

    /// Negotiates FUSE 7.31 with a device already opened.
    pub fn with_device(device: FsDevice) -> Result<Self, Error> {
        let mut client = Client {
            device,
            driver: Driver::new(),
            unique: 0,
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x20000,
            flags: 0,
        };
        match client.call(INIT, 0, init.as_slice()) {
            Reply::Fuse(0, _) => Ok(client),
            other => Err(Error::DescriptorChain(format!("FUSE_INIT: {other:?}"))),
        }
    }

    /// Sends `opcode` on `nodeid` with `args` as guest root.
    pub fn call(&mut self, opcode: u32, nodeid: u64, args: &[u8]) -> Reply {
        self.call_as(0, 0, opcode, nodeid, args)
    }

    /// Sends `opcode` on `nodeid` with `args` on behalf of guest user `uid`:`gid`.
    pub fn call_as(&mut self, uid: u32, gid: u32, opcode: u32, nodeid: u64, args: &[u8]) -> Reply {
        self.unique += 1;
        let header = InHeader {
            len: (size_of::<InHeader>() + args.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid,
            gid,
            pid: 1,
            padding: 0,
        };
        let mut request = header.as_slice().to_vec();
        request.extend_from_slice(args);
        self.send_raw(&request, &[size_of::<InHeader>()], REPLY_ROOM)
    }

    /// Looks `name` (raw bytes, a NUL is appended) up in `parent`.
    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<EntryOut, i32> {
        let mut arg = name.to_vec();
        arg.push(0);
        match self.call(LOOKUP, parent, &arg) {
            Reply::Fuse(0, payload) if payload.len() >= size_of::<EntryOut>() => {
                Ok(*EntryOut::from_slice(&payload[..size_of::<EntryOut>()]).unwrap())
            }
            Reply::Fuse(0, _) | Reply::Nothing => Err(libc::EIO),
            Reply::Fuse(errno, _) => Err(errno),
        }
    }

    /// Sends `request` (header included, taken as is) split into readable descriptors at
    /// `splits` (offsets, ascending; at most two), with an out-header buffer and `reply_room`
    /// bytes of payload space, and returns what the device wrote.
    ///
    /// Whatever the bytes are, the device must hand the chain back: a missing used entry, a
    /// used length beyond the writable space or a reply for another request panics.
    pub fn send_raw(&mut self, request: &[u8], splits: &[usize], reply_room: u32) -> Reply {
        let max_request = (SLOT_SIZE as usize) - 3 * 64 - size_of::<OutHeader>() - 64;
        let request = &request[..request.len().min(max_request)];
        let reply_room = reply_room.min((max_request - request.len()) as u32);
        let mut bufs = Vec::new();
        let mut start = 0;
        for &at in splits.iter().take(2) {
            if at > start && at < request.len() {
                bufs.push(Buf::Readable(&request[start..at]));
                start = at;
            }
        }
        bufs.push(Buf::Readable(&request[start..]));
        bufs.push(Buf::Writable(size_of::<OutHeader>() as u32));
        if bufs.len() < 4 && reply_room > 0 {
            bufs.push(Buf::Writable(reply_room));
        }
        let (head, writable) = self.driver.offer(&bufs);
        self.device
            .process_queue(&self.driver.mem, &mut self.driver.queue)
            .expect("the queue stays usable");
        let (used_head, len) = self.driver.take_used().expect("the chain comes back");
        assert_eq!(used_head, head, "the device returned another chain");
        assert!(
            self.driver.take_used().is_none(),
            "one chain in, one chain out"
        );
        let room: u32 = writable.iter().map(|w| w.1).sum();
        assert!(
            len <= room,
            "used length {len} beyond the {room} writable bytes"
        );
        if len == 0 {
            return Reply::Nothing;
        }
        let reply = self.driver.read_back(&writable, len);
        assert!(
            reply.len() >= size_of::<OutHeader>(),
            "a reply shorter than its header"
        );
        let out = *OutHeader::from_slice(&reply[..size_of::<OutHeader>()]).unwrap();
        assert_eq!(out.len, len, "out header length and used length differ");
        if request.len() >= size_of::<InHeader>() {
            let sent = InHeader::from_slice(&request[..size_of::<InHeader>()]).unwrap();
            assert_eq!(out.unique, sent.unique, "a reply to another request");
        }
        Reply::Fuse(-out.error, reply[size_of::<OutHeader>()..].to_vec())
    }
}
