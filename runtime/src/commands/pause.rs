//! `pause` and `resume`: freeze and thaw the container's VM.

use crate::commands::Global;
use crate::control::{self, ControlRequest, ControlResponse};
use crate::error::RuntimeError;
use crate::state::Status;
use anyhow::{bail, Result};

/// `pause ID` / `resume ID`: freeze or thaw the container's VM.
pub fn pause(g: &Global, id: &str, pause: bool) -> Result<()> {
    let st = g.load(id)?.refreshed();
    let req = if pause {
        ControlRequest::Pause
    } else {
        ControlRequest::Resume
    };
    if st.status == Status::Stopped {
        return Err(RuntimeError::NotRunning(id.to_string()).into());
    }
    match control::call(&st.control_socket(), &req, crate::timeouts::CLI_QUICK)? {
        ControlResponse::Error { message } => bail!("{message}"),
        _ => Ok(()),
    }
}
