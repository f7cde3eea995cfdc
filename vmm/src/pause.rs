//! Pausing a running VM: every vCPU thread parks outside KVM_RUN on a condvar until resumed.
//!
//! The owner raises the request, then kicks each vCPU with [`crate::vcpu::kick_signal`]. The
//! kick's handler sets the vCPU's `kvm_run.immediate_exit`, so a kick that lands between the
//! thread's look at the request and its next KVM_RUN is not lost: that KVM_RUN returns at once
//! (EINTR) and the thread parks on its next look. The owner still re-kicks while it waits, for
//! hosts whose KVM ignores `immediate_exit`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::devices::lock;

/// The shared pause state of one VM's vCPU threads.
#[derive(Debug, Default)]
pub struct PauseGate {
    /// Lock-free copy of `state.paused`, for the vCPU loop's fast path.
    requested: AtomicBool,
    state: Mutex<GateState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    /// vCPU threads currently inside [`PauseGate::park`].
    parked: usize,
}

impl PauseGate {
    /// Whether a pause is requested (checked by each vCPU before every KVM_RUN).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// vCPU side: waits, counted as parked, while a pause is requested and `stop` is not set.
    pub fn park(&self, stop: &AtomicBool) {
        let mut s = lock(&self.state);
        s.parked += 1;
        self.cond.notify_all();
        while s.paused && !stop.load(Ordering::Acquire) {
            s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
        self.cond.notify_all();
    }

    /// Owner side: requests (`true`) or lifts (`false`) the pause; lifting wakes parked vCPUs.
    pub fn set(&self, paused: bool) {
        let mut s = lock(&self.state);
        s.paused = paused;
        self.requested.store(paused, Ordering::Release);
        self.cond.notify_all();
    }

    /// Wakes parked vCPUs so they see a stop flag the owner has just set.
    pub fn wake_all(&self) {
        let _s = lock(&self.state);
        self.cond.notify_all();
    }

    /// How many vCPU threads are parked right now.
    pub fn parked(&self) -> usize {
        lock(&self.state).parked
    }

    /// Waits up to `timeout` until at least `n` vCPU threads are parked; returns whether they are.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.state);
        while s.parked < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .cond
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Threads shaped like the vCPU loop: count "guest work" unless parked.
    fn workers(
        n: usize,
        gate: &Arc<PauseGate>,
        stop: &Arc<AtomicBool>,
        work: &Arc<AtomicU64>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let (gate, stop, work) = (gate.clone(), stop.clone(), work.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        if gate.requested() {
                            gate.park(&stop);
                            continue;
                        }
                        work.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                })
            })
            .collect()
    }

    #[test]
    fn parked_threads_do_no_work_until_resumed_and_stop_releases_them() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let work = Arc::new(AtomicU64::new(0));
        let threads = workers(3, &gate, &stop, &work);
        gate.set(true);
        assert!(gate.wait_parked(3, Duration::from_secs(5)));
        let frozen = work.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            work.load(Ordering::Relaxed),
            frozen,
            "a parked thread worked"
        );
        gate.set(false);
        let deadline = Instant::now() + Duration::from_secs(5);
        while work.load(Ordering::Relaxed) == frozen && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            work.load(Ordering::Relaxed) > frozen,
            "resume did not restart work"
        );
        // Stopping while paused: parked threads leave and exit.
        gate.set(true);
        assert!(gate.wait_parked(3, Duration::from_secs(5)));
        stop.store(true, Ordering::Release);
        gate.wake_all();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(gate.parked(), 0);
    }

    #[test]
    fn wait_parked_times_out_when_a_thread_never_parks() {
        let gate = PauseGate::default();
        gate.set(true);
        let t = Instant::now();
        assert!(!gate.wait_parked(1, Duration::from_millis(30)));
        assert!(t.elapsed() >= Duration::from_millis(30));
    }
}
