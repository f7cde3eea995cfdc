//! Unit tests of the allowlists: what each filter lets through and what it refuses, on
//! threads confined by it.

use super::*;

#[test]
fn filters_compile() {
    assert!(vcpu_filter(SeccompAction::KillProcess).unwrap().len() > COMMON.len());
    assert!(vmm_filter(SeccompAction::KillProcess).unwrap().len() > COMMON.len());
}

#[test]
fn vcpu_filter_denies_what_it_does_not_list() {
    // Run in a throwaway thread: filters cannot be removed once installed.
    let t = std::thread::spawn(|| {
        apply(&vcpu_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap()).unwrap();
        // SAFETY: plain syscalls with no pointers that outlive the call.
        let (open_rc, errno) = unsafe {
            let rc = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            (rc, *libc::__errno_location())
        };
        // A listed syscall still works.
        // SAFETY: getpid has no memory effects.
        let pid = unsafe { libc::getpid() };
        (open_rc, errno, pid)
    });
    let (rc, errno, pid) = t.join().unwrap();
    assert_eq!((rc, errno), (-1, libc::EPERM), "socket(2) must be refused");
    assert_eq!(pid, std::process::id() as i32);
}

#[test]
fn unlisted_ioctl_is_denied() {
    let t = std::thread::spawn(|| {
        apply(&vcpu_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap()).unwrap();
        // SAFETY: winsize is plain data.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into `ws`.
        let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
        (rc, std::io::Error::last_os_error().raw_os_error())
    });
    assert_eq!(t.join().unwrap(), (-1, Some(libc::EPERM)));
}

/// Runs `f` on a throwaway thread confined by `filter` (errors instead of kills).
fn confined<T: Send + 'static>(
    filter: fn(SeccompAction) -> Result<BpfProgram>,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        apply(&filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap()).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn socket(domain: libc::c_int) -> Option<i32> {
    // SAFETY: plain syscalls; a returned fd is closed at once.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd >= 0 {
            libc::close(fd);
            return None;
        }
    }
    std::io::Error::last_os_error().raw_os_error()
}

