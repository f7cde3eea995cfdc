//! OOM events: rootcell relays an OOM kill inside the guest to a real one in the container's
//! memory cgroup on the host (runtime/src/oom.rs); the shim watches that cgroup as runc's shim
//! does (cgroup v1: an eventfd registered for `memory.oom_control`).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

/// The v1 memory cgroup directory of `pid`.
fn memory_cgroup(pid: u32) -> Option<PathBuf> {
    let data = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = data.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        ctl.split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    })?;
    let dir = PathBuf::from("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
    dir.join("memory.oom_control").exists().then_some(dir)
}

/// Calls `on_oom` for each OOM kill in `pid`'s memory cgroup, until the cgroup goes. Returns
/// false if there is nothing to watch (no v1 memory cgroup).
pub fn watch(pid: u32, on_oom: impl Fn() + Send + 'static) -> bool {
    let Some(dir) = memory_cgroup(pid) else {
        return false;
    };
    let Ok(control) = File::open(dir.join("memory.oom_control")) else {
        return false;
    };
    // SAFETY: eventfd(2) with no pointers; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return false;
    }
    // SAFETY: a fresh fd owned by nobody else.
    let mut ev = unsafe { File::from_raw_fd(efd) };
    let reg = format!("{} {}", ev.as_raw_fd(), control.as_raw_fd());
    if std::fs::write(dir.join("cgroup.event_control"), reg).is_err() {
        return false;
    }
    std::thread::spawn(move || {
        let _control = control;
        let mut b = [0u8; 8];
        // The eventfd also fires when the cgroup is removed: that ends the watch.
        while ev.read_exact(&mut b).is_ok() {
            if !dir.exists() {
                break;
            }
            on_oom();
        }
    });
    true
}
