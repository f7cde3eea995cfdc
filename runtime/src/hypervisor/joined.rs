//! The VM of another container, as a container that joined it sees it: not ours to stop,
//! kill or pause. It is gone when the sandbox of the container that booted it (its owner) is.

use super::Vm;
use crate::state::process_alive;
use std::time::Duration;

/// How often the owner's sandbox is checked while waiting for it to end.
const POLL: Duration = Duration::from_millis(200);

/// Another container's VM, alive while its owner's sandbox process is.
#[derive(Debug, Clone)]
pub struct JoinedVm {
    owner_pid: i32,
    owner_pid_start: u64,
}

impl JoinedVm {
    /// The VM run by the sandbox `owner_pid` (started at `owner_pid_start`).
    pub fn new(owner_pid: i32, owner_pid_start: u64) -> Self {
        JoinedVm {
            owner_pid,
            owner_pid_start,
        }
    }
}

impl Vm for JoinedVm {
    fn pid(&self) -> Option<i32> {
        None
    }

    fn wait_stopped(&self) -> i32 {
        while self.try_stopped().is_none() {
            std::thread::sleep(POLL);
        }
        137
    }

    fn try_stopped(&self) -> Option<i32> {
        (!process_alive(self.owner_pid, self.owner_pid_start)).then_some(137)
    }

    /// Not ours: the owner's containers live on. Our own processes in it are ended by the
    /// agent when our connection closes.
    fn kill(&self) {}

    fn set_paused(&self, _paused: bool) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "a container in another container's VM is paused through its cgroup in the guest",
        ))
    }

    fn finish(&self, _timeout: Duration) {}
}
