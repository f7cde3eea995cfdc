//! Signals the sandbox receives: forwarded to the container's init; SIGWINCH becomes a resize.

use super::*;
use crate::agent::AgentClient;
use crate::console;
use rootcell_protocol::{Request, INIT_PROCESS};
use std::sync::Arc;

/// Blocks the signals we forward (plus SIGWINCH) in this thread, before other threads exist, so
/// every thread inherits the mask and only the signal thread's sigwait sees them.
pub fn block_signals() {
    let _ = forwarded_set().thread_block();
}

/// The signals the sandbox and exec relays handle with sigwait.
pub fn forwarded_set() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in crate::signal::FORWARDED.iter().chain(&[libc::SIGWINCH]) {
        if let Ok(sig) = nix::sys::signal::Signal::try_from(*s) {
            set.add(sig);
        }
    }
    set
}

pub(super) fn resize(agent: &AgentClient, fd: i32) {
    if let Some((rows, cols)) = console::window_size(fd) {
        let _ = agent.request(
            Request::Resize {
                process: INIT_PROCESS.into(),
                rows,
                cols,
            },
            crate::timeouts::QUICK,
        );
    }
}

/// sigwait loop: forwards signals to the container's init; SIGWINCH becomes a resize.
pub(super) fn forward_signals(shared: Arc<Shared>) {
    let set = forwarded_set();
    loop {
        let Ok(sig) = set.wait() else { continue };
        let n = sig as i32;
        if n == libc::SIGWINCH {
            if let Some(fd) = shared.tty_fd {
                tracing::debug!(size = ?console::window_size(fd), "terminal resized");
                resize(&shared.agent, fd);
            }
            continue;
        }
        tracing::debug!(signal = n, "forwarding signal to the container");
        let req = Request::Signal {
            process: INIT_PROCESS.into(),
            signal: n,
            all: false,
        };
        if let Err(e) = shared.agent.request(req, crate::timeouts::QUICK) {
            tracing::warn!("cannot forward signal {n}: {e}");
        }
    }
}
