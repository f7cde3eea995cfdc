//! The virtio-fs device logic: FUSE requests taken from virtqueue descriptor chains and answered
//! by the passthrough file system. Transport-neutral: the vhost-user front end and an in-process
//! virtio-mmio device both drive it through [`FsDevice::process_queue`].

use std::io::Write;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::QueueOwnedT;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::creds::{makes_a_file, Caller};
use crate::passthrough::open_passthrough;
use crate::readonly::is_write_request;
use crate::{Error, FsConfig};

/// Index of the high-priority queue (FORGET, INTERRUPT); request queues follow it.
pub const HIPRIO_QUEUE: usize = 0;
/// Number of virtqueues the device exposes: the hiprio queue and one request queue.
pub const NUM_QUEUES: usize = 2;

/// Bytes of the request body the read-only filter looks at (OPEN and ACCESS arguments).
const PEEK_BODY: usize = 8;

/// Largest request copied out of guest memory: what fuse-backend-rs' server accepts
/// (`MAX_BUFFER_SIZE`, 1 MiB of data, plus its 4 KiB header allowance). Longer requests are
/// refused by the server anyway (their header's `len` says so).
const MAX_REQUEST: usize = (1 << 20) + 0x1000;
/// Where the copied request starts in the bounce memory (the queue's rings sit below it).
const BOUNCE_DATA: u64 = 0x1000;
/// FUSE_GETXATTR and FUSE_LISTXATTR, whose `size` argument the passthrough allocates as is.
const GETXATTR: u32 = 22;
const LISTXATTR: u32 = 23;
/// Largest xattr value or list the kernel hands out (XATTR_SIZE_MAX, XATTR_LIST_MAX); a
/// guest asking for more gets this much room, as getxattr(2) and listxattr(2) do.
const XATTR_MAX: u32 = 65536;

/// One virtio-fs device serving one shared directory.
pub struct FsDevice {
    server: Server<Arc<PassthroughFs>>,
    fs: Arc<PassthroughFs>,
    read_only: bool,
    bounce: Mutex<Bounce>,
}

impl FsDevice {
    /// Opens the share described by `config`.
    pub fn new(config: &FsConfig) -> Result<Self, Error> {
        let fs = Arc::new(open_passthrough(config)?);
        Ok(FsDevice {
            server: Server::new(Arc::clone(&fs)),
            fs,
            read_only: config.read_only,
            bounce: Mutex::new(Bounce::new()?),
        })
    }

    /// Forgets every inode and open handle the guest held (their fds are closed) and opens
    /// the share's root again, as FUSE_DESTROY does: what a device reset needs, without
    /// opening a new passthrough (which needs `/proc/self/mountinfo`).
    pub fn forget_all(&self) {
        use fuse_backend_rs::api::filesystem::FileSystem;
        self.fs.destroy();
    }

    /// Drains `queue`, answering every available request; returns whether the driver must be
    /// notified (used ring changed and the driver's event index or flags ask for it).
    ///
    /// Works with and without VIRTIO_RING_F_EVENT_IDX: notifications are re-enabled after the
    /// queue looks empty and the queue is drained again if the driver raced in a new request.
    pub fn process_queue(&self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<bool, Error> {
        let mut used_any = false;
        loop {
            queue.disable_notification(mem).map_err(queue_err)?;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let written = match self.handle_chain(mem, chain) {
                    Ok(n) => n,
                    Err(e) => {
                        // The chain still goes back to the driver (with nothing written) so a
                        // bad request cannot leak descriptors; the guest sees an I/O error.
                        tracing::warn!(error = %e, "virtio-fs: dropping request");
                        0
                    }
                };
                queue.add_used(mem, head, written).map_err(queue_err)?;
                used_any = true;
            }
            // An available index more than a queue ahead makes pop find nothing while
            // enable_notification keeps saying "more": stop instead of spinning.
            if !queue.enable_notification(mem).map_err(queue_err)? || queue.iter(mem).is_err() {
                break;
            }
        }
        if !used_any {
            return Ok(false);
        }
        queue.needs_notification(mem).map_err(queue_err)
    }

