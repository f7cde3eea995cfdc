//! `start`: run the user program of a created container, then the poststart hooks.

use crate::commands::Global;
use crate::control::{self, ControlRequest, ControlResponse};
use crate::error::RuntimeError;
use crate::hooks;
use crate::state::Status;
use anyhow::{bail, Result};

/// `start ID`.
pub fn start(g: &Global, id: &str) -> Result<()> {
    let _span = tracing::info_span!("start", id).entered();
    let st = g.load(id)?.refreshed();
    match st.status {
        Status::Created => {}
        Status::Running => return Err(RuntimeError::StartRunning.into()),
        Status::Stopped => return Err(RuntimeError::StartStopped.into()),
        Status::Creating => bail!("cannot start container {id}: it is still being created"),
        Status::Paused => bail!("cannot start a paused container"),
    }
    match control::call(
        &st.control_socket(),
        &ControlRequest::Start,
        crate::timeouts::CLI_START,
    ) {
        Ok(ControlResponse::Ok) | Ok(ControlResponse::Exited { .. }) => {}
        Ok(ControlResponse::Error { message }) => bail!("{message}"),
        Ok(ControlResponse::Stats { .. }) => bail!("the sandbox answered Start with stats"),
        Ok(ControlResponse::Refused { error }) => return Err(error.into()),
        Ok(ControlResponse::ProcessFailed { message, status }) => {
            return Err(RuntimeError::Process {
                msg: message,
                status,
            }
            .into())
        }
        // A program that exits at once can take the sandbox down before it answers.
        Err(e) => match g.load(id).map(|s| s.refreshed()) {
            Ok(s) if s.status == Status::Stopped && s.exit_status.is_some() => {}
            _ => return Err(e.into()),
        },
    }
    let mut now = g.load(id)?.refreshed();
    if now.status == Status::Created {
        now.status = Status::Running;
    }
    // Warned and skipped, as the runtime spec says for poststart.
    hooks::run_all("poststart", &st.poststart, &now.oci_json().to_string());
    Ok(())
}
