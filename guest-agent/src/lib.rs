//! rootcell's in-guest agent: PID 1 of the guest initramfs. It prepares the guest, listens on
//! vsock, builds the container from the OCI spec the host sends, and runs its processes.

pub mod agent;
pub mod clock;
pub mod container;
pub mod dns;
pub mod listener;
pub mod log;
pub mod net;
pub mod oom;
pub mod pid1;
pub mod registry;
pub mod resources;
pub mod server;
pub mod sink;
pub mod streams;
pub mod terminal;
pub mod threads;
