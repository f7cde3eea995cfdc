//! The virtio-fs device driven the way the guest's driver drives it: virtio-mmio registers, FUSE
//! requests in descriptor chains in guest memory, queue eventfd notifications, the device's
//! interrupt. The share is a real temporary directory. No KVM needed.

mod common;

use std::time::Duration;

use common::virtq::{Buf, MmioDriver};
use rootcell_fs::FsConfig;
use rootcell_vmm::devices::virtio::fs::VirtioFs;
use rootcell_vmm::devices::virtio::VIRTIO_RING_F_EVENT_IDX;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS;

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
        Self::with(dev, event_idx)
    }

    fn with(dev: VirtioFs, event_idx: bool) -> Self {
        let mut drv = MmioDriver::new(Box::new(dev));
        drv.probe(
            VIRTIO_ID_FS,
            if event_idx {
                VIRTIO_RING_F_EVENT_IDX
            } else {
                0
            },
            2,
        );
        let cfg = drv.config(40);
        assert_eq!(&cfg[..9], b"rootcell\0", "tag in config space");
        assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
        Client { drv, unique: 0 }
    }

    /// Sends one request as root; returns (error, reply body).
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8], reply: u32) -> (i32, Vec<u8>) {
        self.call_as(0, 0, opcode, nodeid, body, reply)
    }

    /// Sends one request on behalf of guest user `uid`:`gid`.
    fn call_as(
        &mut self,
        uid: u32,
        gid: u32,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        reply: u32,
    ) -> (i32, Vec<u8>) {
        self.unique += 1;
        let mut req = Vec::new();
        req.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&self.unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&uid.to_le_bytes());
        req.extend_from_slice(&gid.to_le_bytes());
        req.extend_from_slice(&[0u8; 8]); // pid, padding
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

/// Resets the device, probes it again and reads the file in a fresh session.
fn reset_and_read_again(c: &mut Client) {
    c.drv.reset();
    assert_eq!(c.drv.read(VIRTIO_MMIO_STATUS), 0);
    c.drv.probe(VIRTIO_ID_FS, 0, 2);
    c.unique = 0;
    c.init();
    let (node, _) = c.lookup(ROOT, "hello.txt").unwrap();
    let fh = c.open(node);
    assert_eq!(c.read(node, fh, 4096), CONTENT);
}

#[test]
fn reset_and_probe_again_serves_a_fresh_session() {
    let dir = share();
    let mut c = Client::new(dir.path(), false, false);
    c.init();
    c.lookup(ROOT, "hello.txt").unwrap();
    reset_and_read_again(&mut c);
}

/// The device as the runtime's VMM process builds it: the I/O thread serves from the share as
/// its root and from an fd table of its own. It serves the guest through the transport's
/// queue eventfds and interrupt (made before its table was copied), also after a reset; in
/// its table a host file the process holds is `/dev/null`, the log file a pipe, and a file
/// the process opens later is not there. Needs root (a mount namespace of its own).
#[test]
fn a_thread_with_its_own_root_and_fds_serves_the_guest_and_holds_none_of_the_process_s() {
    if !rootcell_test_support::require_root("jailed virtio-fs device") {
        return;
    }
    use std::os::fd::AsRawFd;
    let dir = share();
    let marker = format!("own-fds-{}", std::process::id());
    std::fs::write(dir.path().join(&marker), b"").unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"host only").unwrap();
    let held = std::fs::File::open(&secret).unwrap();
    let log = std::fs::File::create(outside.path().join("log")).unwrap();
    let dev = VirtioFs::with_share_root(
        &FsConfig {
            shared_dir: dir.path().to_owned(),
            read_only: false,
        },
        "rootcell",
        &[log.as_raw_fd()],
    )
    .unwrap();
    let mut c = Client::with(dev, false);
    assert_eq!(c.init(), 7, "FUSE major version");
    let (node, _) = c.lookup(ROOT, "hello.txt").unwrap();
    let fh = c.open(node);
    assert_eq!(c.read(node, fh, 4096), CONTENT);
    let task = rootcell_test_support::thread_holding(
        "virtiofs-io",
        &std::path::Path::new("share").join(&marker),
    )
    .expect("the I/O thread serving our share under /share");
    let later = std::fs::File::open(&secret).unwrap();
    let fds = rootcell_test_support::fd_targets(&task.join("fd"));
    let secret_name = secret.to_string_lossy().into_owned();
    assert_eq!(
        fds.get(&held.as_raw_fd()).map(String::as_str),
        Some("/dev/null"),
        "a host file of the process in the thread's table: {fds:?}"
    );
    assert!(
        fds.get(&log.as_raw_fd())
            .is_some_and(|t| t.starts_with("pipe:")),
        "the log fd in the thread's table: {fds:?}"
    );
    assert!(
        !fds.values().any(|t| *t == secret_name),
        "the thread reaches the host file: {fds:?} (the process opened it at {})",
        later.as_raw_fd()
    );
    assert!(
        fds.values().any(|t| t == "/share/hello.txt"),
        "the opened share file is in the thread's own table: {fds:?}"
    );
    // A reset and a second session: activation again, with the same eventfds.
    reset_and_read_again(&mut c);
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

