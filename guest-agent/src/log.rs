//! Line logging to the console (the guest's serial port) with a fixed prefix.
//!
//! Each line is written with a single `write(2)` on a raw fd, without locks or buffering, so it
//! is safe in a child between `fork` and `execve` and lines of concurrent writers never mix.
//!
//! Logging never blocks for long: the console is opened non-blocking, a line waits at most
//! [`STALL_WAIT`] for room, and while the console stays full lines are dropped (and counted).
//! A serial console stops draining when the hypervisor's end of it stops taking bytes, or when
//! the guest kernel stops getting its transmit interrupts; the agent's threads (the reaper
//! among them) must go on reporting exits regardless.

use std::fs::OpenOptions;
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Prefix of every agent log line.
pub const PREFIX: &str = "rootcell-agent: ";

/// Where log lines go; stderr until [`log_to_console`] switches to /dev/console.
static LOG_FD: AtomicI32 = AtomicI32::new(2);
/// How long one line may wait for room on a full console.
pub const STALL_WAIT: Duration = Duration::from_millis(100);
/// Set while the console is full: lines are then dropped at once instead of waiting.
static STALLED: AtomicBool = AtomicBool::new(false);
/// Lines dropped since the console last took one.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Sends future log lines to /dev/console (used as PID 1, whose stderr may be unset).
pub fn log_to_console() {
    if let Ok(f) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/console")
    {
        let old = LOG_FD.swap(f.into_raw_fd(), Ordering::SeqCst);
        if old > 2 {
            // SAFETY: `old` was a console fd this module owned.
            unsafe { libc::close(old) };
        }
    }
}

/// The fd log lines go to.
pub fn log_fd() -> RawFd {
    LOG_FD.load(Ordering::Relaxed)
}

/// Writes one prefixed line to the log (dropped if the console stays full, see module docs).
pub fn write_line(msg: &str) {
    let dropped = DROPPED.load(Ordering::Relaxed);
    let mut line = String::with_capacity(PREFIX.len() + msg.len() + 48);
    if dropped > 0 {
        line.push_str(PREFIX);
        line.push_str(&format!("({dropped} log lines dropped: console full)\n"));
    }
    line.push_str(PREFIX);
    line.push_str(msg.trim_end_matches('\n'));
    line.push('\n');
    if write_all(log_fd(), line.as_bytes()) {
        if dropped > 0 {
            DROPPED.fetch_sub(dropped, Ordering::Relaxed);
        }
        STALLED.store(false, Ordering::Relaxed);
    } else {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes `buf` to a possibly non-blocking fd; false if it gave up on a full console.
fn write_all(fd: RawFd, mut buf: &[u8]) -> bool {
    let mut deadline: Option<Instant> = None;
    while !buf.is_empty() {
        // SAFETY: writing an initialised buffer to a raw fd.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n > 0 {
            buf = &buf[n as usize..];
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) if n < 0 => continue,
            Some(libc::EAGAIN) if n < 0 => {
                // A line already started is finished (bounded); a new one on a console known
                // to be full is dropped at once.
                if STALLED.load(Ordering::Relaxed) && deadline.is_none() {
                    return false;
                }
                let end = *deadline.get_or_insert_with(|| Instant::now() + STALL_WAIT);
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    STALLED.store(true, Ordering::Relaxed);
                    return false;
                }
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: poll on one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
            }
            _ => return false,
        }
    }
    true
}

/// Logs a formatted line with the agent prefix.
#[macro_export]
macro_rules! alog {
    ($($arg:tt)*) => { $crate::log::write_line(&format!($($arg)*)) };
}
