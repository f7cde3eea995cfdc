//! A VM whose vCPUs run: waiting for its end, pausing and resuming it, stopping it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};

use super::PAUSE_TIMEOUT;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::Bus;
use crate::error::{Error, Result};
use crate::exit::{ExitLatch, VmExit};
use crate::memory::GuestMemoryMmap;
use crate::pause::PauseGate;
use crate::vcpu::{VcpuStatus, VcpuThread};

/// What happened to a VM that has been stopped.
#[derive(Debug, Clone)]
pub struct VmReport {
    /// Why it stopped.
    pub exit: VmExit,
    /// Where each vCPU got to.
    pub vcpus: Vec<VcpuStatus>,
    /// vCPU threads that did not leave KVM_RUN within the stop timeout (left detached).
    pub stuck_vcpus: Vec<u8>,
    /// Time from [`Vm::create`](super::Vm::create) to the first KVM_RUN of vCPU 0.
    pub create_to_first_run: Option<Duration>,
    /// Each virtio device's registers and rings once the vCPUs stopped
    /// ([`MmioTransport::ring_report`]), in the order they were attached.
    pub virtio: Vec<String>,
}

/// A VM whose vCPUs are running.
pub struct RunningVm {
    pub(super) threads: Vec<VcpuThread>,
    pub(super) latch: Arc<ExitLatch>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) gate: Arc<PauseGate>,
    pub(super) virtio: Vec<Arc<Mutex<MmioTransport>>>,
    pub(super) created: Instant,
    // Dropped after the threads are stopped: the fds and memory outlive every KVM_RUN.
    pub(super) _bus: Arc<Bus>,
    pub(super) _vm_fd: VmFd,
    pub(super) _mem: GuestMemoryMmap,
    pub(super) _kvm: Kvm,
}

impl RunningVm {
    /// Waits up to `timeout` for the guest (or a vCPU error) to end the VM.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.latch.wait_timeout(timeout)
    }

    /// The VM's exit latch: another thread can wait on it for the VM's end while this one
    /// keeps the VM (to pause or stop it).
    pub fn exit_latch(&self) -> Arc<ExitLatch> {
        self.latch.clone()
    }

    /// Snapshots of every vCPU's status.
    pub fn vcpu_status(&self) -> Vec<VcpuStatus> {
        self.threads.iter().map(VcpuThread::status).collect()
    }

    /// Pauses the guest: every vCPU thread leaves KVM_RUN and parks, then every virtio device
    /// stops serving its queues. Returns once nothing of the guest runs; on error (a vCPU or a
    /// device that did not stop within [`PAUSE_TIMEOUT`]) the VM is resumed. Pausing a paused
    /// or ended VM succeeds.
    pub fn pause(&self) -> Result<()> {
        self.gate.set(true);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let live: Vec<&VcpuThread> = self.threads.iter().filter(|t| t.is_running()).collect();
            if self.gate.parked() >= live.len() {
                break;
            }
            if Instant::now() >= deadline {
                self.gate.set(false);
                return Err(Error::Pause(format!(
                    "{} of {} vCPUs did not leave KVM_RUN within {PAUSE_TIMEOUT:?}",
                    live.len().saturating_sub(self.gate.parked()),
                    live.len()
                )));
            }
            // Re-kicked on every round: a KVM that ignores immediate_exit can lose a kick.
            for t in &live {
                t.kick();
            }
            self.gate.wait_parked(live.len(), Duration::from_millis(20));
        }
        for (i, transport) in self.virtio.iter().enumerate() {
            if !crate::devices::lock(transport).pause() {
                for t in &self.virtio[..=i] {
                    crate::devices::lock(t).resume();
                }
                self.gate.set(false);
                return Err(Error::Pause(format!(
                    "virtio device #{i} did not stop within its timeout"
                )));
            }
        }
        Ok(())
    }

    /// Resumes a paused guest: devices first, then the vCPUs re-enter KVM_RUN. Resuming a VM
    /// that is not paused does nothing.
    pub fn resume(&self) {
        for transport in &self.virtio {
            crate::devices::lock(transport).resume();
        }
        self.gate.set(false);
    }

    /// Whether a pause is in effect.
    pub fn is_paused(&self) -> bool {
        self.gate.requested()
    }

    /// Stops all vCPU threads (bounded) and reports where they got to.
    pub fn stop(mut self) -> VmReport {
        self.latch.request(VmExit::Stopped);
        self.stop.store(true, Ordering::Release);
        // Parked vCPUs must see the stop flag (paused device threads end when dropped).
        self.gate.wake_all();
        let mut stuck = Vec::new();
        for t in &mut self.threads {
            if !t.stop_and_join(Duration::from_secs(5)) {
                stuck.push(t.status().cpu);
            }
        }
        let vcpus = self.vcpu_status();
        // After the vCPUs: the driver's side of the rings no longer moves. Not waiting on a
        // transport a stuck vCPU thread may hold (inside an MMIO exit).
        let virtio = self
            .virtio
            .iter()
            .map(|t| match t.try_lock() {
                Ok(t) => t.ring_report(),
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().ring_report(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    "(a vCPU thread holds this device's registers)".to_string()
                }
            })
            .collect();
        let create_to_first_run = vcpus
            .first()
            .and_then(|s| s.first_run)
            .map(|t| t - self.created);
        VmReport {
            exit: self.latch.get().unwrap_or(VmExit::Stopped),
            vcpus,
            stuck_vcpus: stuck,
            create_to_first_run,
            virtio,
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.gate.wake_all();
        for t in &mut self.threads {
            t.stop_and_join(Duration::from_secs(5));
        }
    }
}
