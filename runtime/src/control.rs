//! The sandbox's control socket: the CLI's way to reach a running sandbox. One request and one
//! response per connection, as length-prefixed JSON frames (the agent protocol's framing).
//! Exec, ps, pause and resume become more variants here.

use serde::{Deserialize, Serialize};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A CLI request to the sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Run the user program (`rootcell start`).
    Start,
    /// Deliver a signal (`rootcell kill`, or an exec relay forwarding one).
    Signal {
        /// Signal number.
        signal: i32,
        /// Every process of the container.
        all: bool,
        /// Target process (an exec id); the container's init when absent.
        #[serde(default)]
        process: Option<String>,
    },
    /// Run an additional process; the sandbox answers `Ok` once it runs, then `Exited` on the
    /// same connection when it ends.
    Exec {
        /// Id of the new process (unique per container).
        exec_id: String,
        /// The process.
        process: Box<oci_spec::runtime::Process>,
        /// Which streams the caller attached (with the exec id) before asking.
        stdio: rootcell_protocol::StdioSpec,
    },
    /// Change a process's terminal size.
    Resize {
        /// Target process id.
        process: String,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Change the container's limits in the guest (`rootcell update`).
    Update {
        /// Memory limit in bytes.
        memory: Option<u64>,
        /// Process limit; negative removes it.
        pids: Option<i64>,
    },
    /// The container's resource usage in the guest (`rootcell events --stats`).
    Stats,
    /// Liveness probe.
    Ping,
    /// Freeze the VM (`rootcell pause`).
    Pause,
    /// Thaw the VM (`rootcell resume`).
    Resume,
}

/// The sandbox's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Done.
    Ok,
    /// An exec'd process ended with this status (shell convention).
    Exited {
        /// Exit status.
        status: i32,
    },
    /// The process could not start (its program is missing or not executable).
    ProcessFailed {
        /// One line.
        message: String,
        /// Exit status to report (127 or 126).
        status: i32,
    },
    /// The container's status does not allow the request (the lifecycle rules of
    /// [`crate::state::Status::check`]), typed so the CLI can act on which rule.
    Refused {
        /// The rule that refused it.
        error: crate::state::StateError,
    },
    /// Answer to [`ControlRequest::Stats`].
    Stats {
        /// Usage and limits from the container's cgroup in the guest.
        stats: rootcell_protocol::ContainerStats,
    },
    /// Failed; `message` is shown to the user as is.
    Error {
        /// One line.
        message: String,
    },
}

/// Errors reaching the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket is missing or refused (sandbox gone).
    #[error("cannot reach the container's sandbox at {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("sandbox control exchange failed: {0}")]
    Exchange(String),
}

/// Sends one request and reads the response, bounded by `timeout`.
pub fn call(
    socket: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, ControlError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let ex = |e: &dyn std::fmt::Display| ControlError::Exchange(e.to_string());
    s.set_read_timeout(Some(timeout)).map_err(|e| ex(&e))?;
    s.set_write_timeout(Some(timeout)).map_err(|e| ex(&e))?;
    rootcell_protocol::send(&mut s, req).map_err(|e| ex(&e))?;
    rootcell_protocol::recv(&mut s)
        .map_err(|e| ex(&e))?
        .ok_or_else(|| ControlError::Exchange("sandbox closed the connection".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_signal_requests_still_parse() {
        let r: ControlRequest =
            serde_json::from_str(r#"{"type":"signal","signal":9,"all":false}"#).unwrap();
        assert_eq!(
            r,
            ControlRequest::Signal {
                signal: 9,
                all: false,
                process: None
            }
        );
    }
}
