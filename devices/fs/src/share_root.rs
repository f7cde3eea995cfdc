//! A mount namespace for the serving threads whose root holds the share and nothing of the
//! host's, so a back end that is made to run code or misled by a request (a bug in the FUSE
//! path) finds no host file system to reach: not by path, not by `..`.
//!
//! A thread may have a file system context (root, cwd) and mount namespace of its own
//! (`unshare(CLONE_FS | CLONE_NEWNS)`), and every thread it starts afterwards shares them, so
//! the serving thread sets this up before it starts the threads that handle guest requests. The
//! rest of the process keeps the namespace it had.
//!
//! The new root is a small read-only tmpfs holding two mounts: the share at `/share`, and this
//! process's `/proc/<pid>/fd` at `/proc/self/fd`. The second is there because the passthrough
//! sets and reads extended attributes through the absolute path `/proc/self/fd/<fd>` (an
//! `O_PATH` fd admits no f*xattr call); it gives nothing the passthrough does not hold already
//! (its handle on `/proc/self/fd`, through which it reopens every inode), and the guest cannot
//! name it: its requests start from the share's root, and `..` there is the root itself.
//!
//! With an fd table of its own ([`crate::fd_table`], [`enter_with_own_fds`]), the thread's
//! `/proc/self/fd` is its own fd directory (`/proc/thread-self/fd`) and its
//! `/proc/self/mountinfo` its own, so what the passthrough can reopen is only what the back
//! end's threads hold (the share's inodes, their sockets and eventfds), not the rest of the
//! process's files (its logs, the container's stdio files). The passthrough is then opened
//! after [`pivot`], by the same absolute paths.
//!
//! Otherwise two steps, because the passthrough must be opened in between: it opens
//! `/proc/self/fd` and `/proc/self/mountinfo` by path.
//!
//! 1. [`enter`]: new namespace, every mount made a slave, the new root built (over the share's
//!    own path, which this namespace no longer needs) and made the working directory. The
//!    share is bound from the caller's mount of it: a slave of it, not a private copy, which
//!    is what lets mounts attached to the share later in the caller's namespace (a container
//!    joining the VM, attached under `.rootcell/c/<id>/`) appear here too, provided the caller
//!    made the share a shared mount; nothing done here propagates back.
//! 2. [`pivot`]: `pivot_root(".", ".")` and the old root detached.
//!
//! The passthrough is opened between the two with the share path [`SHARE_PATH`], relative,
//! which names the share before and after the pivot, so FUSE_INIT (which opens the root again
//! by that path) still finds it.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

// The new mount API's flags (linux/mount.h).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// The share path to open the passthrough with between [`enter`] and [`pivot`].
pub const SHARE_PATH: &str = "share";

fn check(what: &'static str, rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "share path holds a NUL byte"))
}

fn mount(
    what: &'static str,
    src: Option<&CStr>,
    dst: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: mount(2) with NUL-terminated strings or null pointers.
    check(what, unsafe {
        libc::mount(ptr(src), dst.as_ptr(), ptr(fstype), flags, ptr(data).cast())
    })
}

/// The flags that make a bind mount read-only, nosuid, nodev and noexec.
const READ_ONLY_REMOUNT: libc::c_ulong = libc::MS_REMOUNT
    | libc::MS_BIND
    | libc::MS_RDONLY
    | libc::MS_NOSUID
    | libc::MS_NODEV
    | libc::MS_NOEXEC;

