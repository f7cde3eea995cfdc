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

    /// Runs the body of vCPU `cpu`'s thread. A panic in it ends the VM with an error naming it,
    /// rather than ending only the thread: a VM that lost a vCPU thread looks alive but never
    /// runs that vCPU again, so its owner would wait for an agent that cannot answer.
    pub fn guard_vcpu(&self, cpu: u8, body: impl FnOnce()) {
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            self.request(VmExit::Error {
                cpu,
                message: format!("vCPU thread panicked: {}", panic_text(payload.as_ref())),
            });
        }
    }
}

/// The message of a panic's payload (a `&str` or a `String`; anything else unnamed).
// Also in guest-agent/src/threads.rs and shim/src/guard.rs (panic_message): six lines of std
// downcasts, not shared, as their only common crate is rootcell-protocol (the wire protocol).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
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

    /// A panicking vCPU body ends the VM with an error that says so; a body that returns
    /// records nothing.
    #[test]
    fn a_vcpu_panic_ends_the_vm() {
        let latch = ExitLatch::default();
        latch.guard_vcpu(0, || {});
        assert_eq!(latch.get(), None);
        latch.guard_vcpu(1, || panic!("walk of {:#x} went wrong", 0x1000));
        match latch.get() {
            Some(VmExit::Error { cpu: 1, message }) => {
                assert_eq!(message, "vCPU thread panicked: walk of 0x1000 went wrong")
            }
            other => panic!("expected the panic as the VM's exit, got {other:?}"),
        }
    }
}
