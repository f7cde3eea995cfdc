//! How a running VM comes to an end: the first reason reported (by a device, a vCPU or the
//! owner) wins, and everyone waiting on it is woken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 pulse, `reboot=k`) — for a microVM, the end of its life.
    Reset,
    /// The guest shut down or triple-faulted (KVM_EXIT_SHUTDOWN) or halted with interrupts off.
    Shutdown,
    /// The owner stopped the VM.
    Stopped,
    /// A vCPU hit something it cannot continue from.
    Error {
        /// Which vCPU.
        cpu: u8,
        /// What happened (exit reason or ioctl error).
        message: String,
    },
}

/// The one-shot exit latch shared by devices, vCPU threads and the owner.
#[derive(Debug, Default)]
pub struct ExitLatch {
    set: AtomicBool,
    reason: Mutex<Option<VmExit>>,
    cond: Condvar,
}

impl ExitLatch {
    /// Records `exit` unless an earlier reason is already recorded; wakes waiters.
    pub fn request(&self, exit: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(exit);
            self.set.store(true, Ordering::Release);
            self.cond.notify_all();
        }
    }

    /// Whether a reason has been recorded (lock-free, for the vCPU loop).
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// The recorded reason, if any.
    pub fn get(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for a reason to be recorded.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        let deadline = Instant::now() + timeout;
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        while r.is_none() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            r = self
                .cond
                .wait_timeout(r, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        r.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_reason_wins_and_wakes_waiter() {
        let latch = Arc::new(ExitLatch::default());
        assert_eq!(latch.wait_timeout(Duration::from_millis(10)), None);
        let l2 = latch.clone();
        let t = std::thread::spawn(move || l2.wait_timeout(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        latch.request(VmExit::Reset);
        latch.request(VmExit::Stopped);
        assert_eq!(t.join().unwrap(), Some(VmExit::Reset));
        assert_eq!(latch.get(), Some(VmExit::Reset));
    }
}
