//! Errors with the exact wording runc uses where callers (Docker's shim, OCI tests) match on it.

use std::path::PathBuf;

/// Failures the CLI reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container id has characters runc does not allow.
    #[error("invalid container id {0:?}: use only letters, digits and '_', '+', '-', '.'")]
    InvalidId(String),
    /// A container with this id exists under the state root.
    #[error("container with id {0} already exists")]
    Exists(String),
    /// No container with this id exists under the state root.
    #[error("container {0} does not exist")]
    NotExist(String),
    /// The signal is not a known name or number.
    #[error("invalid signal {0:?}: use a name like TERM or SIGKILL, or a number 1-64")]
    InvalidSignal(String),
    /// The container is not in a state that can receive signals (the shim matches this text).
    #[error("cannot signal container {0}: container not running")]
    NotRunning(String),
    /// `start` on a stopped container.
    #[error("cannot start a container that has stopped")]
    StartStopped,
    /// `start` on a running container.
    #[error("cannot start an already running container")]
    StartRunning,
    /// `delete` without `--force` on a live container.
    #[error("cannot delete container {0} that is not stopped: {1}")]
    NotStopped(String, String),
    /// The container's process could not be started; `status` is the shell convention for it
    /// (127 not found, 126 not executable), used as the exit status of `run` and `exec`.
    #[error("{msg}")]
    Process {
        /// What the agent said.
        msg: String,
        /// Exit status to report.
        status: i32,
    },
    /// One of [`crate::signal::ABORT`] ended `create` or `run` while the guest was booting;
    /// the command stopped what it had started and exits as if killed by `signal`.
    #[error("interrupted by {} after {secs:.1} s, while the guest was booting: the sandbox and its VM were stopped and container {id} removed", crate::signal::name(*signal))]
    Interrupted {
        /// The signal.
        signal: i32,
        /// The container.
        id: String,
        /// How long the command had run.
        secs: f64,
    },
    /// The bundle or its config.json is missing or invalid.
    #[error("bundle {path}: {msg}")]
    Bundle {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong and what to do.
        msg: String,
    },
    /// The spec asks for something rootcell does not support.
    #[error("config.json field {field}: {msg}")]
    Unsupported {
        /// JSON path of the field, e.g. `linux.namespaces[2].path`.
        field: String,
        /// Why and what to do.
        msg: String,
    },
}
