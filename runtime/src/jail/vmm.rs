//! The built-in VMM's threads in jails of their own (issue 16). The built-in VMM runs as
//! threads of the sandbox process; each of its vCPU and device I/O threads enters this jail on
//! itself before it drops its capabilities and installs its seccomp filter (the VMM calls
//! [`vmm_thread`] through [`rootcell_vmm::jail`]).
//!
//! * vCPU and virtio-net threads: a root of their own holding nothing ([`own_root`]), and an
//!   unprivileged identity of their own ([`become_unprivileged`]): uid = gid =
//!   [`super::UID_BASE`] + the thread's id, no supplementary groups, an empty bounding set.
//!   They hold every fd they need (the vCPU's and VM's KVM fds, the tap) before.
//! * the vsock thread: a root holding only its socket directory, read-only (it connects guest
//!   connections to `<uds>_<port>` there by path; it removes no file, and the sandbox removes
//!   the hybrid socket), and an unprivileged uid of its own without
//!   capabilities ([`vsock_thread`]): the directory is given to that uid's group (mode 0750),
//!   so it may connect to the sockets there and nobody else but root reaches them.
//! * the virtio-fs thread: its share root and fd table of its own are set up before (by the
//!   device); here it gets an unprivileged uid of its own that keeps the ownership
//!   capabilities ([`fs_thread`]). The thread that relays its log lines from a pipe to the
//!   log file gets what vCPU threads get.
//!
//! What this does not give (and a process of its own would): the threads share the sandbox's
//! address space, so code run by a compromised vCPU thread could still rewrite the memory of
//! the sandbox's other threads, which keep root's capabilities. Seccomp (per thread) still
//! limits the system calls the compromised thread itself can make.

use rootcell_vmm::jail::{Confine, ThreadKind};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// The new mount API's flags (linux/mount.h).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// The hook the built-in VMM's threads call (see the module text): the thread's jail, and
/// whether it then drops its capabilities and installs its seccomp filter; under a
/// `ROOTCELL_JAIL` that turns its half off, none of it.
pub fn vmm_thread(kind: ThreadKind, dir: Option<&Path>) -> Result<Confine, String> {
    if !confines(super::Halves::current(), kind) {
        return Ok(Confine::Not);
    }
    let jailed = match kind {
        ThreadKind::Fs => fs_thread().map(drop),
        ThreadKind::Vsock => vsock_thread(dir).map(drop),
        // The log relay (part of the fs back end) needs nothing but the two fds it holds.
        ThreadKind::Vcpu | ThreadKind::Net | ThreadKind::LogRelay => {
            own_root(None).and_then(|()| become_unprivileged().map(drop))
        }
    };
    jailed.map(|()| Confine::Fully).map_err(|e| e.to_string())
}

/// Whether the built-in VMM's thread `kind` is confined (jail, capabilities, seccomp) under
/// `halves`: vCPU and virtio-net threads are the VMM's half, the rest the back ends'.
pub fn confines(halves: super::Halves, kind: ThreadKind) -> bool {
    match kind {
        ThreadKind::Vcpu | ThreadKind::Net => halves.vmm,
        ThreadKind::Fs | ThreadKind::Vsock | ThreadKind::LogRelay => halves.backends,
    }
}

/// The jail of a vsock back-end thread (the built-in VMM's `vsock-io`, the QEMU path's
/// vhost-user one): `dir`, the directory of its hybrid socket where it connects guest
/// connections to `<uds>_<port>`, is given to the thread's own gid (owner root, group that
/// gid, mode 0750: only that uid and root reach what is in it, so the sockets there need no
/// mode of their own; nobody but root writes there, which the pool's trust check of a VM's
/// directory asks for), then the thread gets a root holding only that directory, read-only
/// ([`own_root`]), and that uid and gid without capabilities ([`become_unprivileged`]).
/// Returns the uid.
pub fn vsock_thread(dir: Option<&Path>) -> io::Result<u32> {
    let id = thread_id();
    if let Some(dir) = dir {
        let c = cstr(dir)?;
        // SAFETY: chown(2) and chmod(2) with a NUL-terminated path.
        check("give the socket directory to the vsock thread", unsafe {
            libc::chown(c.as_ptr(), 0, id)
        })?;
        // SAFETY: as above.
        check("restrict the socket directory", unsafe {
            libc::chmod(c.as_ptr(), 0o750)
        })?;
    }
    own_root(dir.map(|d| (d, false)))?;
    become_unprivileged()
}