    /// Serves the single FUSE request in `chain`; returns the number of bytes written into the
    /// chain's device-writable buffers (the `len` of the used-ring entry).
    ///
    /// The request is copied out of guest memory first and everything (the checks here and
    /// fuse-backend-rs' server) reads the copy: the guest's other vCPUs can rewrite its
    /// buffers while the device works, so a value checked in guest memory could be another
    /// value by the time the server reads it (a read-only share's filter, the xattr sizes).
    /// Replies are written to the guest's buffers directly.
    pub fn handle_chain(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<u32, Error> {
        let mut bounce = self.bounce.lock().unwrap_or_else(|e| e.into_inner());
        let len = bounce.load(mem, &chain)?;
        let header: InHeader = bounce
            .mem
            .read_obj(GuestAddress(BOUNCE_DATA))
            .map_err(|e| Error::DescriptorChain(format!("FUSE header: {e}")))?;
        if header.opcode == 0 {
            // Not a FUSE opcode; fuse-backend-rs turns opcodes into its enum with a transmute
            // when it logs at trace level, which is undefined for 0 (every other value is
            // either a variant or clamped to its MaxOpcode).
            return reply_error(mem, chain, header.unique, libc::ENOSYS);
        }
        if self.read_only {
            let mut body = [0u8; PEEK_BODY];
            let available = len.saturating_sub(size_of::<InHeader>()).min(PEEK_BODY);
            bounce
                .mem
                .read_slice(
                    &mut body[..available],
                    GuestAddress(BOUNCE_DATA + size_of::<InHeader>() as u64),
                )
                .map_err(|e| Error::DescriptorChain(format!("FUSE body: {e}")))?;
            if is_write_request(&header, &body[..available]) {
                return reply_error(mem, chain, header.unique, libc::EROFS);
            }
        }
        if matches!(header.opcode, GETXATTR | LISTXATTR) && len >= size_of::<InHeader>() + 4 {
            // The passthrough allocates `size` bytes before asking the kernel: 4 GiB from one
            // request otherwise.
            let at = GuestAddress(BOUNCE_DATA + size_of::<InHeader>() as u64);
            let size: u32 = bounce.mem.read_obj(at).map_err(mem_err)?;
            if size > XATTR_MAX {
                bounce.mem.write_obj(XATTR_MAX, at).map_err(mem_err)?;
            }
        }
        // A request that makes a file runs as its caller (see `creds`); the passthrough gets a
        // copy that says root, so it does not switch the thread's effective uid itself.
        let _caller = if makes_a_file(header.opcode) {
            match Caller::assume(header.uid, header.gid) {
                Ok(caller) => {
                    let mut as_root = header;
                    as_root.uid = 0;
                    as_root.gid = 0;
                    bounce
                        .mem
                        .write_obj(as_root, GuestAddress(BOUNCE_DATA))
                        .map_err(mem_err)?;
                    Some(caller)
                }
                Err(e) => {
                    tracing::warn!(error = %e, uid = header.uid, gid = header.gid, "virtio-fs: cannot take on the caller's ids");
                    return reply_error(
                        mem,
                        chain,
                        header.unique,
                        e.raw_os_error().unwrap_or(libc::EPERM),
                    );
                }
            }
        } else {
            None
        };
        let Bounce {
            mem: copy_mem,
            queue: copy_queue,
            avail_idx,
        } = &mut *bounce;
        let copy = Bounce::chain(copy_mem, copy_queue, avail_idx, len)?;
        let reader = Reader::from_descriptor_chain(copy_mem, copy).map_err(chain_err)?;
        let writer: Writer<'_, _> = VirtioFsWriter::new(mem, chain).map_err(chain_err)?.into();
        let written = self
            .server
            .handle_message(reader, writer, None, None)
            .map_err(|e| Error::DescriptorChain(format!("FUSE request: {e}")))?;
        Ok(u32::try_from(written).unwrap_or(u32::MAX))
    }
}

/// Host memory the request is copied into, laid out as a one-entry virtqueue so that
/// fuse-backend-rs' `Reader` (which reads only descriptor chains) can read the copy.
struct Bounce {
    mem: GuestMemoryMmap,
    queue: Queue,
    avail_idx: u16,
}

/// Addresses of the bounce queue's rings (below [`BOUNCE_DATA`]).
const BOUNCE_DESC: u64 = 0x0;
const BOUNCE_AVAIL: u64 = 0x100;
const BOUNCE_USED: u64 = 0x200;

impl Bounce {
    fn new() -> Result<Self, Error> {
        // An anonymous mapping: only the pages a request touches become resident.
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), BOUNCE_DATA as usize + MAX_REQUEST)])
                .map_err(|e| Error::GuestMemory(format!("request copy buffer: {e}")))?;
        let mut queue = Queue::new(1).map_err(queue_err)?;
        queue
            .try_set_desc_table_address(GuestAddress(BOUNCE_DESC))
            .map_err(queue_err)?;
        queue
            .try_set_avail_ring_address(GuestAddress(BOUNCE_AVAIL))
            .map_err(queue_err)?;
        queue
            .try_set_used_ring_address(GuestAddress(BOUNCE_USED))
            .map_err(queue_err)?;
        queue.set_ready(true);
        Ok(Bounce {
            mem,
            queue,
            avail_idx: 0,
        })
    }

    /// Copies the device-readable part of `chain` (at most [`MAX_REQUEST`] bytes) into the
    /// bounce memory; returns how many bytes were copied.
    fn load(
        &mut self,
        guest: &GuestMemoryMmap,
        chain: &DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<usize, Error> {
        let mut at = 0usize;
        for desc in chain.clone().readable() {
            let n = (desc.len() as usize).min(MAX_REQUEST - at);
            if n == 0 {
                continue;
            }
            let src = guest.get_slice(desc.addr(), n).map_err(mem_err)?;
            let dst = self
                .mem
                .get_slice(GuestAddress(BOUNCE_DATA + at as u64), n)
                .map_err(mem_err)?;
            src.copy_to_volatile_slice(dst);
            at += n;
        }
        Ok(at)
    }

    /// A chain of one readable descriptor over the first `len` copied bytes.
    /// (The parts are passed apart so the chain can borrow the memory while the queue moves.)
    fn chain<'m>(
        mem: &'m GuestMemoryMmap,
        queue: &mut Queue,
        avail_idx: &mut u16,
        len: usize,
    ) -> Result<DescriptorChain<&'m GuestMemoryMmap>, Error> {
        let desc = BOUNCE_DESC;
        mem.write_obj(BOUNCE_DATA, GuestAddress(desc))
            .and_then(|()| mem.write_obj(len as u32, GuestAddress(desc + 8)))
            .and_then(|()| mem.write_obj(0u16, GuestAddress(desc + 12)))
            .and_then(|()| mem.write_obj(0u16, GuestAddress(BOUNCE_AVAIL + 4)))
            .map_err(mem_err)?;
        *avail_idx = avail_idx.wrapping_add(1);
        mem.write_obj(*avail_idx, GuestAddress(BOUNCE_AVAIL + 2))
            .map_err(mem_err)?;
        queue
            .pop_descriptor_chain(mem)
            .ok_or_else(|| Error::Queue("request copy: no chain".into()))
    }
}

