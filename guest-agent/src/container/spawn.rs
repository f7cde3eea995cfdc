//! Forking the setup processes: an outer child (C) that enters or creates namespaces, and the
//! process itself (G), forked by C so it lands inside the new pid namespace. C exits at once;
//! G is reparented to the agent (PID 1, or a child subreaper on a normal host).
//!
//! Only the outer fork happens in the multithreaded agent; glibc's `fork` resets its malloc
//! locks in the child, and the code below takes no other lock (logging is a raw write).

use super::error::SetupError;
use super::report::{self, Report};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::{fork, ForkResult};
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;

/// Stdio for a new process: sockets (or a pty slave) become its fds 0/1/2.
#[derive(Debug, Default)]
pub struct Stdio {
    /// Becomes fd 0 (else /dev/null).
    pub stdin: Option<OwnedFd>,
    /// Becomes fd 1 (else /dev/null).
    pub stdout: Option<OwnedFd>,
    /// Becomes fd 2 (else /dev/null).
    pub stderr: Option<OwnedFd>,
    /// A pty slave: the process's controlling terminal and fds 0/1/2 (overrides the others).
    pub terminal: Option<OwnedFd>,
    /// Path of the pty slave in the agent's /dev, bind-mounted as the container's /dev/console.
    pub console_path: Option<PathBuf>,
    /// With `terminal`: a unix socket on which the process hands the agent the master of a pty
    /// it opened in the container's own devpts; that pty then replaces `terminal`.
    pub pty_offer: Option<OwnedFd>,
}

/// A process whose setup succeeded and that waits for [`Prepared::release`] to exec.
#[derive(Debug)]
pub struct Prepared {
    /// Pid of the process in the agent's pid namespace.
    pub pid: i32,
    /// Pid of the short-lived outer setup process (already exiting; reap or ignore it).
    pub helper_pid: i32,
    release: OwnedFd,
}

impl Prepared {
    /// Lets the process exec its program. Dropping a `Prepared` instead makes it exit.
    pub fn release(self) -> std::io::Result<()> {
        let mut f = std::fs::File::from(self.release);
        f.write_all(b"s")
    }
}

/// The final step of a process: everything resolved, only fds and execve left.
pub(crate) struct ExecPlan {
    /// Absolute or cwd-relative program path.
    pub path: PathBuf,
    /// argv.
    pub args: Vec<String>,
    /// envp.
    pub env: Vec<String>,
    /// Set PR_SET_NO_NEW_PRIVS just before exec.
    pub no_new_privileges: bool,
}

/// The fds the forked process keeps, moved above the range a process normally uses.
pub(crate) struct ChildFds {
    /// Sources of fds 0, 1, 2.
    pub stdio: [RawFd; 3],
    /// The pty slave, if any.
    pub terminal: Option<RawFd>,
    /// The socket for a pty master opened in the container ([`Stdio::pty_offer`]).
    pub pty_offer: Option<RawFd>,
    report: RawFd,
    start: RawFd,
}

impl ChildFds {
    /// The report pipe (for errors after exec setup, e.g. from inner steps).
    pub fn report(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd stays open for the life of the child process.
        unsafe { BorrowedFd::borrow_raw(self.report) }
    }
}

/// Forks C; C runs `outer` (namespace entry) then forks G, which runs `inner` and waits.
pub(crate) fn spawn(
    stdio: Stdio,
    outer: impl FnOnce() -> Result<(), SetupError>,
    inner: impl FnOnce(&ChildFds) -> Result<ExecPlan, SetupError>,
) -> Result<Prepared, SetupError> {
    let (rep_r, rep_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| SetupError::other(format!("pipe: {e}")))?;
    let (start_r, start_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| SetupError::other(format!("pipe: {e}")))?;
    // SAFETY: the child only runs the setup code described in the module docs, then exits or execs.
    match unsafe { fork() } {
        Err(e) => Err(SetupError::other(format!("fork: {e}"))),
        Ok(ForkResult::Child) => {
            drop(rep_r);
            drop(start_w);
            outer_child(stdio, rep_w, start_r, outer, inner)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(rep_w);
            drop(start_r);
            drop(stdio);
            let outcome = report::collect(rep_r);
            match (outcome.pid, outcome.result) {
                (Some(pid), Ok(())) => Ok(Prepared {
                    pid,
                    helper_pid: child.as_raw(),
                    release: start_w,
                }),
                (pid, result) => {
                    // A process that reported but failed later must not wait for a release
                    // while we wait for it.
                    drop(start_w);
                    // Both setup processes are gone (the report pipe hit EOF): reap them here, as
                    // a zombie left in a pid namespace would keep that namespace's init from dying.
                    // The agent's reaper waits while a spawn holds its gate, so it cannot take
                    // these pids (and a pid cannot be reused under us); a process not yet
                    // reparented to us gives ECHILD here and the reaper collects it later.
                    reap(child.as_raw());
                    if let Some(pid) = pid {
                        reap(pid);
                    }
                    Err(result
                        .err()
                        .unwrap_or_else(|| SetupError::other("setup reported no pid")))
                }
            }
        }
    }
}

/// Waits for a finished child, ignoring "not our child" (someone else reaped it).
fn reap(pid: i32) {
    let _ = nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::__WALL),
    );
}

