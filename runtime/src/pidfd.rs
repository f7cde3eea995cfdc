//! Process handles that survive pid reuse (pidfd_open(2)): the pool's holders watch their
//! server and claimant, and a claimant its holder, none of which is the watcher's child.
//! Written by hand: two syscalls and poll(2), which nix does not wrap.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A handle on a process.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: i32,
}

impl Pidfd {
    /// Opens `pid`, and checks that it is still the process that started at `start` (clock
    /// ticks since boot, as in [`crate::state::proc_stat`]) unless `start` is 0.
    pub fn open(pid: i32, start: u64) -> std::io::Result<Pidfd> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the fd was just returned to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if start != 0 && crate::state::proc_stat(pid).map(|s| s.0) != Some(start) {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(Pidfd { fd, pid })
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits up to `timeout` (forever with `None`) for the process to exit; true if it has.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: poll(2) on one pollfd that lives for the call.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return r > 0;
        }
    }

    /// Whether the process has exited.
    pub fn exited(&self) -> bool {
        self.wait(Some(Duration::ZERO))
    }

    /// Sends `signal` to the process (never to a later process with the same pid).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with our fd, no siginfo and no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_fd().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_process_exit_and_refuses_a_reused_pid() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = crate::state::proc_stat(pid).unwrap().0;
        let p = Pidfd::open(pid, start).unwrap();
        assert!(!p.exited());
        assert!(Pidfd::open(pid, start + 1).is_err());
        p.signal(libc::SIGKILL).unwrap();
        assert!(p.wait(Some(Duration::from_secs(10))));
        child.wait().unwrap();
    }
}
