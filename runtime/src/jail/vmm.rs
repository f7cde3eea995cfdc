//! The built-in VMM's threads in jails of their own (issue 16). The built-in VMM runs as
//! threads of the sandbox process; each of its vCPU and device I/O threads enters this jail on
//! itself before it drops its capabilities and installs its seccomp filter (the VMM calls
//! [`vmm_thread`] through [`rootcell_vmm::jail`]).
//!
//! * vCPU and virtio-net threads: a root of their own holding nothing ([`own_root`]), and an
//!   unprivileged identity of their own ([`become_unprivileged`]): uid = gid =
//!   [`super::UID_BASE`] + the thread's id, no supplementary groups, an empty bounding set.
//!   They hold every fd they need (the vCPU's and VM's KVM fds, the tap) before.
//! * the vsock thread: a root holding only its socket directory (it connects guest
//!   connections to `<uds>_<port>` there by path, and removes the hybrid socket at the end), uid
//!   0 without capabilities, as the QEMU path's vsock back end: the sockets it connects to are
//!   the sandbox's, owned by root, and connecting needs write permission on them.
//! * the virtio-fs thread: nothing more here (it already serves from its share root, and keeps
//!   uid 0 because the passthrough switches to each caller's uid and back).
//!
//! What this does not give (and a process of its own would): the threads share the sandbox's
//! address space, so code run by a compromised vCPU thread could still rewrite the memory of
//! the sandbox's other threads, which keep root's capabilities. Seccomp (per thread) still
//! limits the system calls the compromised thread itself can make.

use rootcell_vmm::jail::ThreadKind;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// The new mount API's flags (linux/mount.h).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// The hook the built-in VMM's threads call (see the module text).
pub fn vmm_thread(kind: ThreadKind, dir: Option<&Path>) -> Result<(), String> {
    let r = match kind {
        ThreadKind::Fs => Ok(()),
        ThreadKind::Vsock if super::backends_enabled() => own_root(dir.map(|d| (d, true))),
        ThreadKind::Vcpu | ThreadKind::Net if super::qemu_enabled() => {
            own_root(None).and_then(|()| become_unprivileged().map(|_| ()))
        }
        _ => Ok(()),
    };
    r.map_err(|e| e.to_string())
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
    // SAFETY: gettid(2) takes nothing.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    let id = super::UID_BASE + tid;
    for cap in 0..64 {
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
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

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
                .and_then(|()| rootcell_vmm::seccomp::keep_caps(&[]).map_err(|e| e.to_string()));
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
    fn a_vsock_like_thread_sees_only_its_socket_directory() {
        if !rootcell_test_support::require_root("vsock thread root") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vsock.sock_1024");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let d = dir.path().to_path_buf();
        let r = std::thread::spawn(move || {
            own_root(Some((&d, true)))?;
            let top: Vec<_> = std::fs::read_dir("/")?
                .flatten()
                .map(|e| e.file_name())
                .collect();
            let conn = std::os::unix::net::UnixStream::connect(d.join("vsock.sock_1024"));
            let outside = std::fs::metadata("/etc/passwd").is_ok();
            Ok::<_, io::Error>((top, conn.is_ok(), outside))
        })
        .join()
        .unwrap()
        .expect("own root");
        let first = dir.path().iter().nth(1).unwrap().to_os_string();
        assert_eq!(r.0, vec![first], "the thread's root");
        assert!(r.1, "connecting to a socket in the kept directory failed");
        assert!(!r.2, "/etc/passwd is visible from the thread");
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_ok());
    }
}
