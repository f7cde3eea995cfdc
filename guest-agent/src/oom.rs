//! Watches the container's cgroup for OOM kills (the `oom_kill` count in `memory.events`, which
//! counts kills by any OOM killer, the guest-wide one included) and reports each as an event.

use crate::alog;
use crate::sink::EventSink;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rootcell_protocol::Event;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Enables the memory and pids controllers for the guest's child cgroups (the root cgroup may
/// hold processes and still delegate), so a container cgroup has `memory.events`.
pub fn enable_controllers(root: &Path) {
    if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids") {
        alog!("cannot enable cgroup controllers: {e}");
    }
}

/// The `oom_kill` count of a `memory.events` text.
pub fn oom_kills(events: &str) -> u64 {
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The OOM kills of one container cgroup already reported.
pub struct Watch {
    container: String,
    file: std::fs::File,
    cgroup: PathBuf,
    seen: Mutex<u64>,
    sink: Arc<EventSink>,
}

impl Watch {
    /// Reports new kills; returns false once the cgroup is gone.
    ///
    /// Called by the watch thread and by the reaper before it reports an exit: the kill count
    /// grows before the victim gets its SIGKILL, so the host learns of the OOM kill before the
    /// exit it caused, in that order (Docker records OOMKilled only if it comes first).
    pub fn check(&self) -> bool {
        // A removed cgroup's file reads ENODEV: the container is gone.
        let Some(now) = read_kills(&self.file) else {
            return false;
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if now > *seen {
            alog!("OOM kill in {} ({now} so far)", self.cgroup.display());
            self.sink.event(&self.container, Event::Oom);
            *seen = now;
        }
        true
    }
}

/// Starts a thread that sends `container` an [`Event::Oom`] whenever the cgroup's `oom_kill` count grows; it
/// ends when the cgroup goes away. kernfs wakes poll() with POLLPRI when the file changes (the
/// guest kernel has no inotify).
pub fn watch(container: &str, cgroup: PathBuf, sink: Arc<EventSink>) -> Option<Arc<Watch>> {
    let path = cgroup.join("memory.events");
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            alog!("cannot watch {} for OOM: {e}", path.display());
            return None;
        }
    };
    let seen = Mutex::new(read_kills(&file).unwrap_or(0));
    let w = Arc::new(Watch {
        container: container.to_string(),
        file,
        cgroup,
        seen,
        sink,
    });
    let thread_w = w.clone();
    // Only this thread reports kills that end no process the reaper reports: a panic in it
    // ends the agent (threads.rs).
    let _ = crate::threads::vital(
        "oom-watch",
        "this container's OOM kills would not be reported",
        move || loop {
            let mut fds = [PollFd::new(thread_w.file.as_fd(), PollFlags::POLLPRI)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
            if !thread_w.check() {
                return;
            }
        },
    );
    Some(w)
}

/// Re-reads the whole file from the start (which also re-arms the poll).
fn read_kills(file: &std::fs::File) -> Option<u64> {
    let mut buf = [0u8; 512];
    let n = file.read_at(&mut buf, 0).ok()?;
    Some(oom_kills(&String::from_utf8_lossy(&buf[..n])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_oom_kill_count() {
        assert_eq!(
            oom_kills("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n"),
            2
        );
        assert_eq!(oom_kills("low 0\n"), 0);
    }
}