fn open_root() -> Option<i32> {
    let r = std::fs::File::open("/");
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn device_filters_allow_their_back_ends_and_nothing_more() {
    // vsock: unix sockets yes, network sockets and files no, not even removing one (its
    // socket file is removed by whoever drops the device).
    let r = confined(vsock_io_filter, || {
        let unlink = std::fs::remove_file("/nonexistent-rootcell-test")
            .err()
            .and_then(|e| e.raw_os_error());
        (
            socket(libc::AF_UNIX),
            socket(libc::AF_INET),
            open_root(),
            unlink,
        )
    });
    // (Opens get EACCES from every filter that does not list them: see refuse_opens.)
    assert_eq!(
        r,
        (
            None,
            Some(libc::EPERM),
            Some(libc::EACCES),
            Some(libc::EPERM)
        )
    );
    // fs: files yes, sockets no.
    let r = confined(fs_io_filter, || (open_root(), socket(libc::AF_UNIX)));
    assert_eq!(r, (None, Some(libc::EPERM)));
    // net: neither.
    let r = confined(net_io_filter, || (open_root(), socket(libc::AF_UNIX)));
    assert_eq!(r, (Some(libc::EACCES), Some(libc::EPERM)));
    // No device thread may start a program.
    for f in [net_io_filter, vsock_io_filter, fs_io_filter] {
        let rc = confined(f, || {
            // SAFETY: execve with a valid path and empty argv/envp; fails under the filter.
            let argv: [*const libc::c_char; 2] = [c"/bin/true".as_ptr(), std::ptr::null()];
            let envp: [*const libc::c_char; 1] = [std::ptr::null()];
            // SAFETY: see above.
            let rc = unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            (rc, std::io::Error::last_os_error().raw_os_error())
        });
        assert_eq!(rc, (-1, Some(libc::EPERM)));
    }
}

#[test]
fn prlimit_is_allowed_only_on_the_thread_s_own_process() {
    let r = confined(fs_io_filter, || {
        // SAFETY: rlimit is plain data.
        let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: prlimit with a valid out pointer.
        let own = unsafe { libc::prlimit(0, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim) };
        // SAFETY: as above; pid 1 is refused by the filter.
        let other = unsafe { libc::prlimit(1, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim) };
        (own, other, std::io::Error::last_os_error().raw_os_error())
    });
    assert_eq!(r, (0, -1, Some(libc::EPERM)));
}

/// A filter's builder.
type Builder = fn(SeccompAction) -> Result<BpfProgram>;

/// Runs `call` in a forked child whose one thread is confined by `filter` with its real action
/// (KillProcess, as the VMM installs them); the child exits with what `call` returns. Returns
/// the child's wait status.
fn in_confined_child(filter: Builder, call: fn() -> i32) -> i32 {
    // Built before the fork: the child only installs it and calls.
    let filter = filter(SeccompAction::KillProcess).unwrap();
    // SAFETY: fork(2); the child makes only system calls (prctl and seccomp through `apply`,
    // the call, _exit) and returns to nothing of the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = if apply(&filter).is_ok() { call() } else { 99 };
        // SAFETY: _exit(2) ends the child without running anything of the parent's.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waitpid(2) on our child with a valid status pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

/// The filters' real action: a syscall a thread's list does not hold kills the whole process
/// with SIGSYS (the kernel's audit log names the call). Each case runs in a forked child,
/// which confines its one thread with the filter as a VMM thread does and then makes the call
/// (the vsock thread removing a file, the fs thread opening a socket, ...).
#[test]
fn an_unlisted_syscall_kills_the_process() {
    fn unlink() -> i32 {
        // SAFETY: unlink(2) with a NUL-terminated path.
        unsafe { libc::unlink(c"/nonexistent-rootcell-test".as_ptr()) }
    }
    fn unix_socket() -> i32 {
        // SAFETY: socket(2) with integer arguments.
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) }
    }
    // Not opens: those get EACCES (see `opening_a_file_is_refused_not_fatal_...`).
    type Case = (&'static str, Builder, fn() -> i32);
    let cases: [Case; 6] = [
        ("vsock unlink", vsock_io_filter, unlink),
        ("fs socket", fs_io_filter, unix_socket),
        ("net socket", net_io_filter, unix_socket),
        ("vcpu socket", vcpu_filter, unix_socket),
        ("control socket", control_filter, unix_socket),
        ("relay socket", relay_filter, unix_socket),
    ];
    for (what, filter, call) in cases {
        let status = in_confined_child(filter, call);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{what}: the child was not killed by SIGSYS (status {status:#x})"
        );
    }
}

#[test]
fn kvm_ioctl_numbers_match_their_structs() {
    let ior = |nr: u64, size: usize| (2 << 30) | ((size as u64) << 16) | (0xae << 8) | nr;
    assert_eq!(
        KVM_GET_REGS,
        ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>())
    );
    assert_eq!(
        KVM_GET_SREGS,
        ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>())
    );
    assert_eq!(
        KVM_GET_LAPIC,
        ior(0x8e, std::mem::size_of::<kvm_bindings::kvm_lapic_state>())
    );
}

/// With the filters' real action: glibc opens files on its own (malloc's first shrink of a
/// thread arena reads /proc/sys/vm/overcommit_memory), and a confined thread that does so
/// must get an error, not kill the VMM (which ended a Docker 26 container with 159 in the
/// nested lane). Every filter that does not list openat.
#[test]
fn opening_a_file_is_refused_not_fatal_under_every_filter_that_does_not_list_it() {
    fn opens() -> i32 {
        let mut refused = 0;
        // SAFETY: open(2)/openat(2) with NUL-terminated paths; a returned fd is closed.
        unsafe {
            for fd in [
                libc::open(c"/proc/sys/vm/overcommit_memory".as_ptr(), libc::O_RDONLY),
                libc::openat(libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY),
            ] {
                if fd >= 0 {
                    libc::close(fd);
                } else if *libc::__errno_location() == libc::EACCES {
                    refused += 1;
                }
            }
        }
        // 0: both refused with EACCES.
        2 - refused
    }
    let filters: [(&str, Builder); 5] = [
        ("vcpu", vcpu_filter),
        ("net", net_io_filter),
        ("vsock", vsock_io_filter),
        ("control", control_filter),
        ("relay", relay_filter),
    ];
    for (which, filter) in filters {
        let status = in_confined_child(filter, opens);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{which} filter: opens not refused with EACCES (status {status:#x}; SIGSYS is {})",
            libc::SIGSYS
        );
    }
}
