//! Line logging to the console (the guest's serial port) with a fixed prefix.
//!
//! Each line is written with a single `write(2)` on a raw fd, without locks or buffering, so it
//! is safe in a child between `fork` and `execve` and lines of concurrent writers never mix.

use std::fs::OpenOptions;
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicI32, Ordering};

/// Prefix of every agent log line.
pub const PREFIX: &str = "rootcell-agent: ";

/// Where log lines go; stderr until [`log_to_console`] switches to /dev/console.
static LOG_FD: AtomicI32 = AtomicI32::new(2);

/// Sends future log lines to /dev/console (used as PID 1, whose stderr may be unset).
pub fn log_to_console() {
    if let Ok(f) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
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

/// Writes one prefixed line to the log.
pub fn write_line(msg: &str) {
    let mut line = String::with_capacity(PREFIX.len() + msg.len() + 1);
    line.push_str(PREFIX);
    line.push_str(msg.trim_end_matches('\n'));
    line.push('\n');
    let mut buf = line.as_bytes();
    while !buf.is_empty() {
        // SAFETY: writing an initialised buffer to a raw fd.
        let n = unsafe { libc::write(log_fd(), buf.as_ptr().cast(), buf.len()) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        buf = &buf[n as usize..];
    }
}

/// Logs a formatted line with the agent prefix.
#[macro_export]
macro_rules! alog {
    ($($arg:tt)*) => { $crate::log::write_line(&format!($($arg)*)) };
}
