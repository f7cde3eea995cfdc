//! Unit tests of the parent module: the confinement applied to a real thread (needs root).

use super::*;
use std::os::fd::AsRawFd;

fn status_field(name: &str) -> String {
    std::fs::read_to_string("/proc/thread-self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap()
}

fn mask(caps: &[Capability]) -> String {
    format!("{:016x}", caps.iter().fold(0u64, |m, c| m | c.bitmask()))
}

/// errno of `socket(domain, SOCK_STREAM)` (0 if it worked; the socket is closed).
fn socket_errno(domain: libc::c_int) -> i32 {
    // SAFETY: socket and close on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return *libc::__errno_location();
        }
        libc::close(fd);
        0
    }
}

/// errno of opening `path` read-only (0 if it worked).
fn open_errno(path: &std::ffi::CStr) -> i32 {
    // SAFETY: openat and close on a descriptor this function owns.
    unsafe {
        let fd = libc::openat(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return *libc::__errno_location();
        }
        libc::close(fd);
        0
    }
}

fn task_field(tid: i32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap()
}

#[test]
fn a_vsock_thread_keeps_no_capability_and_no_file_system_or_network() {
    use std::sync::mpsc::channel;
    let (tids_tx, tids_rx) = channel::<(i32, i32, [i32; 4])>();
    let (go_tx, go_rx) = channel::<()>();
    let confined = std::thread::spawn(move || {
        confine(Role::Vsock).unwrap();
        // SAFETY: gettid has no arguments and no effects.
        let me = unsafe { libc::gettid() };
        // A thread it starts afterwards inherits everything.
        let (child_tx, child_rx) = channel::<(i32, i32)>();
        let (child_go_tx, child_go_rx) = channel::<()>();
        let child = std::thread::spawn(move || {
            // SAFETY: as above.
            let tid = unsafe { libc::gettid() };
            child_tx.send((tid, socket_errno(libc::AF_INET))).unwrap();
            let _ = child_go_rx.recv();
        });
        let (child_tid, child_inet) = child_rx.recv().unwrap();
        let errnos = [
            socket_errno(libc::AF_UNIX),
            socket_errno(libc::AF_INET),
            open_errno(c"/etc/hostname"),
            child_inet,
        ];
        tids_tx.send((me, child_tid, errnos)).unwrap();
        let _ = go_rx.recv();
        child_go_tx.send(()).unwrap();
        child.join().unwrap();
    });
    let (me, child, errnos) = tids_rx.recv().unwrap();
    let zero = "0000000000000000";
    for tid in [me, child] {
        assert_eq!(task_field(tid, "Seccomp"), "2");
        assert_eq!(task_field(tid, "NoNewPrivs"), "1");
        for caps in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
            assert_eq!(task_field(tid, caps), zero, "{caps} of {tid}");
        }
    }
    go_tx.send(()).unwrap();
    confined.join().unwrap();
    assert_eq!(errnos[0], 0, "unix sockets stay allowed");
    assert_eq!(errnos[1], libc::EPERM, "an inet socket");
    assert_eq!(errnos[2], libc::EPERM, "opening a file");
    assert_eq!(
        errnos[3],
        libc::EPERM,
        "an inet socket from the thread it started"
    );
    // The test's own thread is untouched.
    assert_eq!(status_field("Seccomp"), "0");
}

#[test]
fn an_fs_thread_keeps_exactly_the_ownership_capabilities() {
    let out = std::thread::spawn(|| {
        confine(Role::Fs).unwrap();
        // SAFETY: raw credential calls on this thread only; no memory passed.
        let (setresuid, fsuid) = unsafe {
            let r = libc::syscall(libc::SYS_setresuid, 0, 0, 0);
            let e = *libc::__errno_location();
            // A request's fs uid and back (allowed).
            libc::syscall(libc::SYS_setfsuid, 1000);
            let fsuid = libc::syscall(libc::SYS_setfsuid, u32::MAX);
            libc::syscall(libc::SYS_setfsuid, libc::getuid());
            ((r, e), fsuid)
        };
        (
            status_field("Seccomp"),
            status_field("CapEff"),
            status_field("CapPrm"),
            status_field("CapBnd"),
            status_field("CapInh"),
            open_errno(c"/etc/hostname"),
            socket_errno(libc::AF_UNIX),
            status_field("Uid"),
            setresuid,
            fsuid,
        )
    })
    .join()
    .unwrap();
    // An unprivileged uid of the reserved range, which it cannot leave for root's.
    let uid: Vec<u32> = out
        .7
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uid[0] >= crate::jail::UID_BASE, "uid {uid:?}");
    assert_eq!(uid, vec![uid[0]; 4]);
    assert_eq!(out.8, (-1, libc::EPERM), "setresuid(0) from the fs thread");
    assert_eq!(out.9, 1000, "setfsuid for a request");
    let want = mask(FS_CAPS);
    assert_eq!(out.0, "2");
    assert_eq!(
        (out.1.as_str(), out.2.as_str(), out.3.as_str()),
        (want.as_str(), want.as_str(), want.as_str())
    );
    assert_eq!(out.4, "0000000000000000");
    assert_eq!(out.5, 0, "files stay allowed");
    assert_eq!(out.6, libc::EPERM, "no sockets for the fs thread");
}

/// execve from a confined thread kills the process: shown in a forked child (the filters are
/// compiled before the fork; the child only installs them and calls execve).
#[test]
fn execve_from_a_confined_thread_kills_the_process() {
    for role in [Role::Fs, Role::Vsock] {
        let filters = filters(role).unwrap();
        let progs: Vec<libc::sock_fprog> = filters
            .iter()
            .map(|f| libc::sock_fprog {
                len: f.len() as u16,
                filter: f.as_ptr() as *mut libc::sock_filter,
            })
            .collect();
        // SAFETY: the child makes only async-signal-safe system calls on data prepared
        // before the fork, then exits; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                for p in &progs {
                    if libc::syscall(libc::SYS_seccomp, 1, 0, p as *const libc::sock_fprog) != 0 {
                        libc::_exit(3);
                    }
                }
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(4);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{role:?}: the child was not killed by SIGSYS: status {status:#x}"
            );
        }
    }
}

/// The fs back end finds the VMM's connection by the listener's name so that a stop can shut
/// it down (`rootcell_fs`' vhost-user `conn`): getsockname is allowed on a confined fs thread
/// (it was not, and a stop found no connection to shut down).
#[test]
fn a_confined_fs_thread_may_name_its_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
    let fd = listener.as_raw_fd();
    let rc = std::thread::spawn(move || {
        confine(Role::Fs).unwrap();
        // SAFETY: sockaddr_un is plain data; getsockname writes at most `len` bytes into it.
        unsafe {
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let r = libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len);
            (r, *libc::__errno_location())
        }
    })
    .join()
    .unwrap();
    assert_eq!(
        rc.0, 0,
        "getsockname from a confined fs thread: errno {}",
        rc.1
    );
}
