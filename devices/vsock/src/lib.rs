//! virtio-vsock device with a Firecracker-style "hybrid vsock" host side.
//!
//! The device logic ([`muxer::VsockMuxer`]) works on `virtio-queue` descriptor chains and knows
//! nothing about the transport, so the same muxer serves QEMU over vhost-user
//! ([`serve_vhost_user`]) and, later, the built-in VMM over in-process virtio-mmio.
//!
//! Host side convention: the device listens on the unix socket `uds_path`; a host client writes
//! `CONNECT <port>\n`, gets `OK <host_port>\n` once the guest accepted, then raw bytes flow both
//! ways. Guest connections to CID 2 port `P` are forwarded to the unix socket `<uds_path>_<P>`.

#![warn(missing_docs)]

pub mod muxer;
pub mod packet;

mod conn;
mod vhost_user;

use std::path::PathBuf;

pub use muxer::VsockMuxer;
pub use vhost_user::{serve_vhost_user, serve_vhost_user_confined, BackendHandle, Confine};

/// Configuration of one vsock device.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's context id (3 unless configured otherwise).
    pub guest_cid: u64,
    /// Path of the hybrid unix socket host clients connect to.
    pub uds_path: PathBuf,
}

/// The guest CID used when nothing else is configured.
pub const DEFAULT_GUEST_CID: u64 = 3;

impl VsockConfig {
    /// A configuration with the default guest CID (3).
    pub fn new(uds_path: impl Into<PathBuf>) -> Self {
        VsockConfig {
            guest_cid: DEFAULT_GUEST_CID,
            uds_path: uds_path.into(),
        }
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding the hybrid unix socket failed.
    #[error("binding hybrid vsock socket {path}: {source}")]
    BindHybrid {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Binding the vhost-user socket failed.
    #[error("binding vhost-user socket {path}: {source}")]
    BindVhostUser {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Setting up the epoll instance or an eventfd failed.
    #[error("setting up {what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// A backend thread panicked.
    #[error("vsock backend thread panicked")]
    ThreadPanicked,
}
