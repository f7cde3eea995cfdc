//! A hostile guest kernel against the virtio-fs device: raw FUSE requests, through the device's
//! queue as a guest driver offers them, that try to leave the share, break the device or pin
//! host resources. The share is the arena's (`test_driver::arena`): a nodev tmpfs in the test
//! thread's own mount namespace, with a canary file beside the share whose content, inode,
//! times (strictatime: a read shows) and link count must never change, and a volume bound into
//! the share as the runtime binds a container's volumes.
//!
//! Asserted after every case: the canary untouched, nothing new outside the share, the device
//! still answers, and the process's fds back where they were once the device is gone.
//!
//! Needs root (mount namespace, bind mount), as `rootcell-test-support` says.

use std::alloc::{GlobalAlloc, Layout, System};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rootcell_fs::test_driver::arena::{open_fds, Arena};
use rootcell_fs::test_driver::{Client, Reply};

/// Records the largest single allocation, so a test can show a request did not make the
/// device allocate what the guest asked for.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const READLINK: u32 = 5;
const SYMLINK: u32 = 6;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const RENAME: u32 = 12;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const GETXATTR: u32 = 22;
const LISTXATTR: u32 = 23;
const RELEASE: u32 = 18;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const CREATE: u32 = 35;
const BATCH_FORGET: u32 = 42;
const FALLOCATE: u32 = 43;
const LSEEK: u32 = 46;
const COPY_FILE_RANGE: u32 = 47;
const ROOT: u64 = 1;
const CANARY: &[u8] = b"host secret: a guest must never see this\n";

