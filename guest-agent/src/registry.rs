//! Live processes the host knows by name, and the reaper that reports their exits.
//!
//! The agent is init: a single thread reaps every child, including orphans reparented to it.
//! Exits of named processes become `Event::Exit`; others are dropped.
//!
//! Exactly one exit per named process: a process exists (and can be killed, by the OOM killer
//! or by `kill -9 -1` inside the container) before the agent learns its pid and registers it.
//! So the reaper never reaps while a spawn is between its fork and its registration: it waits
//! for a zombie without reaping it (`waitid(WNOWAIT)`), takes the spawn gate that
//! [`Registry::spawning`] holds over that stretch, and only then reaps that pid and looks it up.

use crate::sink::EventSink;
use rootcell_protocol::{exit_status_from_wait, Event};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};

/// The registry name of `container`'s process `process` (`<container>/<process>`: container
/// ids never contain `/`), so the processes of several containers in one guest stay apart.
pub fn key(container: &str, process: &str) -> String {
    format!("{container}/{process}")
}

/// The container and process of a registry name made by [`key`].
pub fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

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
    /// Held from a fork until the new process is registered (see the module docs).
    gate: Mutex<()>,
    forks: Mutex<u64>,
    forked: Condvar,
}

/// Holds the spawn gate: the reaper reaps nothing until this is dropped.
pub struct SpawnGuard<'a>(#[allow(dead_code)] std::sync::MutexGuard<'a, ()>);

impl Registry {
    /// Creates an empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Closes the spawn gate: call before forking a process that will be registered, and keep
    /// the guard until [`Registry::add`] (or until the failed spawn is cleaned up).
    pub fn spawning(&self) -> SpawnGuard<'_> {
        SpawnGuard(self.gate.lock().unwrap_or_else(|p| p.into_inner()))
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

    /// Pids of the live named processes of `container`.
    pub fn pids_of(&self, container: &str) -> Vec<i32> {
        let prefix = key(container, "");
        self.lock()
            .by_pid
            .iter()
            .filter(|(_, name)| name.starts_with(&prefix))
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Forgets every process of `container` (it is being removed): their exits are not reported.
    pub fn forget_container(&self, container: &str) {
        let prefix = key(container, "");
        let mut inner = self.lock();
        inner.by_name.retain(|name, _| !name.starts_with(&prefix));
        inner.by_pid.retain(|_, name| !name.starts_with(&prefix));
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

/// Reaps children forever, reporting named exits to `sink`; `on_exit` runs before each report
/// (the OOM check that must precede it) and `after_exit` after it (logging: a slow console must
/// never hold an exit back).
pub fn reap_forever(
    registry: Arc<Registry>,
    sink: Arc<EventSink>,
    on_exit: impl Fn(&str, i32),
    after_exit: impl Fn(&str, i32),
) -> ! {
    loop {
        let seen = registry.fork_count();
        match reap_one(&registry) {
            Ok(Some((name, status))) => {
                on_exit(&name, status);
                let (container, process) = split_key(&name);
                let exit = Event::Exit {
                    process: process.to_string(),
                    status,
                };
                sink.event(container, exit);
                after_exit(&name, status);
            }
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            // No children at all: sleep until the agent forks again.
            Err(_) => registry.wait_for_fork(seen),
        }
    }
}

/// Waits for one child to exit and reaps it; returns its name and status if it was named.
/// `Err` is ECHILD (no children) or EINTR.
fn reap_one(registry: &Registry) -> std::io::Result<Option<(String, i32)>> {
    // SAFETY: an all-zero siginfo_t is a valid value; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // Wait for a zombie but leave it in place: it is reaped below, under the spawn gate.
    // SAFETY: waitid with a valid siginfo pointer.
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::__WALL,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded for an exited child, so si_pid is the field that is set.
    let pid = unsafe { info.si_pid() };
    if pid <= 0 {
        return Ok(None);
    }
    // A spawn in progress registers its process before we look the pid up.
    let _gate = registry.spawning();
    let mut raw = 0;
    // SAFETY: waitpid with a valid status pointer.
    let got = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG | libc::__WALL) };
    if got != pid {
        // A failed spawn reaped its own setup process while we waited for the gate.
        return Ok(None);
    }
    Ok(registry
        .remove_pid(pid)
        .map(|name| (name, exit_status_from_wait(raw))))
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

    #[test]
    fn containers_are_kept_apart_and_forgotten_whole() {
        let r = Registry::new();
        r.add(&key("a", "init"), Entry { pid: 10, pty: None });
        r.add(&key("ab", "init"), Entry { pid: 11, pty: None });
        r.add(&key("a", "e1"), Entry { pid: 12, pty: None });
        assert_eq!(split_key(&key("a", "e1")), ("a", "e1"));
        r.forget_container("a");
        assert!(r.get(&key("a", "init")).is_none());
        assert_eq!(r.remove_pid(12), None);
        assert_eq!(r.get(&key("ab", "init")).unwrap().pid, 11);
    }
}