/// Little-endian encoding of a FUSE request body.
#[derive(Default)]
struct Body(Vec<u8>);

impl Body {
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn name(mut self, n: &str) -> Self {
        self.0.extend_from_slice(n.as_bytes());
        self.0.push(0);
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

const ENTRY_OUT: u32 = 128;
const ATTR_OUT: u32 = 104;

fn nodeid(entry: &[u8]) -> u64 {
    u64::from_le_bytes(entry[0..8].try_into().unwrap())
}

/// Expects success; returns the reply body.
fn ok(c: &mut Client, what: &str, op: u32, node: u64, body: Body, reply: u32) -> Vec<u8> {
    let (err, out) = c.call(op, node, &body.0, reply);
    assert_eq!(
        err,
        0,
        "{what}: {}",
        std::io::Error::from_raw_os_error(-err)
    );
    out
}

/// Every kind of request a guest's file system traffic makes, served by the virtio-fs I/O
/// thread under its seccomp filter: a syscall the filter misses kills this test process.
#[test]
fn a_full_guest_workload_runs_under_the_io_thread_filter() {
    use std::os::unix::fs::MetadataExt;
    let dir = share();
    // Writable by the unprivileged guest user below.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut c = Client::new(dir.path(), false, false);
    c.init();
    let (mkdir, create, write, fsync, getattr, setattr) = (9, 35, 16, 20, 3, 4);
    let (opendir, readdirplus, readdir, releasedir, release, flush) = (27, 44, 28, 29, 18, 25);
    let (rename2, symlink, readlink, link, unlink, rmdir) = (45, 6, 5, 13, 10, 11);
    let (statfs, lseek, fallocate, mknod, access, copy_range) = (17, 46, 43, 8, 34, 47);
    let (setxattr, getxattr, listxattr, removexattr) = (21, 22, 23, 24);

    let d = nodeid(&ok(
        &mut c,
        "mkdir",
        mkdir,
        ROOT,
        Body::default().u32(0o755).u32(0).name("d"),
        ENTRY_OUT,
    ));
    let out = ok(
        &mut c,
        "create",
        create,
        d,
        Body::default()
            .u32(libc::O_RDWR as u32)
            .u32(0o644)
            .u32(0)
            .u32(0)
            .name("f"),
        ENTRY_OUT + 16,
    );
    let f = nodeid(&out);
    let fh = u64::from_le_bytes(out[128..136].try_into().unwrap());
    let data = b"written through the confined virtio-fs thread";
    let out = ok(
        &mut c,
        "write",
        write,
        f,
        Body::default()
            .u64(fh)
            .u64(0)
            .u32(data.len() as u32)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0)
            .bytes(data),
        8,
    );
    assert_eq!(
        u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize,
        data.len()
    );
    ok(
        &mut c,
        "fsync",
        fsync,
        f,
        Body::default().u64(fh).u32(0).u32(0),
        0,
    );
    ok(
        &mut c,
        "fallocate",
        fallocate,
        f,
        Body::default().u64(fh).u64(0).u64(4096).u32(0).u32(0),
        0,
    );
    ok(
        &mut c,
        "lseek",
        lseek,
        f,
        Body::default()
            .u64(fh)
            .u64(0)
            .u32(libc::SEEK_DATA as u32)
            .u32(0),
        8,
    );
    ok(
        &mut c,
        "getattr",
        getattr,
        f,
        Body::default().u32(0).u32(0).u64(0),
        ATTR_OUT,
    );
    // chmod, truncate and both times at once.
    let valid = 1 | 8 | 128 | 256; // MODE | SIZE | ATIME_NOW | MTIME_NOW
    let setattr_body = Body::default()
        .u32(valid)
        .u32(0)
        .u64(0)
        .u64(data.len() as u64)
        .u64(0)
        .bytes(&[0u8; 24 + 12])
        .u32(0o600)
        .bytes(&[0u8; 16]);
    ok(&mut c, "setattr", setattr, f, setattr_body, ATTR_OUT);
    ok(
        &mut c,
        "access",
        access,
        f,
        Body::default().u32(libc::R_OK as u32).u32(0),
        0,
    );
    // Copy the file's bytes into a second file.
    let out = ok(
        &mut c,
        "create g",
        create,
        d,
        Body::default()
            .u32(libc::O_RDWR as u32)
            .u32(0o644)
            .u32(0)
            .u32(0)
            .name("g"),
        ENTRY_OUT + 16,
    );
    let (g, gfh) = (
        nodeid(&out),
        u64::from_le_bytes(out[128..136].try_into().unwrap()),
    );
    let (err, _) = c.call(
        copy_range,
        f,
        &Body::default()
            .u64(fh)
            .u64(0)
            .u64(g)
            .u64(gfh)
            .u64(0)
            .u64(data.len() as u64)
            .u64(0)
            .0,
        8,
    );
    assert!(err == 0 || -err == libc::ENOSYS, "copy_file_range: {err}");
    ok(
        &mut c,
        "flush",
        flush,
        f,
        Body::default().u64(fh).u32(0).u32(0).u64(0),
        0,
    );
    ok(
        &mut c,
        "release",
        release,
        f,
        Body::default().u64(fh).u32(0).u32(0).u64(0),
        0,
    );
    ok(
        &mut c,
        "release g",
        release,
        g,
        Body::default().u64(gfh).u32(0).u32(0).u64(0),
        0,
    );

    // Extended attributes: supported or not by the host file system, never fatal.
    let xattr_errs = [0, -libc::EOPNOTSUPP, -libc::ENOSYS, -libc::ENODATA];
    for (op, body, reply) in [
        (
            setxattr,
            Body::default().u32(3).u32(0).name("user.rc").bytes(b"yes"),
            0,
        ),
        (getxattr, Body::default().u32(64).u32(0).name("user.rc"), 64),
        (listxattr, Body::default().u32(64).u32(0), 64),
        (removexattr, Body::default().name("user.rc"), 0),
    ] {
        let (err, _) = c.call(op, f, &body.0, reply);
        assert!(xattr_errs.contains(&err), "xattr op {op}: {err}");
    }

    // Names: symlink, readlink, hard link, special file, rename.
    let s = nodeid(&ok(
        &mut c,
        "symlink",
        symlink,
        d,
        Body::default().name("s").name("f"),
        ENTRY_OUT,
    ));
    assert_eq!(
        ok(&mut c, "readlink", readlink, s, Body::default(), 256),
        b"f"
    );
    ok(
        &mut c,
        "link",
        link,
        d,
        Body::default().u64(f).name("h"),
        ENTRY_OUT,
    );
    ok(
        &mut c,
        "mknod",
        mknod,
        d,
        Body::default()
            .u32(libc::S_IFIFO | 0o644)
            .u32(0)
            .u32(0)
            .u32(0)
            .name("p"),
        ENTRY_OUT,
    );
    ok(
        &mut c,
        "rename2",
        rename2,
        d,
        Body::default().u64(d).u32(0).u32(0).name("h").name("h2"),
        0,
    );

    // List the directory both ways.
    let out = ok(
        &mut c,
        "opendir",
        opendir,
        d,
        Body::default().u32(0).u32(0),
        16,
    );
    let dfh = u64::from_le_bytes(out[0..8].try_into().unwrap());
    let read_in = || {
        Body::default()
            .u64(dfh)
            .u64(0)
            .u32(4096)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0)
    };
    let listing = ok(&mut c, "readdir", readdir, d, read_in(), 4096);
    for name in ["f", "g", "s", "h2", "p"] {
        assert!(
            listing.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} listed"
        );
    }
    ok(&mut c, "readdirplus", readdirplus, d, read_in(), 4096);
    ok(
        &mut c,
        "releasedir",
        releasedir,
        d,
        Body::default().u64(dfh).u32(0).u32(0).u64(0),
        0,
    );
    ok(&mut c, "statfs", statfs, ROOT, Body::default(), 80);

    // An unprivileged guest user: the thread takes its credentials for the request.
    let (err, _) = c.call_as(
        1000,
        1000,
        mkdir,
        ROOT,
        &Body::default().u32(0o755).u32(0).name("users").0,
        ENTRY_OUT,
    );
    assert_eq!(err, 0);
    let meta = std::fs::metadata(dir.path().join("users")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));

    // Remove what was made.
    for name in ["f", "g", "s", "h2", "p"] {
        ok(&mut c, name, unlink, d, Body::default().name(name), 0);
    }
    ok(&mut c, "rmdir", rmdir, ROOT, Body::default().name("d"), 0);
    assert!(!dir.path().join("d").exists());
    assert_eq!(
        std::fs::read(dir.path().join("hello.txt")).unwrap(),
        CONTENT
    );
}
