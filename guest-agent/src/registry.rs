//! Live processes the host knows by name, and the reaper that reports their exits.
//!
//! The agent is init: a single thread reaps every child with `waitpid(-1)`, including orphans
//! reparented to it. Exits of named processes become `Event::Exit`; others are dropped.

use crate::sink::EventSink;
use rootcell_protocol::{exit_status_from_wait, Event};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};

/// A named live process.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Pid in the agent's pid namespace.
    pub pid: i32,
    /// The pty master, for terminal processes.
    pub pty: Option<Arc<OwnedFd>>,
}

#[derive(Default)]
struct Inner {
    by_name: HashMap<String, Entry>,
    by_pid: HashMap<i32, String>,
}

/// Named processes plus the fork counter the reaper sleeps on when it has no children.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    forks: Mutex<u64>,
    forked: Condvar,
}

impl Registry {
    /// Creates an empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a live process under `name`.
    pub fn add(&self, name: &str, entry: Entry) {
        let mut inner = self.lock();
        inner.by_pid.insert(entry.pid, name.to_string());
        inner.by_name.insert(name.to_string(), entry);
    }

    /// The live process called `name`.
    pub fn get(&self, name: &str) -> Option<Entry> {
        self.lock().by_name.get(name).cloned()
    }

    /// Pids of all live named processes.
    pub fn pids(&self) -> Vec<i32> {
        self.lock().by_pid.keys().copied().collect()
    }

    /// Forgets `pid`; returns its name if it was a named process.
    pub fn remove_pid(&self, pid: i32) -> Option<String> {
        let mut inner = self.lock();
        let name = inner.by_pid.remove(&pid)?;
        if inner.by_name.get(&name).is_some_and(|e| e.pid == pid) {
            inner.by_name.remove(&name);
        }
        Some(name)
    }

    /// Tells the reaper that a child was just forked (it may be waiting for one).
    pub fn note_fork(&self) {
        *self.forks.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.forked.notify_all();
    }

    fn fork_count(&self) -> u64 {
        *self.forks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_for_fork(&self, seen: u64) {
        let mut forks = self.forks.lock().unwrap_or_else(|p| p.into_inner());
        while *forks == seen {
            forks = self.forked.wait(forks).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reaps children forever, reporting named exits to `sink` and calling `on_exit` for each.
pub fn reap_forever(
    registry: Arc<Registry>,
    sink: Arc<EventSink>,
    on_exit: impl Fn(&str, i32),
) -> ! {
    loop {
        let seen = registry.fork_count();
        let mut raw = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::__WALL) };
        if pid > 0 {
            if let Some(name) = registry.remove_pid(pid) {
                let status = exit_status_from_wait(raw);
                on_exit(&name, status);
                sink.event(Event::Exit {
                    process: name,
                    status,
                });
            }
            continue;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => {}
            // No children at all: sleep until the agent forks again.
            _ => registry.wait_for_fork(seen),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_pids_stay_consistent() {
        let r = Registry::new();
        r.add("init", Entry { pid: 10, pty: None });
        r.add("e1", Entry { pid: 11, pty: None });
        assert_eq!(r.get("e1").unwrap().pid, 11);
        let mut pids = r.pids();
        pids.sort();
        assert_eq!(pids, [10, 11]);
        assert_eq!(r.remove_pid(11).as_deref(), Some("e1"));
        assert!(r.get("e1").is_none());
        assert_eq!(r.remove_pid(11), None);
        // An exec id reused after exit maps to the new pid only.
        r.add("e1", Entry { pid: 12, pty: None });
        assert_eq!(r.get("e1").unwrap().pid, 12);
    }
}
