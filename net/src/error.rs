//! The one error type of this crate.

use std::io;

/// What went wrong, with the interface, route or step it concerns.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A netlink request failed; `what` names the step and the object it was about.
    #[error("{what}: {source}")]
    Netlink {
        /// The step, e.g. `adding address 10.0.0.2/24 to eth0`.
        what: String,
        /// The kernel's answer or the socket error.
        #[source]
        source: io::Error,
    },
    /// An interface of the container cannot be given to a VM.
    #[error("interface {name} (kind {kind}) cannot be mirrored into the VM: {why}")]
    Unsupported {
        /// Interface name.
        name: String,
        /// Link kind as the kernel reports it (`veth`, `bridge`, ... or `none`).
        kind: String,
        /// Why it is refused.
        why: String,
    },
    /// A route of the container cannot be described or applied.
    #[error("route {route}: {why}")]
    Route {
        /// The route, written like `ip route` does.
        route: String,
        /// Why it failed.
        why: String,
    },
    /// No link in the guest carries a MAC address the configuration names.
    #[error("no interface with MAC {mac} for {name}; present: {present}")]
    NoSuchMac {
        /// The MAC looked for.
        mac: String,
        /// The interface name it was meant to get.
        name: String,
        /// The `name=mac` pairs that are there.
        present: String,
    },
    /// The configuration does not match the network namespace it is used in.
    #[error("{0}")]
    Mismatch(String),
    /// A system call outside netlink failed (tap device, netns handle).
    #[error("{what}: {source}")]
    Io {
        /// The step that failed.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl NetError {
    /// Wraps a netlink failure with the step it happened in.
    pub(crate) fn netlink(what: impl Into<String>, source: io::Error) -> Self {
        Self::Netlink {
            what: what.into(),
            source,
        }
    }

    /// Wraps an I/O failure with the step it happened in.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
