//! Errors of the virtio-fs device and its vhost-user front end.

use std::io;
use std::path::PathBuf;

/// Errors of this crate.
///
/// Errors from the rust-vmm crates that are not `Sync` are kept as their rendered text so that
/// this type stays `Send + Sync` and converts into `anyhow::Error` at the binary edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The shared directory is missing or not a directory.
    #[error("shared directory {path}: {source}")]
    SharedDir {
        /// The configured shared directory.
        path: PathBuf,
        /// Why it cannot be served.
        source: io::Error,
    },
    /// fuse-backend-rs refused to set up the passthrough file system.
    #[error("passthrough file system on {path}: {source}")]
    Passthrough {
        /// The configured shared directory.
        path: PathBuf,
        /// The underlying failure.
        source: io::Error,
    },
    /// Binding or listening on the vhost-user socket failed.
    #[error("vhost-user socket {path}: {reason}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The rendered vhost error.
        reason: String,
    },
    /// The vhost-user daemon (message handling or vring workers) failed.
    #[error("vhost-user-fs backend: {0}")]
    Daemon(String),
    /// An OS resource the backend needs (eventfd, thread, poll) could not be had.
    #[error("{context}: {source}")]
    Os {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A descriptor chain did not describe guest memory correctly.
    #[error("bad descriptor chain: {0}")]
    DescriptorChain(String),
    /// Guest RAM handed over by a VMM could not be described to vm-memory.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// The virtqueue itself is broken (bad ring addresses, bad indices).
    #[error("virtqueue: {0}")]
    Queue(String),
    /// A backend thread panicked.
    #[error("backend thread panicked")]
    Panicked,
}

impl Error {
    /// Wraps an OS error with what was being done.
    pub(crate) fn os(context: &'static str, source: io::Error) -> Self {
        Error::Os { context, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Error>();
    }
}