fn outer_child(
    stdio: Stdio,
    rep_w: OwnedFd,
    start_r: OwnedFd,
    outer: impl FnOnce() -> Result<(), SetupError>,
    inner: impl FnOnce(&ChildFds) -> Result<ExecPlan, SetupError>,
) -> ! {
    if let Err(e) = outer() {
        report::send_error(rep_w.as_fd(), &e);
        exit_now(1);
    }
    // SAFETY: C is single-threaded.
    match unsafe { fork() } {
        Err(e) => {
            report::send_error(rep_w.as_fd(), &SetupError::other(format!("fork: {e}")));
            exit_now(1)
        }
        Ok(ForkResult::Parent { child }) => {
            report::send(rep_w.as_fd(), &Report::Pid(child.as_raw()));
            exit_now(0)
        }
        Ok(ForkResult::Child) => inner_child(stdio, rep_w, start_r, inner),
    }
}

fn inner_child(
    stdio: Stdio,
    rep_w: OwnedFd,
    start_r: OwnedFd,
    inner: impl FnOnce(&ChildFds) -> Result<ExecPlan, SetupError>,
) -> ! {
    let fds = match prepare_fds(&stdio, &rep_w, &start_r) {
        Ok(f) => f,
        Err(e) => {
            report::send_error(rep_w.as_fd(), &e);
            exit_now(1)
        }
    };
    // The originals are duplicated above; close them so only the copies remain.
    std::mem::forget(stdio);
    std::mem::forget(rep_w);
    std::mem::forget(start_r);
    close_other_fds(&fds);
    reset_signals();
    let plan = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner(&fds))) {
        Ok(Ok(plan)) => plan,
        Ok(Err(e)) => {
            report::send_error(fds.report(), &e);
            exit_now(1)
        }
        Err(_) => {
            report::send_error(fds.report(), &SetupError::other("container setup panicked"));
            exit_now(1)
        }
    };
    report::send(fds.report(), &Report::Ready);
    let mut byte = [0u8; 1];
    loop {
        // SAFETY: reading into a local buffer from our own fd.
        let n = unsafe { libc::read(fds.start, byte.as_mut_ptr().cast(), 1) };
        if n == 1 {
            break;
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // The agent dropped the process before starting it.
        exit_now(1);
    }
    exec(&fds, plan)
}

/// Duplicates the fds the process needs to numbers >= 100 (CLOEXEC), opening /dev/null for
/// missing streams, so the dup2s onto 0/1/2 at exec time can never clobber a source.
fn prepare_fds(stdio: &Stdio, rep_w: &OwnedFd, start_r: &OwnedFd) -> Result<ChildFds, SetupError> {
    let high = |fd: RawFd| {
        fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(100))
            .map_err(|e| SetupError::other(format!("dup fd {fd}: {e}")))
    };
    let null = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| SetupError::other(format!("open /dev/null: {e}")))?;
    let pick = |fd: &Option<OwnedFd>| high(fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(null));
    let terminal = stdio
        .terminal
        .as_ref()
        .map(|t| high(t.as_raw_fd()))
        .transpose()?;
    let stdio_fds = match terminal {
        Some(t) => [t, t, t],
        None => [
            pick(&stdio.stdin)?,
            pick(&stdio.stdout)?,
            pick(&stdio.stderr)?,
        ],
    };
    let pty_offer = stdio
        .pty_offer
        .as_ref()
        .map(|o| high(o.as_raw_fd()))
        .transpose()?;
    Ok(ChildFds {
        stdio: stdio_fds,
        terminal,
        pty_offer,
        report: high(rep_w.as_raw_fd())?,
        start: high(start_r.as_raw_fd())?,
    })
}

/// Closes every fd >= 3 except the ones in `fds` and the log fd, so the process holds no copy
/// of another process's stream (which would delay its EOF).
fn close_other_fds(fds: &ChildFds) {
    let mut keep: Vec<RawFd> = fds.stdio.to_vec();
    keep.extend(fds.terminal);
    keep.extend(fds.pty_offer);
    keep.extend([fds.report, fds.start, crate::log::log_fd()]);
    keep.sort_unstable();
    keep.dedup();
    let mut next: u32 = 3;
    for k in keep.into_iter().filter(|&k| k >= 3) {
        if (k as u32) > next {
            close_range(next, k as u32 - 1);
        }
        next = k as u32 + 1;
    }
    close_range(next, u32::MAX);
}

fn close_range(first: u32, last: u32) {
    // SAFETY: close_range only closes fds of this process.
    unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
}

/// Restores default dispositions and an empty mask: ignored signals survive execve (Rust sets
/// SIGPIPE to ignored in the agent), and the program must start with the usual defaults.
fn reset_signals() {
    for sig in 1..libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: resetting dispositions in a single-threaded child.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

fn exec(fds: &ChildFds, plan: ExecPlan) -> ! {
    for (target, src) in fds.stdio.iter().enumerate() {
        // SAFETY: dup2 onto the standard fds; sources are >= 100.
        unsafe { libc::dup2(*src, target as RawFd) };
    }
    if plan.no_new_privileges {
        let _ = nix::sys::prctl::set_no_new_privs();
    }
    let cstr = |s: &str| CString::new(s.as_bytes()).unwrap_or_default();
    let path = CString::new(plan.path.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let args: Vec<CString> = plan.args.iter().map(|a| cstr(a)).collect();
    let env: Vec<CString> = plan.env.iter().map(|e| cstr(e)).collect();
    let err = nix::unistd::execve(&path, &args, &env).unwrap_err();
    let code = if err == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    };
    let msg = format!("rootcell: exec {}: {err}\n", plan.path.display());
    // SAFETY: writing a message to the process's stderr before exiting.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    exit_now(code)
}

/// Exits a forked child without running the parent's atexit handlers or destructors.
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is always safe.
    unsafe { libc::_exit(code) }
}
