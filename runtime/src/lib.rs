//! The rootcell runtime as a library: the runc-style commands (`commands`), the per-container
//! sandbox process (`sandbox`), the hypervisor backends (`hypervisor`) and what they share.
//! The `rootcell` binary is a thin command line over it.

pub mod agent;
pub mod assets;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod console;
pub mod control;
pub mod dns;
pub mod error;
pub mod hooks;
pub mod hypervisor;
pub mod id;
pub mod jail;
pub mod join;
pub mod logging;
pub mod network;
pub mod oom;
pub mod paths;
pub mod pidfd;
pub mod pool;
pub mod rlimits;
pub mod sandbox;
pub mod share;
pub mod signal;
pub mod spec;
pub mod state;
pub mod stdio;
pub mod timefmt;
pub mod timeouts;