/// Runs `case` on a thread of its own with a fresh arena and a client on its share (plus a
/// volume bound at `share/vol` from `base/volsrc`, holding `inner/file`), then checks the
/// oracle. Twice: with the device on a root thread, then on a thread jailed as rootcell's
/// back ends are (an unprivileged uid of the reserved range keeping only the ownership
/// capabilities). One case at a time: the oracle counts the process's fds and allocations.
fn hostile(case: impl Fn(&mut Arena, &mut Client) + Send + Sync + 'static) {
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let case = std::sync::Arc::new(case);
    for jailed in [false, true] {
        let case = std::sync::Arc::clone(&case);
        std::thread::spawn(move || {
            let mut arena = Arena::new().expect("arena");
            let vol = arena.bind_into_share("volsrc", "vol").expect("volume");
            std::fs::create_dir(vol.join("inner")).unwrap();
            std::fs::write(vol.join("inner/file"), b"volume file\n").unwrap();
            let fds = open_fds();
            // The device and the case on a thread of their own, so that the arena (its
            // mounts) is set up and torn down by a root thread either way.
            std::thread::scope(|s| {
                s.spawn(|| {
                    if jailed {
                        jail_this_thread();
                    }
                    let mut client = Client::new(arena.share(), false).expect("device");
                    case(&mut arena, &mut client);
                    // The device still serves after whatever the case sent.
                    client
                        .lookup(ROOT, b"hello.txt")
                        .expect("the device still answers");
                })
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            });
            assert_eq!(
                open_fds(),
                fds,
                "fds left open by the device (jailed {jailed})"
            );
            arena
                .check_content()
                .unwrap_or_else(|e| panic!("jailed {jailed}: {e}"));
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    }
}

/// What rootcell's jail gives a virtio-fs back-end thread (runtime/src/jail/vmm.rs), on the
/// calling thread only: uid = gid = the reserved range's base + its tid, keeping exactly the
/// ownership capabilities (bounding set included).
fn jail_this_thread() {
    use caps::{CapSet, Capability as C};
    let keep: caps::CapsHashSet = [
        C::CAP_CHOWN,
        C::CAP_DAC_OVERRIDE,
        C::CAP_DAC_READ_SEARCH,
        C::CAP_FOWNER,
        C::CAP_FSETID,
        C::CAP_SETGID,
        C::CAP_SETUID,
        C::CAP_MKNOD,
        C::CAP_SETFCAP,
    ]
    .into_iter()
    .collect();
    for cap in caps::all() {
        if !keep.contains(&cap) {
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    // SAFETY: raw credential calls on this thread only (not libc's process-wide wrappers).
    unsafe {
        let id = 0x7e00_0000 + libc::syscall(libc::SYS_gettid) as u32;
        assert_eq!(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
            0
        );
        assert_eq!(libc::syscall(libc::SYS_setresgid, id, id, id), 0);
        assert_eq!(libc::syscall(libc::SYS_setresuid, id, id, id), 0);
        assert_eq!(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0), 0);
    }
    caps::set(None, CapSet::Permitted, &keep).unwrap();
    caps::set(None, CapSet::Effective, &keep).unwrap();
}

fn root_ok(test: &str) -> bool {
    rootcell_test_support::require_root(test)
}

fn name(n: &[u8]) -> Vec<u8> {
    let mut v = n.to_vec();
    v.push(0);
    v
}

fn le(words: &[u64], halves: &[u32]) -> Vec<u8> {
    let mut a = Vec::new();
    words
        .iter()
        .for_each(|w| a.extend_from_slice(&w.to_le_bytes()));
    halves
        .iter()
        .for_each(|h| a.extend_from_slice(&h.to_le_bytes()));
    a
}

fn errno(r: &Reply) -> i32 {
    match r {
        Reply::Fuse(e, _) => *e,
        Reply::Nothing => -1,
    }
}

fn ino_of(c: &mut Client, nodeid: u64) -> u64 {
    match c.call(GETATTR, nodeid, &[0u8; 16]) {
        // AttrOut: attr_valid, attr_valid_nsec, dummy, then fuse_attr (ino first).
        Reply::Fuse(0, p) => u64::from_le_bytes(p[16..24].try_into().unwrap()),
        other => panic!("getattr {nodeid}: {other:?}"),
    }
}

fn open_read(c: &mut Client, nodeid: u64, offset: u64, size: u32) -> Reply {
    let fh = match c.call(OPEN, nodeid, &le(&[], &[libc::O_RDONLY as u32, 0])) {
        Reply::Fuse(0, p) => u64::from_le_bytes(p[..8].try_into().unwrap()),
        other => return other,
    };
    let mut args = le(&[fh, offset], &[size, 0]);
    args.extend_from_slice(&le(&[0], &[0, 0]));
    let read = c.call(READ, nodeid, &args);
    // ReleaseIn: fh, flags, release_flags, lock_owner.
    assert_eq!(
        c.call(RELEASE, nodeid, &le(&[fh], &[0, 0, 0, 0])),
        Reply::Fuse(0, vec![])
    );
    read
}

#[test]
fn dotdot_never_leaves_the_share_or_a_volume() {
    if !root_ok("dotdot_never_leaves_the_share_or_a_volume") {
        return;
    }
    hostile(|arena, c| {
        let root_ino = std::fs::metadata(arena.share()).unwrap().ino();
        let base_ino = std::fs::metadata(arena.base()).unwrap().ino();
        // `..` of the share root is the share root, however often.
        let mut node = ROOT;
        for _ in 0..4 {
            node = c.lookup(node, b"..").unwrap().nodeid;
            assert_eq!(ino_of(c, node), root_ino);
        }
        // `..` of a volume's root is the share root (the mount's parent), not the volume
        // source's parent in the arena.
        let vol = c.lookup(ROOT, b"vol").unwrap().nodeid;
        let inner = c.lookup(vol, b"inner").unwrap().nodeid;
        let up = c.lookup(inner, b"..").unwrap().nodeid;
        assert_eq!(ino_of(c, up), ino_of(c, vol));
        let up_up = c.lookup(up, b"..").unwrap().nodeid;
        assert_eq!(ino_of(c, up_up), root_ino);
        assert_ne!(ino_of(c, up_up), base_ino);
        // And `outside` is never found from there.
        assert!(c.lookup(up_up, b"outside").is_err());
        assert!(c.lookup(up_up, b"volsrc").is_err());
        // Symlinks are handed over as symlinks; the host never follows them.
        for link in [&b"abs-link"[..], b"rel-link", b"dotdot-link"] {
            let l = c.lookup(ROOT, link).unwrap();
            assert_eq!(l.attr.mode & libc::S_IFMT, libc::S_IFLNK);
            assert!(c.lookup(l.nodeid, b"canary").is_err());
            assert!(c.lookup(l.nodeid, b"outside").is_err());
            assert_ne!(errno(&open_read(c, l.nodeid, 0, 4096)), 0);
        }
        let dir = c.lookup(ROOT, b"dir").unwrap().nodeid;
        let up_link = c.lookup(dir, b"up-link").unwrap().nodeid;
        assert!(c.lookup(up_link, b"canary").is_err());
        assert_eq!(
            c.call(READLINK, up_link, &[]),
            Reply::Fuse(0, b"../../outside".to_vec())
        );
    });
}

#[test]
fn names_with_slash_nul_dots_or_too_long_are_refused() {
    if !root_ok("names_with_slash_nul_dots_or_too_long_are_refused") {
        return;
    }
    hostile(|arena, c| {
        for bad in [
            &b"../outside/canary"[..],
            b"../outside",
            b"/etc/passwd",
            b"dir/../../outside",
            b"vol/../../outside",
            b"",
        ] {
            assert!(c.lookup(ROOT, bad).is_err(), "{bad:?} was found");
        }
        // A NUL inside the name ends it: the rest is never a path.
        let mut nul = b"hello.txt\0/../outside/canary".to_vec();
        nul.push(0);
        assert_ne!(
            errno(&c.call(LOOKUP, ROOT, &nul)),
            -1,
            "a name with a NUL inside gets an answer"
        );
        // No terminating NUL at all.
        assert_ne!(errno(&c.call(LOOKUP, ROOT, b"hello.txt")), 0);
        // A name over NAME_MAX.
        assert_ne!(errno(&c.call(LOOKUP, ROOT, &name(&[b'a'; 300]))), 0);
        // Creating under such names fails and creates nothing outside.
        for bad in [&b"../outside/evil"[..], b"a/b", b"..", b"."] {
            let mut mkdir = le(&[], &[0o755, 0]);
            mkdir.extend_from_slice(&name(bad));
            assert_ne!(errno(&c.call(MKDIR, ROOT, &mkdir)), 0, "mkdir {bad:?}");
            let mut create = le(
                &[],
                &[(libc::O_CREAT | libc::O_WRONLY) as u32, 0o100644, 0, 0],
            );
            create.extend_from_slice(&name(bad));
            assert_ne!(errno(&c.call(CREATE, ROOT, &create)), 0, "create {bad:?}");
            let mut symlink = name(bad);
            symlink.extend_from_slice(&name(b"/etc/shadow"));
            assert_ne!(
                errno(&c.call(SYMLINK, ROOT, &symlink)),
                0,
                "symlink {bad:?}"
            );
            let mut rename = le(&[ROOT], &[]);
            rename.extend_from_slice(&name(b"hello.txt"));
            rename.extend_from_slice(&name(bad));
            assert_ne!(
                errno(&c.call(RENAME, ROOT, &rename)),
                0,
                "rename to {bad:?}"
            );
        }
        let hello = c.lookup(ROOT, b"hello.txt").unwrap().nodeid;
        let mut link = le(&[hello], &[]);
        link.extend_from_slice(&name(b"../outside/hard"));
        assert_ne!(errno(&c.call(LINK, ROOT, &link)), 0);
        arena.check().unwrap();
    });
}

#[test]
fn device_nodes_and_fifos_are_never_opened_on_the_host() {
    if !root_ok("device_nodes_and_fifos_are_never_opened_on_the_host") {
        return;
    }
    hostile(|_arena, c| {
        // /dev/zero's numbers (1:5): creating the node is the guest's right (it is a file in
        // its rootfs), opening it on the host is not. The arena is nodev, and the passthrough
        // refuses to open anything but files and directories before the kernel is asked.
        let mut mknod = le(
            &[],
            &[libc::S_IFCHR | 0o666, libc::makedev(1, 5) as u32, 0, 0],
        );
        mknod.extend_from_slice(&name(b"zero"));
        let made = c.call(MKNOD, ROOT, &mknod);
        assert_eq!(errno(&made), 0, "mknod as guest root: {made:?}");
        let zero = c.lookup(ROOT, b"zero").unwrap().nodeid;
        assert_ne!(
            errno(&open_read(c, zero, 0, 16)),
            0,
            "a device node was opened"
        );
        // A FIFO: an open on the host would block the device's thread for good.
        let fifo = c.lookup(ROOT, b"fifo").unwrap().nodeid;
        let start = Instant::now();
        assert_ne!(errno(&open_read(c, fifo, 0, 16)), 0);
        assert!(start.elapsed() < Duration::from_secs(5));
    });
}

#[test]
fn invalid_and_forgotten_inodes_are_errors() {
    if !root_ok("invalid_and_forgotten_inodes_are_errors") {
        return;
    }
    hostile(|_arena, c| {
        for bogus in [0, 2, 999, 1 << 32, u64::MAX, u64::MAX - 1] {
            let r = c.call(GETATTR, bogus, &[0u8; 16]);
            assert_ne!(errno(&r), 0, "getattr of unknown inode {bogus}: {r:?}");
            assert!(c.lookup(bogus, b"hello.txt").is_err());
            assert_ne!(errno(&open_read(c, bogus, 0, 16)), 0);
        }
        // Forget more lookups than were made, twice, then use the inode.
        let hello = c.lookup(ROOT, b"hello.txt").unwrap().nodeid;
        assert_eq!(c.call(FORGET, hello, &le(&[u64::MAX], &[])), Reply::Nothing);
        assert_eq!(c.call(FORGET, hello, &le(&[1], &[])), Reply::Nothing);
        assert_ne!(errno(&c.call(GETATTR, hello, &[0u8; 16])), 0);
        // A batch forget naming unknown inodes and claiming more entries than it carries.
        let mut batch = le(&[], &[3, 0]);
        batch.extend_from_slice(&le(&[12345, 1, u64::MAX, u64::MAX], &[]));
        let _ = c.call(BATCH_FORGET, 0, &batch);
        let mut lying = le(&[], &[u32::MAX, 0]);
        lying.extend_from_slice(&le(&[hello, 1], &[]));
        let _ = c.call(BATCH_FORGET, 0, &lying);
        // Forgetting the root: the device keeps serving it (the closure checks a lookup).
        assert_eq!(c.call(FORGET, ROOT, &le(&[u64::MAX], &[])), Reply::Nothing);
        // Unknown file handles.
        let hello = c.lookup(ROOT, b"hello.txt").unwrap().nodeid;
        let mut read = le(&[u64::MAX, 0], &[16, 0]);
        read.extend_from_slice(&le(&[0], &[0, 0]));
        assert_ne!(errno(&c.call(READ, hello, &read)), 0);
        let mut readdir = le(&[777, 0], &[4096, 0]);
        readdir.extend_from_slice(&le(&[0], &[0, 0]));
        assert_ne!(errno(&c.call(READDIR, ROOT, &readdir)), 0);
    });
}

#[test]
fn huge_and_negative_offsets_and_lengths_are_bounded() {
    if !root_ok("huge_and_negative_offsets_and_lengths_are_bounded") {
        return;
    }
    hostile(|arena, c| {
        let hello = c.lookup(ROOT, b"hello.txt").unwrap().nodeid;
        for (offset, size) in [
            (u64::MAX, 4096),
            (1 << 63, 4096),
            (i64::MAX as u64, u32::MAX),
            (0, u32::MAX),
            (u64::MAX - 10, 100),
        ] {
            let r = open_read(c, hello, offset, size);
            // Past the end: an empty read or an error; never a crash.
            if let Reply::Fuse(0, data) = &r {
                assert!(data.len() <= 4096);
            }
        }
        let fh = match c.call(OPEN, hello, &le(&[], &[libc::O_RDWR as u32, 0])) {
            Reply::Fuse(0, p) => u64::from_le_bytes(p[..8].try_into().unwrap()),
            other => panic!("open: {other:?}"),
        };
        // WriteIn: fh, offset, size, write_flags, lock_owner, flags, padding; then the data.
        for offset in [u64::MAX - 1, 1 << 63, (1 << 62) + 7] {
            let mut w = le(&[fh, offset], &[4, 0]);
            w.extend_from_slice(&le(&[0], &[0, 0]));
            w.extend_from_slice(b"boom");
            let r = c.call(WRITE, hello, &w);
            // Past the largest file size (2^63 - 1) a write fails; below it, it makes a
            // sparse file of one page (checked at the end).
            if offset >= 1 << 63 {
                assert_ne!(errno(&r), 0, "write at {offset}");
            }
        }
        // A write claiming more data than the request carries writes what it carries (the
        // passthrough reads the request's bytes, never past them).
        let mut w = le(&[fh, 0], &[u32::MAX, 0]);
        w.extend_from_slice(&le(&[0], &[0, 0]));
        w.extend_from_slice(b"x");
        if let Reply::Fuse(0, out) = c.call(WRITE, hello, &w) {
            assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()), 1);
        }
        // fallocate past what the 64 MiB tmpfs holds, and at absurd offsets.
        for (offset, length) in [(0, 1u64 << 40), (u64::MAX - 1, 2), (1 << 63, 1 << 63)] {
            let r = c.call(FALLOCATE, hello, &le(&[fh, offset, length], &[0, 0]));
            assert_ne!(errno(&r), 0, "fallocate {offset}+{length}");
        }
        // Truncate to absurd sizes (SETATTR with FATTR_SIZE).
        for size in [u64::MAX, 1 << 63] {
            let mut a = le(&[], &[0x8, 0]);
            a.extend_from_slice(&le(&[0, size, 0, 0, 0, 0], &[0; 8]));
            assert_ne!(errno(&c.call(SETATTR, hello, &a)), 0, "truncate to {size}");
        }
        let _ = c.call(LSEEK, hello, &le(&[fh, u64::MAX], &[3, 0]));
        let _ = c.call(LSEEK, hello, &le(&[fh, 0], &[99, 0]));
        let _ = c.call(
            COPY_FILE_RANGE,
            hello,
            &le(&[fh, u64::MAX - 1, hello, fh, 0, u64::MAX, 0], &[]),
        );
        // xattr buffers of 4 GiB: the device lets the passthrough allocate at most the
        // kernel's own xattr limit (it allocated the guest's size as asked: 4 GiB).
        LARGEST.store(0, Ordering::Relaxed);
        let mut get = le(&[], &[u32::MAX, 0]);
        get.extend_from_slice(&name(b"user.nothing"));
        let _ = c.call(GETXATTR, hello, &get);
        let _ = c.call(LISTXATTR, hello, &le(&[], &[u32::MAX, 0]));
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest <= 2 << 20,
            "one request made the device allocate {largest} bytes"
        );
        // The share's file system took nothing lasting from all this.
        let used = std::fs::metadata(arena.share().join("hello.txt")).unwrap();
        assert!(used.blocks() * 512 < 1 << 20);
    });
}

