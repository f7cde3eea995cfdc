//! `kill`: a signal to the container's init (or all its processes); SIGKILL works even when
//! the guest does not answer.

use super::delete::wait_gone;
use crate::commands::Global;
use crate::control::{self, ControlRequest, ControlResponse};
use crate::error::RuntimeError;
use crate::state::{process_alive, ContainerState, Status};
use anyhow::{bail, Result};

/// `kill [--all] ID SIGNAL`.
pub fn kill(g: &Global, id: &str, signal: &str, all: bool) -> Result<()> {
    let sig = crate::signal::parse(signal)?;
    let st = g.load(id)?.refreshed();
    // As runc: a container whose processes are gone (stopped, or its guest dead) is "not
    // running" (an error, exit 1, which containerd's runc shim takes for "process already
    // finished" and Docker for an ended container); with --all there is nothing left to signal,
    // which is no error.
    let not_running = || -> Result<()> {
        if all {
            Ok(())
        } else {
            Err(RuntimeError::NotRunning(id.to_string()).into())
        }
    };
    match st.status {
        Status::Created | Status::Running | Status::Paused => {}
        Status::Stopped => return not_running(),
        Status::Creating => return Err(RuntimeError::NotRunning(id.to_string()).into()),
    }
    if st.status == Status::Paused {
        // A frozen VM cannot take a message; only SIGKILL can be honoured (by killing it).
        if sig != libc::SIGKILL {
            bail!("container {id} is paused; resume it before sending signal {sig}");
        }
        kill_sandbox(&st);
        return Ok(());
    }
    let req = ControlRequest::Signal {
        signal: sig,
        all,
        process: None,
    };
    match control::call(&st.control_socket(), &req, crate::timeouts::CLI_SIGNAL) {
        Ok(ControlResponse::Ok) => Ok(()),
        Ok(ControlResponse::Refused {
            error: crate::state::StateError::NotRunning,
        }) => not_running(),
        Ok(ControlResponse::Refused { error }) if sig != libc::SIGKILL => bail!("{error}"),
        Ok(ControlResponse::Error { message }) if sig != libc::SIGKILL => bail!("{message}"),
        other => {
            // SIGKILL must work even when the guest does not answer: kill the sandbox itself
            // (its VM dies with it), which ends the container with status 137.
            if sig == libc::SIGKILL && process_alive(st.pid, st.pid_start) {
                tracing::warn!(
                    ?other,
                    "the sandbox did not deliver SIGKILL; killing the sandbox"
                );
                kill_sandbox(&st);
                return Ok(());
            }
            match other {
                Ok(ControlResponse::Error { message }) => bail!("{message}"),
                Err(_) if !process_alive(st.pid, st.pid_start) => not_running(),
                Err(e) => Err(e.into()),
                Ok(_) => Ok(()),
            }
        }
    }
}

/// SIGKILLs the sandbox's process group and the sandbox (pid-reuse checked).
pub(super) fn kill_sandbox(st: &ContainerState) {
    if st.pid > 0 && process_alive(st.pid, st.pid_start) {
        // SAFETY: plain kill(2); the start-time check above guards against pid reuse.
        unsafe {
            libc::kill(-st.pid, libc::SIGKILL);
            libc::kill(st.pid, libc::SIGKILL);
        }
    }
}

/// SIGKILLs the process group led by `pid` and `pid` (pid-reuse checked), and waits for it.
pub(super) fn kill_group(pid: i32, start: u64) {
    if pid > 0 && process_alive(pid, start) {
        // SAFETY: plain kill(2); the start-time check above guards against pid reuse.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
        wait_gone(pid, start, crate::timeouts::PROCESS_GONE);
    }
}
