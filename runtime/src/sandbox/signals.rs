//! Signals the sandbox receives: forwarded to the container's init; SIGWINCH becomes a resize.

use super::*;
use crate::agent::{AgentClient, AgentError};
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
        match shared.agent.request(req, crate::timeouts::QUICK) {
            Ok(_) => {}
            Err(e) => match undelivered(&shared, n, &e) {
                Undelivered::GuestGone => {
                    tracing::debug!("signal {n} not forwarded: the guest is gone ({e})")
                }
                Undelivered::VmEnded => {}
                Undelivered::Failed => tracing::warn!("cannot forward signal {n}: {e}"),
            },
        }
    }
}

/// What came of a signal for the container whose request to the agent failed.
#[derive(Debug, PartialEq)]
pub(super) enum Undelivered {
    /// The guest is gone (the VM stopped, or the agent's connection closed, which ends the
    /// container too): the container's processes are gone with it; it no longer runs.
    GuestGone,
    /// The guest did not answer, and the signal asks the container to stop: the VM was ended
    /// as SIGKILL would end it, and the sandbox ends the container with status 137.
    VmEnded,
    /// Neither: the error stands.
    Failed,
}

/// Decides, and does, what a signal `n` for the container comes to when the agent's answer to
/// it failed with `e` (see [`Undelivered`]). Shared by signals sent to the sandbox (`run`'s
/// forwarding) and `kill`'s requests, so both treat a dead or stuck guest alike.
pub(super) fn undelivered(shared: &Shared, n: i32, e: &AgentError) -> Undelivered {
    let connection_lost = matches!(
        e,
        AgentError::Closed
            | AgentError::Io(_)
            | AgentError::Frame(rootcell_protocol::FrameError::Io(_))
    );
    if connection_lost || shared.vm.try_stopped().is_some() {
        return Undelivered::GuestGone;
    }
    if matches!(e, AgentError::Timeout { .. }) && ends_unanswered(shared, n) {
        // The guest's kernel or agent is stuck: the signal can never arrive, and the one who
        // sent it (`run`'s caller, Ctrl-C, `kill`, Docker's stop) wants the container to end.
        // End it as SIGKILL would; the main loop then tears the sandbox down (status 137).
        tracing::error!(
            "the guest did not take {} within {:?}: its agent or kernel does not answer; ending the VM",
            crate::signal::name(n),
            crate::timeouts::QUICK
        );
        shared.vm.kill();
        return Undelivered::VmEnded;
    }
    Undelivered::Failed
}

/// Whether signal `n`, sent to the sandbox and not taken by the guest in time, ends the VM: a
/// request to stop (SIGTERM, SIGINT: Ctrl-C on `run`) to a container that runs in the VM its
/// sandbox booted. Not SIGHUP or the like, which a daemon may take as "reload"; not to a paused
/// container, which takes signals once resumed, as a frozen runc container does.
fn ends_unanswered(shared: &Shared, n: i32) -> bool {
    let status = shared
        .state
        .lock()
        .map(|s| s.status)
        .unwrap_or(crate::state::Status::Stopped);
    // Only the VM's owner can end it: a container that joined another's VM would be told it
    // was ended while nothing happened (its VM's `kill` does nothing).
    [libc::SIGTERM, libc::SIGINT].contains(&n)
        && matches!(shared.role, Role::Owner)
        && matches!(
            status,
            crate::state::Status::Created | crate::state::Status::Running
        )
}