#[test]
fn swapped_symlinks_and_renamed_directories_never_lead_out() {
    if !root_ok("swapped_symlinks_and_renamed_directories_never_lead_out") {
        return;
    }
    hostile(|arena, c| {
        let share = arena.share().to_owned();
        std::os::unix::fs::symlink("../outside", share.join("swap")).unwrap();
        std::fs::write(share.join("dir/canary"), b"the share's own canary\n").unwrap();
        // Another actor (a second guest process, or the host) swaps `dir` and a symlink to
        // ../outside as fast as it can while the guest looks up and reads through `dir`.
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicUsize::new(0));
        let racer = {
            let (stop, swaps, share) = (stop.clone(), swaps.clone(), share.clone());
            std::thread::spawn(move || {
                let (a, b) = (
                    std::ffi::CString::new(share.join("dir").into_os_string().into_encoded_bytes())
                        .unwrap(),
                    std::ffi::CString::new(
                        share.join("swap").into_os_string().into_encoded_bytes(),
                    )
                    .unwrap(),
                );
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: renameat2 with valid C strings.
                    let rc = unsafe {
                        libc::renameat2(
                            libc::AT_FDCWD,
                            a.as_ptr(),
                            libc::AT_FDCWD,
                            b.as_ptr(),
                            libc::RENAME_EXCHANGE,
                        )
                    };
                    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut reads = 0;
        while Instant::now() < deadline {
            let Ok(dir) = c.lookup(ROOT, b"dir") else {
                continue;
            };
            if let Ok(canary) = c.lookup(dir.nodeid, b"canary") {
                if let Reply::Fuse(0, data) = open_read(c, canary.nodeid, 0, 4096) {
                    assert_ne!(data, CANARY, "read the canary outside the share");
                    reads += 1;
                }
                let _ = c.call(FORGET, canary.nodeid, &le(&[1], &[]));
            }
            if let Reply::Fuse(0, p) = c.call(OPENDIR, dir.nodeid, &le(&[], &[0, 0])) {
                let fh = u64::from_le_bytes(p[..8].try_into().unwrap());
                let _ = c.call(RELEASEDIR, dir.nodeid, &le(&[fh], &[0, 0, 0, 0]));
            }
            let _ = c.call(FORGET, dir.nodeid, &le(&[1], &[]));
        }
        stop.store(true, Ordering::Relaxed);
        racer.join().unwrap();
        eprintln!(
            "race: {} swaps, {reads} reads through the swapped directory",
            swaps.load(Ordering::Relaxed)
        );
        assert!(swaps.load(Ordering::Relaxed) > 100, "the race ran");
        assert!(reads > 0, "the guest did read through the directory");
        // The host moves a directory the guest holds out of a volume (same file system,
        // outside the bind's root): `..` from it must not reach the volume source's parent.
        let vol = c.lookup(ROOT, b"vol").unwrap().nodeid;
        let inner = c.lookup(vol, b"inner").unwrap().nodeid;
        std::fs::rename(
            arena.base().join("volsrc/inner"),
            arena.base().join("volsrc-moved"),
        )
        .unwrap();
        let up = c.lookup(inner, b"..");
        if let Ok(up) = &up {
            assert!(
                c.lookup(up.nodeid, b"outside").is_err(),
                "reached the arena's root"
            );
            assert!(
                c.lookup(up.nodeid, b"volsrc").is_err(),
                "reached the arena's root"
            );
        }
        std::fs::rename(
            arena.base().join("volsrc-moved"),
            arena.base().join("volsrc/inner"),
        )
        .unwrap();
    });
}

#[test]
fn a_lookup_flood_pins_one_fd_per_inode_and_forget_releases_them() {
    if !root_ok("a_lookup_flood_pins_one_fd_per_inode_and_forget_releases_them") {
        return;
    }
    hostile(|arena, c| {
        let fds = open_fds();
        let rss = rss_kib();
        // The same name 20000 times: one inode, one fd.
        let mut node = 0;
        for _ in 0..20_000 {
            node = c.lookup(ROOT, b"hello.txt").unwrap().nodeid;
        }
        assert!(
            open_fds() <= fds + 1,
            "repeated lookups pinned more than one fd"
        );
        assert_eq!(c.call(FORGET, node, &le(&[20_000], &[])), Reply::Nothing);
        assert_eq!(open_fds(), fds);
        // 1000 distinct files: one fd each while the guest remembers them, none after.
        let many = arena.share().join("many");
        std::fs::create_dir(&many).unwrap();
        for i in 0..1000 {
            std::fs::write(many.join(i.to_string()), b"").unwrap();
        }
        let dir = c.lookup(ROOT, b"many").unwrap().nodeid;
        let nodes: Vec<u64> = (0..1000)
            .map(|i| c.lookup(dir, i.to_string().as_bytes()).unwrap().nodeid)
            .collect();
        assert!(open_fds() <= fds + 1001);
        for n in nodes {
            assert_eq!(c.call(FORGET, n, &le(&[1], &[])), Reply::Nothing);
        }
        assert_eq!(c.call(FORGET, dir, &le(&[1], &[])), Reply::Nothing);
        assert_eq!(open_fds(), fds, "forgotten inodes keep fds");
        let grown = rss_kib().saturating_sub(rss);
        assert!(grown < 32 * 1024, "RSS grew by {grown} KiB");
        // At the fd limit, lookups fail with EMFILE and the device keeps going.
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write only the struct passed.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        let saved = limit;
        limit.rlim_cur = (fds + 100) as u64;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        let dir = c.lookup(ROOT, b"many").unwrap().nodeid;
        let results: Vec<_> = (0..300)
            .map(|i| c.lookup(dir, i.to_string().as_bytes()))
            .collect();
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &saved) };
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(e) if *e == libc::EMFILE)),
            "no lookup hit the fd limit"
        );
        for r in results.into_iter().flatten() {
            let _ = c.call(FORGET, r.nodeid, &le(&[1], &[]));
        }
        let _ = c.call(FORGET, dir, &le(&[1], &[]));
        std::fs::remove_dir_all(&many).unwrap();
    });
}

/// Resident set of this process in KiB.
fn rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