/// The identity of a virtio-fs back-end thread (the built-in VMM's `virtiofs-io`, the QEMU
/// path's vhost-user one): its own unprivileged uid and gid, keeping exactly
/// [`super::thread::FS_CAPS`] (permitted, effective and bounding): ownership pass-through
/// makes each new file with the guest caller's fs uid and gid (`rootcell_fs`' `creds`), which
/// needs CAP_SETUID and CAP_SETGID, and reads and writes whatever the guest's root may, which
/// needs the DAC capabilities. Its root (the share) is set up before. Returns the uid.
pub fn fs_thread() -> io::Result<u32> {
    become_unprivileged_keeping(super::thread::FS_CAPS)
}

/// `UID_BASE` + the calling thread's id.
fn thread_id() -> u32 {
    // SAFETY: gettid(2) takes nothing.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    super::UID_BASE + tid
}

fn check(what: &'static str, rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

fn remount(what: &'static str, path: &std::ffi::CStr, writable: bool) -> io::Result<()> {
    let mut flags =
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if !writable {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: mount(2) with a NUL-terminated path and null pointers.
    check(what, unsafe {
        libc::mount(
            std::ptr::null(),
            path.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

/// Gives the calling thread a file system context and mount namespace of its own whose root
/// is a small read-only tmpfs holding nothing, or only `keep`'s directory (at the same path;
/// writable or not, always nosuid, nodev, noexec). The process's other threads keep theirs.
/// Needs CAP_SYS_ADMIN; call before dropping capabilities.
pub fn own_root(keep: Option<(&Path, bool)>) -> io::Result<()> {
    let keep = keep
        .map(|(dir, writable)| -> io::Result<_> {
            let rel = dir.strip_prefix("/").map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not absolute", dir.display()),
                )
            })?;
            Ok((cstr(dir)?, rel.to_path_buf(), writable))
        })
        .transpose()?;
    // SAFETY: unshare(2) with flags only; affects this thread's fs context and namespaces.
    check("unshare(CLONE_FS|CLONE_NEWNS)", unsafe {
        libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS)
    })?;
    // SAFETY: mount(2) with a NUL-terminated path and null pointers: nothing propagates
    // between this namespace and the sandbox's.
    check("make the mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    // The kept directory as a detached bind, taken before the tmpfs covers anything.
    let tree = match &keep {
        Some((dir, _, _)) => {
            // SAFETY: open_tree(2) with a NUL-terminated path; returns a new fd or -1.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    dir.as_ptr(),
                    OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
                )
            } as libc::c_int;
            check("clone the kept directory", fd)?;
            // SAFETY: a fresh fd nothing else owns.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        None => None,
    };
    // The new root covers /proc in this namespace (a directory every host running us has;
    // nothing of it is needed here afterwards).
    // SAFETY: mount(2) with NUL-terminated strings.
    check("mount the new root", unsafe {
        libc::mount(
            c"rootcell-thread-root".as_ptr(),
            c"/proc".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"size=16k,nr_inodes=64,mode=0755".as_ptr().cast(),
        )
    })?;
    // SAFETY: chdir(2) with a NUL-terminated path: onto the tmpfs just mounted there.
    check("chdir into the new root", unsafe {
        libc::chdir(c"/proc".as_ptr())
    })?;
    if let (Some((_, rel, writable)), Some(tree)) = (&keep, &tree) {
        std::fs::create_dir_all(rel).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("make {} in the new root: {e}", rel.display()),
            )
        })?;
        let rel_c = cstr(rel)?;
        // SAFETY: move_mount(2) of the detached tree (empty path) onto a NUL-terminated path.
        check("attach the kept directory", unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                rel_c.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        } as libc::c_int)?;
        remount("restrict the kept directory", &rel_c, *writable)?;
    }
    remount("make the new root read-only", c".", false)?;
    // pivot_root(".", "."): the old root lands on top of the new one and is detached there.
    // SAFETY: pivot_root(2) with NUL-terminated paths.
    check("pivot_root into the new root", unsafe {
        libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int
    })?;
    // SAFETY: umount2(2) with a NUL-terminated path; the namespace is private.
    check("detach the old root", unsafe {
        libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
    })?;
    // SAFETY: chdir(2) with a NUL-terminated path.
    check("chdir to the new root", unsafe {
        libc::chdir(c"/".as_ptr())
    })
}

/// Gives the calling thread (only it: raw system calls, not libc's process-wide wrappers) the
/// identity [`super::UID_BASE`] + its thread id as uid and gid, no supplementary groups, and
/// an empty bounding set (dropped first: that needs CAP_SETPCAP, which the change of uid then
/// takes with every other permitted and effective capability). Returns the id.
pub fn become_unprivileged() -> io::Result<u32> {
    become_unprivileged_keeping(&[])
}

