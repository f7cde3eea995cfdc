//! A VM taken from the pool, as its container's sandbox sees it: it runs in its holder's
//! process (see [`crate::pool::holder`]), which ends it when asked, when the sandbox ends, or
//! when the guest stops.

use super::Vm;
use crate::pidfd::Pidfd;
use crate::pool::{claim::Claimed, HolderReply, HolderRequest};
use std::sync::Mutex;
use std::time::Duration;

/// A claimed pool VM.
#[derive(Debug)]
pub struct PooledVm {
    holder: Pidfd,
    /// The hypervisor's process when it is not the holder itself (QEMU).
    hypervisor: Option<Pidfd>,
    vm_pid: i32,
    run_dir: std::path::PathBuf,
    conn: Mutex<std::os::unix::net::UnixStream>,
    socket: std::path::PathBuf,
}

impl PooledVm {
    /// Takes over a claimed VM; fails if its holder or its hypervisor is already gone.
    pub fn new(c: Claimed) -> std::io::Result<Self> {
        let h = &c.handover;
        let holder = Pidfd::open(h.holder_pid, h.holder_pid_start)?;
        let hypervisor = (h.vm_pid != h.holder_pid)
            .then(|| Pidfd::open(h.vm_pid, h.vm_pid_start))
            .transpose()?;
        Ok(PooledVm {
            holder,
            hypervisor,
            vm_pid: h.vm_pid,
            run_dir: h.run_dir.clone(),
            conn: Mutex::new(c.conn),
            socket: c.socket,
        })
    }
}

impl PooledVm {
    /// Whether the VM has ended (its hypervisor or its holder has exited), waiting up to
    /// `grace` for it: an error met while taking a VM over can be the first sign of its death,
    /// because a dying hypervisor's tap and sockets vanish a little before it has exited.
    pub fn ended_within(&self, grace: Duration) -> bool {
        let deadline = std::time::Instant::now() + grace;
        loop {
            if self.holder.exited() || self.hypervisor.as_ref().is_some_and(Pidfd::exited) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Vm for PooledVm {
    fn pid(&self) -> Option<i32> {
        Some(self.vm_pid)
    }

    fn wait_stopped(&self) -> i32 {
        self.holder.wait(None);
        137
    }

    fn try_stopped(&self) -> Option<i32> {
        self.holder.exited().then_some(137)
    }

    fn kill(&self) {
        // The hypervisor dies with its holder (PR_SET_PDEATHSIG), the built-in VMM is in it.
        let _ = self.holder.signal(libc::SIGKILL);
    }

    fn set_paused(&self, paused: bool) -> std::io::Result<()> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| std::io::Error::other("pool VM connection poisoned"))?;
        let err = |e: crate::pool::PoolError| std::io::Error::other(e.to_string());
        crate::pool::send(&mut c, &self.socket, &HolderRequest::Pause(paused)).map_err(err)?;
        match crate::pool::recv::<HolderReply>(&mut *c, &self.socket).map_err(err)? {
            Some(HolderReply::Ok) => Ok(()),
            Some(HolderReply::Error(e)) => Err(std::io::Error::other(e)),
            _ => Err(std::io::Error::other("the pool VM's holder is gone")),
        }
    }

    fn end(&self) {
        // Hanging up is the holder's cue to end the VM and clean up after it (a SIGKILL would
        // leave its hypervisor to die later through PR_SET_PDEATHSIG, and its dir to us).
        if let Ok(c) = self.conn.lock() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn finish(&self, timeout: Duration) {
        if !self.holder.wait(Some(timeout)) {
            tracing::warn!(
                holder = self.holder.pid(),
                "pool VM did not stop in time: killing it"
            );
            self.kill();
            self.holder.wait(Some(crate::timeouts::VMM_GONE));
        }
        // Its holder removes it; after SIGKILL nobody else would.
        let _ = crate::share::remove_run_dir(&self.run_dir);
    }
}

impl Drop for PooledVm {
    fn drop(&mut self) {
        // A VM is used once: the holder ends it when we hang up.
        if let Ok(c) = self.conn.lock() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}