/// Binds `src` onto `dst`, then makes that bind read-only, nosuid, nodev and noexec; `what`
/// names the two steps for errors.
fn bind_read_only(what: [&'static str; 2], src: &CStr, dst: &CStr) -> io::Result<()> {
    mount(what[0], Some(src), dst, None, libc::MS_BIND, None)?;
    mount(what[1], None, dst, None, READ_ONLY_REMOUNT, None)
}

/// Opens `path` as an `O_PATH` directory fd.
fn open_path(what: &'static str, path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: open(2) with a NUL-terminated path; the fd is owned from here on.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(what, fd)?;
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the file `path` as an `O_PATH` fd.
fn open_file_path(what: &'static str, path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: open(2) with a NUL-terminated path; the fd is owned from here on.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    check(what, fd)?;
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_path(fd: &OwnedFd) -> CString {
    // The calling thread's table: with an fd table of its own, `/proc/self/fd` would be the
    // process's (the main thread's), where the number means something else.
    CString::new(format!("/proc/thread-self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// Step 1 on the calling thread: a file system context and mount namespace of its own, all
/// mounts slaves of the caller's, the new root (see the module) built and made the working
/// directory. Needs CAP_SYS_ADMIN; call before dropping capabilities.
pub fn enter(share: &Path) -> io::Result<()> {
    enter_with(share, FdView::Process)
}

/// [`enter`] for a thread with an fd table of its own ([`crate::fd_table`]): the new root's
/// `/proc/self/fd` is the thread's own fd directory (`/proc/thread-self/fd`), not the
/// process's, and `/proc/self/mountinfo` is there too (the thread's), so the passthrough is
/// opened after [`pivot`], by the same paths, and reopens its inodes through its own table:
/// nothing the rest of the process holds is reachable through it.
pub fn enter_with_own_fds(share: &Path) -> io::Result<()> {
    enter_with(share, FdView::Thread)
}

/// Whose fd directory the new root's `/proc/self/fd` is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FdView {
    /// The process's (`/proc/self/fd`): the passthrough is opened before the pivot.
    Process,
    /// The calling thread's (`/proc/thread-self/fd`), plus its mountinfo.
    Thread,
}

fn enter_with(share: &Path, view: FdView) -> io::Result<()> {
    let share = cstr(share)?;
    // SAFETY: unshare(2) with flags only; affects this thread's fs context and namespaces.
    check("unshare(CLONE_FS|CLONE_NEWNS)", unsafe {
        libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS)
    })?;
    mount(
        "make the mounts slaves",
        None,
        c"/",
        None,
        libc::MS_REC | libc::MS_SLAVE,
        None,
    )?;
    // Held before the tmpfs covers the share's path. With `FdView::Process`, `/proc/self` is
    // the process, not the thread, as the passthrough's paths mean it.
    // The share as a detached copy (a bind through its fd's /proc path would cross into the
    // tmpfs that covers it by then): with its submounts, and a slave of what it copies.
    // SAFETY: open_tree(2) with a NUL-terminated path; returns a new fd or -1.
    let share_tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            share.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint,
        )
    } as libc::c_int;
    check("clone the share's mounts", share_tree)?;
    // SAFETY: a fresh fd nothing else owns.
    let share_tree = unsafe { OwnedFd::from_raw_fd(share_tree) };
    let proc_fd = match view {
        FdView::Process => open_path("open /proc/self/fd", c"/proc/self/fd")?,
        FdView::Thread => open_path("open /proc/thread-self/fd", c"/proc/thread-self/fd")?,
    };
    let mountinfo = match view {
        FdView::Process => None,
        FdView::Thread => Some(open_file_path(
            "open /proc/thread-self/mountinfo",
            c"/proc/thread-self/mountinfo",
        )?),
    };
    mount(
        "mount the new root",
        Some(c"tmpfs"),
        &share,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(c"size=16k,mode=0755"),
    )?;
    // SAFETY: chdir(2) with a NUL-terminated path: into the new root (the top mount there).
    check("chdir into the new root", unsafe {
        libc::chdir(share.as_ptr())
    })?;
    for dir in [c"share", c"proc", c"proc/self", c"proc/self/fd"] {
        // SAFETY: mkdir(2) with a NUL-terminated path relative to the new root.
        check("make the new root's directories", unsafe {
            libc::mkdir(dir.as_ptr(), 0o755)
        })?;
    }
    // The bind of a slave is a slave of the same master: it receives later mounts.
    // SAFETY: move_mount(2) of the detached tree (empty path) onto a NUL-terminated path.
    check("attach the share", unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            share_tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c"share".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    } as libc::c_int)?;
    // Read-only, nodev and so on like the rest: an xattr call through one of its links acts
    // on the file the link names, on that file's mount.
    bind_read_only(
        ["bind /proc/self/fd", "make /proc/self/fd read-only"],
        &fd_path(&proc_fd),
        c"proc/self/fd",
    )?;
    if let Some(mountinfo) = &mountinfo {
        // SAFETY: open(2) with a NUL-terminated relative path: an empty file to mount on.
        let fd = unsafe {
            libc::open(
                c"proc/self/mountinfo".as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                0o444,
            )
        };
        check("make the mountinfo mount point", fd)?;
        // SAFETY: a fresh fd nothing else owns; closed at once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        bind_read_only(
            [
                "bind /proc/self/mountinfo",
                "make /proc/self/mountinfo read-only",
            ],
            &fd_path(mountinfo),
            c"proc/self/mountinfo",
        )?;
    }
    mount(
        "make the new root read-only",
        None,
        c".",
        None,
        READ_ONLY_REMOUNT,
        None,
    )
}

/// Step 2: makes the new root (the working directory since [`enter`]) this thread's root and
/// detaches everything else from its namespace.
pub fn pivot() -> io::Result<()> {
    // pivot_root(".", "."): the old root ends up mounted on top of the new one, and is then
    // detached from there; no directory for it is needed.
    // SAFETY: pivot_root(2) with NUL-terminated paths; no memory is passed.
    check("pivot_root into the new root", unsafe {
        libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int
    })?;
    // SAFETY: umount2(2) with a NUL-terminated path. The old root is a slave: nothing
    // propagates back to the caller's namespace.
    check("detach the old root", unsafe {
        libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
    })?;
    // SAFETY: chdir(2) with a NUL-terminated path.
    check("chdir to the new root", unsafe {
        libc::chdir(c"/".as_ptr())
    })
}