/// [`become_unprivileged`], except that `keep` stays in the bounding, permitted and effective
/// sets (PR_SET_KEEPCAPS across the change of uid, then the effective set raised again, which
/// a change of uid from 0 empties). Nothing is inheritable or ambient.
pub fn become_unprivileged_keeping(keep: &[caps::Capability]) -> io::Result<u32> {
    let id = thread_id();
    let kept: u64 = keep.iter().fold(0, |m, c| m | c.bitmask());
    for cap in 0..64u64 {
        if kept & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl(2) with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("dropping the bounding set: {e}"),
                ));
            }
        }
    }
    // SAFETY: prctl(2) with integer arguments.
    check("clearing ambient capabilities", unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    // Per thread: the flag lives in the thread's credentials.
    // SAFETY: prctl(2) with integer arguments.
    check("keeping capabilities across the change of uid", unsafe {
        libc::prctl(libc::PR_SET_KEEPCAPS, u64::from(!keep.is_empty()), 0, 0, 0)
    })?;
    // SAFETY: the raw system calls act on this thread's credentials only; no memory passed
    // (an empty group list is a null pointer with size 0).
    unsafe {
        check(
            "setgroups",
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) as libc::c_int,
        )?;
        check(
            "setresgid",
            libc::syscall(libc::SYS_setresgid, id, id, id) as libc::c_int,
        )?;
        check(
            "setresuid",
            libc::syscall(libc::SYS_setresuid, id, id, id) as libc::c_int,
        )?;
    }
    if !keep.is_empty() {
        // SAFETY: prctl(2) with integer arguments.
        check("resetting keep-capabilities", unsafe {
            libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0)
        })?;
        let keep: caps::CapsHashSet = keep.iter().copied().collect();
        let fail = |e: caps::errors::CapsError| io::Error::other(format!("capabilities: {e}"));
        // Permitted first (it only shrinks), then effective within it.
        caps::clear(None, caps::CapSet::Inheritable).map_err(fail)?;
        caps::set(None, caps::CapSet::Permitted, &keep).map_err(fail)?;
        caps::set(None, caps::CapSet::Effective, &keep).map_err(fail)?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::Halves;

    /// `ROOTCELL_JAIL` turns a thread's seccomp filter off with the rest of its confinement,
    /// by half: which of the built-in VMM's threads stay confined under each setting (the
    /// control threads and QEMU's `-sandbox` follow the VMM's half).
    #[test]
    fn rootcell_jail_turns_filters_off_with_their_half() {
        use ThreadKind::*;
        let all = [Vcpu, Net, Fs, Vsock, LogRelay];
        let confined = |setting: Option<&str>| -> Vec<ThreadKind> {
            let halves = Halves::from_setting(setting);
            all.into_iter().filter(|&k| confines(halves, k)).collect()
        };
        assert_eq!(confined(None), all);
        assert_eq!(confined(Some("1")), all);
        assert_eq!(confined(Some("0")), []);
        assert_eq!(confined(Some("qemu")), [Vcpu, Net]);
        assert_eq!(confined(Some("backends")), [Fs, Vsock, LogRelay]);
        let vmm = |setting| Halves::from_setting(setting).vmm;
        assert!(vmm(None) && vmm(Some("qemu")));
        assert!(!vmm(Some("0")) && !vmm(Some("backends")));
    }

    fn field(status: &str, name: &str) -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    #[test]
    fn a_vcpu_like_thread_ends_unprivileged_in_an_empty_root_and_the_rest_is_untouched() {
        if !rootcell_test_support::require_root("vmm thread jail") {
            return;
        }
        let pid = std::process::id();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let r = vmm_thread(ThreadKind::Vcpu, None)
                .and_then(|_| rootcell_vmm::seccomp::keep_caps(&[]).map_err(|e| e.to_string()));
            // The jail's cost per thread (namespace copy, tmpfs, pivot, identity).
            eprintln!("vCPU-like thread jailed in {:?}", started.elapsed());
            // SAFETY: gettid(2) takes nothing.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
            let listing: Vec<_> = std::fs::read_dir("/")
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            tx.send((r, tid, listing)).unwrap();
            let _ = done_rx.recv();
        });
        let (r, tid, listing) = rx.recv().unwrap();
        r.expect("jail");
        assert!(listing.is_empty(), "the thread's root lists {listing:?}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        let want = (super::super::UID_BASE + tid).to_string();
        for f in ["Uid", "Gid"] {
            assert_eq!(field(&status, f), [want.as_str(); 4].join("\t"), "{status}");
        }
        assert_eq!(field(&status, "Groups"), "");
        for c in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
            assert_eq!(field(&status, c), "0000000000000000", "{c}: {status}");
        }
        let ns = |t: u32| std::fs::read_link(format!("/proc/{pid}/task/{t}/ns/mnt")).unwrap();
        assert_ne!(
            ns(tid),
            ns(pid),
            "the thread kept the process's mount namespace"
        );
        // The rest of the process keeps root, its capabilities and the host's root.
        let main = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(field(&main, "Uid").starts_with("0\t"), "{main}");
        assert!(std::path::Path::new("/proc/self").exists());
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_vsock_like_thread_sees_only_its_socket_directory_as_its_own_uid() {
        if !rootcell_test_support::require_root("vsock thread root") {
            return;
        }
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        // As the DNS relay makes its sockets: open to whoever reaches the directory.
        let sock = dir.path().join("vsock.sock_1024");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        // A socket of root's own mode.
        let roots = dir.path().join("vsock.sock_1025");
        let _roots = std::os::unix::net::UnixListener::bind(&roots).unwrap();
        std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let r = (|| {
                let started = std::time::Instant::now();
                let id = vsock_thread(Some(&d))?;
                eprintln!("vsock-like thread jailed in {:?}", started.elapsed());
                rootcell_vmm::seccomp::keep_caps(&[])
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let top: Vec<_> = std::fs::read_dir("/")?
                    .flatten()
                    .map(|e| e.file_name())
                    .collect();
                let conn = std::os::unix::net::UnixStream::connect(d.join("vsock.sock_1024"));
                let root_conn = std::os::unix::net::UnixStream::connect(d.join("vsock.sock_1025"))
                    .map_err(|e| e.raw_os_error());
                let outside = std::fs::metadata("/etc/passwd").is_ok();
                Ok::<_, io::Error>((id, top, conn.is_ok(), root_conn.err(), outside))
            })();
            tx.send(r).unwrap();
            // Alive while its status is read.
            let _ = done_rx.recv();
        });
        let (id, top, conn, root_conn, outside) = rx.recv().unwrap().expect("vsock thread jail");
        let tid = id - super::super::UID_BASE;
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(
            (super::super::UID_BASE..super::super::UID_BASE + super::super::UID_RANGE)
                .contains(&id)
        );
        for f in ["Uid", "Gid"] {
            assert_eq!(
                field(&status, f),
                vec![id.to_string(); 4].join("\t"),
                "{status}"
            );
        }
        for c in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
            assert_eq!(field(&status, c), "0000000000000000", "{c}: {status}");
        }
        let meta = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (0, id, 0o750)
        );
        let first = dir.path().iter().nth(1).unwrap().to_os_string();
        assert_eq!(top, vec![first], "the thread's root");
        assert!(conn, "connecting to a socket in its directory failed");
        assert_eq!(
            root_conn,
            Some(Some(libc::EACCES)),
            "connected to root's own socket"
        );
        assert!(!outside, "/etc/passwd is visible from the thread");
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_ok());
    }

    #[test]
    fn an_fs_like_thread_is_unprivileged_but_keeps_the_ownership_capabilities() {
        if !rootcell_test_support::require_root("fs thread identity") {
            return;
        }
        let (status, setresuid, fsuid_root) = std::thread::spawn(|| {
            let started = std::time::Instant::now();
            fs_thread().unwrap();
            eprintln!("fs-like thread's identity taken in {:?}", started.elapsed());
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            // SAFETY: raw credential calls on this thread only; no memory passed.
            unsafe {
                let setresuid = libc::syscall(libc::SYS_setresuid, 0, 0, 0);
                // The fs uid may go to root's and back (what a root caller's request needs).
                libc::syscall(libc::SYS_setfsuid, 0);
                let fsuid_root = libc::syscall(libc::SYS_setfsuid, u32::MAX) == 0;
                libc::syscall(libc::SYS_setfsuid, libc::getuid());
                (status, setresuid, fsuid_root)
            }
        })
        .join()
        .unwrap();
        let uid = field(&status, "Uid");
        let id: u32 = uid.split('\t').next().unwrap().parse().unwrap();
        assert!(id >= super::super::UID_BASE, "{status}");
        assert_eq!(uid, vec![id.to_string(); 4].join("\t"));
        assert_eq!(field(&status, "Gid"), uid);
        assert_eq!(field(&status, "Groups"), "");
        let want = format!(
            "{:016x}",
            super::super::thread::FS_CAPS
                .iter()
                .fold(0u64, |m, c| m | c.bitmask())
        );
        for c in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(field(&status, c), want, "{c}: {status}");
        }
        for c in ["CapInh", "CapAmb"] {
            assert_eq!(field(&status, c), "0000000000000000", "{c}: {status}");
        }
        // It keeps CAP_SETUID, which setresuid honours: in the back end the seccomp filter
        // (not installed here) refuses setresuid (see jail::thread's tests).
        assert_eq!(setresuid, 0, "CAP_SETUID kept");
        assert!(
            fsuid_root,
            "the fs uid could not become root's for a request"
        );
    }
}