fn mem_err(e: vm_memory::GuestMemoryError) -> Error {
    Error::GuestMemory(e.to_string())
}

/// Answers request `unique` with `-errno` and no payload.
fn reply_error(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    unique: u64,
    errno: i32,
) -> Result<u32, Error> {
    let mut writer = VirtioFsWriter::new(mem, chain).map_err(chain_err)?;
    let header = OutHeader {
        len: size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    writer
        .write_all(header.as_slice())
        .map_err(|e| Error::DescriptorChain(format!("FUSE reply: {e}")))?;
    Ok(writer.bytes_written() as u32)
}

fn chain_err(e: fuse_backend_rs::transport::Error) -> Error {
    Error::DescriptorChain(e.to_string())
}

fn queue_err(e: virtio_queue::Error) -> Error {
    Error::Queue(e.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use fuse_backend_rs::abi::fuse_abi::{
        AttrOut, CreateIn, EntryOut, GetattrIn, InitIn, InitOut, MkdirIn, OpenIn, OpenOut, ReadIn,
        SetattrIn, WriteIn, WriteOut,
    };

    use super::*;
    use crate::test_driver::{Buf, Driver};

    const FUSE_LOOKUP: u32 = 1;
    const FUSE_FORGET: u32 = 2;
    const FUSE_GETATTR: u32 = 3;
    const FUSE_SETATTR: u32 = 4;
    const FUSE_READLINK: u32 = 5;
    const FUSE_MKDIR: u32 = 9;
    const FUSE_OPEN: u32 = 14;
    const FUSE_READ: u32 = 15;
    const FUSE_WRITE: u32 = 16;
    const FUSE_INIT: u32 = 26;
    const FUSE_CREATE: u32 = 35;
    const FATTR_UID: u32 = 0x2;
    const FATTR_GID: u32 = 0x4;
    const ROOT: u64 = 1;
    const HELLO: &[u8] = b"hello from the host\n";

    /// A FUSE client speaking to the device through the test driver's virtqueue.
    struct Client {
        device: FsDevice,
        driver: Driver,
        unique: u64,
        /// The guest caller's uid and gid put in each request's header.
        caller: (u32, u32),
    }

    impl Client {
        fn new(dir: &Path, read_only: bool) -> Self {
            let config = FsConfig {
                shared_dir: dir.to_owned(),
                read_only,
            };
            let mut client = Client {
                device: FsDevice::new(&config).unwrap(),
                driver: Driver::new(),
                unique: 0,
                caller: (0, 0),
            };
            let init = InitIn {
                major: 7,
                minor: 31,
                max_readahead: 0x20000,
                flags: 0,
            };
            let out: InitOut = client.ok(FUSE_INIT, 0, init.as_slice());
            assert_eq!(out.major, 7);
            client
        }

        /// Sends one request and returns (errno, payload). Header and payload land in separate
        /// writable descriptors, the way the Linux driver splits them.
        fn call(&mut self, opcode: u32, nodeid: u64, args: &[u8]) -> (i32, Vec<u8>) {
            self.unique += 1;
            let header = InHeader {
                len: (size_of::<InHeader>() + args.len()) as u32,
                opcode,
                unique: self.unique,
                nodeid,
                uid: self.caller.0,
                gid: self.caller.1,
                pid: 1,
                padding: 0,
            };
            let mut bufs = vec![Buf::Readable(header.as_slice())];
            if !args.is_empty() {
                bufs.push(Buf::Readable(args));
            }
            bufs.push(Buf::Writable(size_of::<OutHeader>() as u32));
            bufs.push(Buf::Writable(8192));
            let (head, writable) = self.driver.offer(&bufs);
            let notify = self
                .device
                .process_queue(&self.driver.mem, &mut self.driver.queue)
                .unwrap();
            assert!(notify, "driver must be notified of a used buffer");
            let (used_head, len) = self.driver.take_used().expect("a used entry");
            assert_eq!(used_head, head);
            assert!(self.driver.take_used().is_none());
            let reply = self.driver.read_back(&writable, len);
            let out = OutHeader::from_slice(&reply[..size_of::<OutHeader>()]).unwrap();
            assert_eq!(out.unique, self.unique);
            assert_eq!(out.len, len);
            (-out.error, reply[size_of::<OutHeader>()..].to_vec())
        }

        /// Sends a request that must succeed and decodes its reply.
        fn ok<T: ByteValued>(&mut self, opcode: u32, nodeid: u64, args: &[u8]) -> T {
            let (errno, payload) = self.call(opcode, nodeid, args);
            assert_eq!(errno, 0, "opcode {opcode} failed");
            *T::from_slice(&payload[..size_of::<T>()]).unwrap()
        }

        fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
            let (errno, payload) = self.call(FUSE_LOOKUP, parent, &cstr(name));
            if errno != 0 {
                return Err(errno);
            }
            Ok(*EntryOut::from_slice(&payload[..size_of::<EntryOut>()]).unwrap())
        }
    }

    fn cstr(name: &str) -> Vec<u8> {
        let mut bytes = name.as_bytes().to_vec();
        bytes.push(0);
        bytes
    }

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn share() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
        dir
    }

    #[test]
    fn init_lookup_getattr_read_write_chown() {
        let dir = share();
        let mut c = Client::new(dir.path(), false);

        let entry = c.lookup(ROOT, "hello.txt").unwrap();
        assert_eq!(entry.attr.size, HELLO.len() as u64);
        let attr: AttrOut = c.ok(FUSE_GETATTR, entry.nodeid, GetattrIn::default().as_slice());
        assert_eq!(attr.attr.size, HELLO.len() as u64);
        assert_eq!(attr.attr.mode & libc::S_IFMT, libc::S_IFREG);

        let open = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let opened: OpenOut = c.ok(FUSE_OPEN, entry.nodeid, open.as_slice());
        let read = ReadIn {
            fh: opened.fh,
            offset: 0,
            size: 4096,
            ..Default::default()
        };
        let (errno, data) = c.call(FUSE_READ, entry.nodeid, read.as_slice());
        assert_eq!(errno, 0);
        assert_eq!(data, HELLO);

        let create = CreateIn {
            flags: (libc::O_WRONLY | libc::O_CREAT) as u32,
            mode: libc::S_IFREG | 0o640,
            umask: 0,
            fuse_flags: 0,
        };
        let (errno, payload) = c.call(
            FUSE_CREATE,
            ROOT,
            &concat(&[create.as_slice(), &cstr("from-guest.txt")]),
        );
        assert_eq!(errno, 0);
        let created = *EntryOut::from_slice(&payload[..size_of::<EntryOut>()]).unwrap();
        let created_open =
            *OpenOut::from_slice(&payload[size_of::<EntryOut>()..][..size_of::<OpenOut>()])
                .unwrap();
        let data = b"written by the guest";
        let write = WriteIn {
            fh: created_open.fh,
            offset: 0,
            size: data.len() as u32,
            ..Default::default()
        };
        let written: WriteOut = c.ok(
            FUSE_WRITE,
            created.nodeid,
            &concat(&[write.as_slice(), data]),
        );
        assert_eq!(written.size, data.len() as u32);
        let host_file = dir.path().join("from-guest.txt");
        assert_eq!(std::fs::read(&host_file).unwrap(), data);

        let chown = SetattrIn {
            valid: FATTR_UID | FATTR_GID,
            uid: 4242,
            gid: 4242,
            ..Default::default()
        };
        let (errno, payload) = c.call(FUSE_SETATTR, created.nodeid, chown.as_slice());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(errno, 0);
            let attr = AttrOut::from_slice(&payload[..size_of::<AttrOut>()]).unwrap();
            assert_eq!((attr.attr.uid, attr.attr.gid), (4242, 4242));
            let meta = std::fs::metadata(&host_file).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4242, 4242));
            assert_eq!(meta.mode() & 0o777, 0o640);
        } else {
            assert_eq!(
                errno,
                libc::EPERM,
                "chown as non-root is refused by the host"
            );
        }
    }

    fn thread_status(name: &str) -> String {
        std::fs::read_to_string("/proc/thread-self/status")
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{name}:"))
                    .map(|v| v.trim().to_owned())
            })
            .unwrap()
    }

    /// Files made through the device belong to the guest caller on the host, and a root
    /// caller writes where only root may, both from a root thread and from a thread jailed as
    /// an unprivileged uid that kept the ownership capabilities (as rootcell's back ends are);
    /// the thread ends each request with its own ids and capabilities again.
    #[test]
    fn files_are_made_as_their_caller_by_a_root_or_an_unprivileged_thread() {
        if !rootcell_test_support::require_root("files made as their caller") {
            return;
        }
        for jailed in [false, true] {
            std::thread::spawn(move || made_as_caller(jailed))
                .join()
                .unwrap();
        }
    }

    fn made_as_caller(jailed: bool) {
        use std::os::unix::fs::PermissionsExt;
        let dir = share();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let root_only = dir.path().join("rootonly");
        std::fs::create_dir(&root_only).unwrap();
        std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o700)).unwrap();
        if jailed {
            // What rootcell's jail does (runtime/src/jail/vmm.rs), by hand: a uid of the
            // reserved range, the ownership capabilities kept across the change.
            let id = 0x7e00_0000 + std::process::id();
            // CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID SETGID SETUID MKNOD SETFCAP
            let keep: u32 = [0, 1, 2, 3, 4, 6, 7, 27, 31]
                .iter()
                .fold(0, |m, c| m | 1 << c);
            // SAFETY: raw calls on this thread's credentials only; no memory but the cap data.
            unsafe {
                assert_eq!(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), 0);
                assert_eq!(libc::syscall(libc::SYS_setresgid, id, id, id), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, id, id, id), 0);
            }
            let keep: caps::CapsHashSet = caps::all()
                .into_iter()
                .filter(|c| c.index() < 32 && keep & (1 << c.index()) != 0)
                .collect();
            caps::set(None, caps::CapSet::Permitted, &keep).unwrap();
            caps::set(None, caps::CapSet::Effective, &keep).unwrap();
            assert_eq!(thread_status("Uid"), vec![id.to_string(); 4].join("\t"));
        }
        let (own_uid, own_eff) = (thread_status("Uid"), thread_status("CapEff"));
        let mut c = Client::new(dir.path(), false);
        let create = CreateIn {
            flags: (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        // A user's file is the user's.
        c.caller = (1000, 1000);
        let args = concat(&[create.as_slice(), &cstr("users.txt")]);
        assert_eq!(c.call(FUSE_CREATE, ROOT, &args).0, 0, "jailed {jailed}");
        let meta = std::fs::metadata(dir.path().join("users.txt")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000), "jailed {jailed}");
        // The host checks the user's permission: not in root's directory.
        let rootonly = c.lookup(ROOT, "rootonly").unwrap().nodeid;
        let mkdir = MkdirIn {
            mode: 0o755,
            umask: 0,
        };
        let args = concat(&[mkdir.as_slice(), &cstr("sub")]);
        assert_eq!(
            c.call(FUSE_MKDIR, rootonly, &args).0,
            libc::EACCES,
            "jailed {jailed}"
        );
        // Root's file is root's, in root's directory.
        c.caller = (0, 0);
        assert_eq!(c.call(FUSE_MKDIR, rootonly, &args).0, 0, "jailed {jailed}");
        let meta = std::fs::metadata(root_only.join("sub")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "jailed {jailed}");
        // And a group of the caller's own.
        c.caller = (0, 4242);
        let args = concat(&[create.as_slice(), &cstr("group.txt")]);
        assert_eq!(c.call(FUSE_CREATE, rootonly, &args).0, 0, "jailed {jailed}");
        let meta = std::fs::metadata(root_only.join("group.txt")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 4242), "jailed {jailed}");
        // What taking on a caller costs per file-making request (printed, not asserted).
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            drop(Caller::assume(1000, 1000).unwrap());
        }
        eprintln!(
            "jailed {jailed}: a caller's ids taken and given back in {:?}",
            started.elapsed() / 1000
        );
        if !jailed {
            // The passthrough's own switch, for comparison (effective gid and uid, and back).
            let started = std::time::Instant::now();
            for _ in 0..1000 {
                // SAFETY: raw credential calls on this (root) thread only.
                unsafe {
                    libc::syscall(libc::SYS_setresgid, -1, 1000, -1);
                    libc::syscall(libc::SYS_setresuid, -1, 1000, -1);
                    libc::syscall(libc::SYS_setresuid, -1, 0, -1);
                    libc::syscall(libc::SYS_setresgid, -1, 0, -1);
                }
            }
            eprintln!(
                "the passthrough's effective-uid switch and back: {:?}",
                started.elapsed() / 1000
            );
        }
        // The thread's own ids (fs ids too) and capabilities again.
        assert_eq!(thread_status("Uid"), own_uid);
        assert_eq!(thread_status("CapEff"), own_eff);
        assert!(!thread_status("Gid").contains("4242"));
    }

    #[test]
    fn read_only_share_refuses_every_write() {
        let dir = share();
        let mut c = Client::new(dir.path(), true);
        let entry = c.lookup(ROOT, "hello.txt").unwrap();

        // Reading still works.
        let open = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let opened: OpenOut = c.ok(FUSE_OPEN, entry.nodeid, open.as_slice());
        let read = ReadIn {
            fh: opened.fh,
            size: 4096,
            ..Default::default()
        };
        assert_eq!(
            c.call(FUSE_READ, entry.nodeid, read.as_slice()),
            (0, HELLO.to_vec())
        );

        let open_rw = OpenIn {
            flags: libc::O_RDWR as u32,
            fuse_flags: 0,
        };
        assert_eq!(
            c.call(FUSE_OPEN, entry.nodeid, open_rw.as_slice()).0,
            libc::EROFS
        );
        let create = CreateIn {
            flags: (libc::O_WRONLY | libc::O_CREAT) as u32,
            mode: libc::S_IFREG | 0o644,
            ..Default::default()
        };
        let create_args = concat(&[create.as_slice(), &cstr("nope.txt")]);
        assert_eq!(c.call(FUSE_CREATE, ROOT, &create_args).0, libc::EROFS);
        let mkdir = MkdirIn {
            mode: 0o755,
            umask: 0,
        };
        let mkdir_args = concat(&[mkdir.as_slice(), &cstr("nodir")]);
        assert_eq!(c.call(FUSE_MKDIR, ROOT, &mkdir_args).0, libc::EROFS);
        let chmod = SetattrIn {
            valid: 0x1, // FATTR_MODE
            mode: 0o777,
            ..Default::default()
        };
        assert_eq!(
            c.call(FUSE_SETATTR, entry.nodeid, chmod.as_slice()).0,
            libc::EROFS
        );
        let write = WriteIn {
            fh: opened.fh,
            size: 1,
            ..Default::default()
        };
        let write_args = concat(&[write.as_slice(), b"x"]);
        assert_eq!(c.call(FUSE_WRITE, entry.nodeid, &write_args).0, libc::EROFS);

        // The host directory is untouched.
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, vec!["hello.txt"]);
        assert_eq!(std::fs::read(dir.path().join("hello.txt")).unwrap(), HELLO);
    }

    #[test]
    fn lookups_cannot_leave_the_share() {
        let dir = share();
        std::os::unix::fs::symlink("/etc", dir.path().join("escape")).unwrap();
        let mut c = Client::new(dir.path(), false);
        let root: AttrOut = c.ok(FUSE_GETATTR, ROOT, GetattrIn::default().as_slice());

        // ".." of the root is the root itself.
        let up = c.lookup(ROOT, "..").unwrap();
        assert_eq!(up.attr.ino, root.attr.ino);
        let up_up = c.lookup(up.nodeid, "..").unwrap();
        assert_eq!(up_up.attr.ino, root.attr.ino);
        // Names with a slash are refused outright.
        assert_eq!(c.lookup(ROOT, "../etc").unwrap_err(), libc::EINVAL);
        assert_eq!(c.lookup(ROOT, "escape/passwd").unwrap_err(), libc::EINVAL);

        // A symlink is handed to the guest as a symlink; the host never follows it.
        let link = c.lookup(ROOT, "escape").unwrap();
        assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(
            c.call(FUSE_READLINK, link.nodeid, &[]),
            (0, b"/etc".to_vec())
        );
        assert!(c.lookup(link.nodeid, "passwd").is_err());
        let open = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        assert_ne!(c.call(FUSE_OPEN, link.nodeid, open.as_slice()).0, 0);
    }

    #[test]
    fn forget_gets_no_reply_and_bad_chains_are_returned() {
        let dir = share();
        let mut c = Client::new(dir.path(), false);
        let entry = c.lookup(ROOT, "hello.txt").unwrap();

        // FORGET (sent on the hiprio queue) has no reply: the chain comes back with 0 bytes.
        c.unique += 1;
        let header = InHeader {
            len: (size_of::<InHeader>() + 8) as u32,
            opcode: FUSE_FORGET,
            unique: c.unique,
            nodeid: entry.nodeid,
            ..Default::default()
        };
        let nlookup = 1u64;
        c.driver.offer(&[
            Buf::Readable(header.as_slice()),
            Buf::Readable(nlookup.as_slice()),
        ]);
        assert!(c
            .device
            .process_queue(&c.driver.mem, &mut c.driver.queue)
            .unwrap());
        assert_eq!(c.driver.take_used().map(|(_, len)| len), Some(0));

        // A chain without a request header is given back too, and the device keeps serving.
        c.driver.offer(&[Buf::Writable(64)]);
        assert!(c
            .device
            .process_queue(&c.driver.mem, &mut c.driver.queue)
            .unwrap());
        assert_eq!(c.driver.take_used().map(|(_, len)| len), Some(0));
        assert!(c.lookup(ROOT, "hello.txt").is_ok());

        // An empty queue produces no notification.
        assert!(!c
            .device
            .process_queue(&c.driver.mem, &mut c.driver.queue)
            .unwrap());
    }
}
