//! Stdio stream connections waiting for the request that creates their process.

use rootcell_protocol::Stream;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Pending stream sockets keyed by (process name, as the registry names it, stream kind).
#[derive(Default)]
pub struct StreamTable {
    pending: Mutex<HashMap<(String, Stream), OwnedFd>>,
    arrived: Condvar,
}

impl StreamTable {
    /// Creates an empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a stream; a second one for the same key replaces (closes) the first.
    pub fn insert(&self, process: &str, stream: Stream, fd: OwnedFd) {
        self.lock().insert((process.to_string(), stream), fd);
        self.arrived.notify_all();
    }

    /// Takes the stream for `(process, stream)`, waiting up to `wait` for it to arrive.
    pub fn take(&self, process: &str, stream: Stream, wait: Duration) -> Option<OwnedFd> {
        let deadline = Instant::now() + wait;
        let key = (process.to_string(), stream);
        let mut pending = self.lock();
        loop {
            if let Some(fd) = pending.remove(&key) {
                return Some(fd);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            pending = self
                .arrived
                .wait_timeout(pending, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Drops every stream still waiting for `process` (its creation failed or it is gone).
    pub fn discard(&self, process: &str) {
        self.lock().retain(|(p, _), _| p != process);
    }

    /// Drops every stream still waiting for a process of `container` (it is being removed);
    /// keys are registry names ([`crate::registry::key`]).
    pub fn discard_container(&self, container: &str) {
        let prefix = crate::registry::key(container, "");
        self.lock().retain(|(p, _), _| !p.starts_with(&prefix));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Stream), OwnedFd>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn take_waits_for_late_streams_and_times_out() {
        let table = Arc::new(StreamTable::new());
        let t2 = table.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            t2.insert("init", Stream::Stdout, fd());
        });
        assert!(table
            .take("init", Stream::Stdout, Duration::from_secs(5))
            .is_some());
        h.join().unwrap();
        let start = Instant::now();
        assert!(table
            .take("init", Stream::Stderr, Duration::from_millis(100))
            .is_none());
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn keys_are_separate_and_discard_drops() {
        let table = StreamTable::new();
        table.insert("init", Stream::Stdin, fd());
        table.insert("e1", Stream::Stdin, fd());
        table.discard("init");
        assert!(table.take("init", Stream::Stdin, Duration::ZERO).is_none());
        assert!(table.take("e1", Stream::Stdin, Duration::ZERO).is_some());
    }
}
