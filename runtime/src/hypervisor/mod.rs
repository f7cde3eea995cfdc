//! Hypervisor backends: something that boots the guest with a hybrid-vsock socket and a
//! virtio-fs share. QEMU today; the built-in VMM plugs in behind the same trait later.

pub mod qemu;

use std::path::PathBuf;
use std::time::Duration;

/// What every backend needs to boot one container's guest.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Guest kernel image.
    pub kernel: PathBuf,
    /// Initramfs with the agent as /init.
    pub initrd: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Kernel command line.
    pub cmdline: String,
    /// File that receives the serial console.
    pub console_log: PathBuf,
    /// File that receives the hypervisor's own diagnostics.
    pub hypervisor_log: PathBuf,
    /// Directory for the backend's private sockets (must be short).
    pub socket_dir: PathBuf,
    /// Hybrid vsock unix socket the host connects to (`CONNECT <port>`).
    pub vsock_uds: PathBuf,
    /// Guest CID.
    pub guest_cid: u64,
    /// Host directory exported over virtio-fs.
    pub share_dir: PathBuf,
    /// Virtio-fs tag of that share.
    pub share_tag: String,
}

/// Errors starting or running a guest.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// A required file or program is missing.
    #[error("{what} not found at {path}: {hint}")]
    Missing {
        /// What is missing.
        what: &'static str,
        /// Where we looked.
        path: PathBuf,
        /// What to do.
        hint: &'static str,
    },
    /// A device backend could not start.
    #[error("cannot start the {device} device backend: {msg}")]
    Device {
        /// Which device.
        device: &'static str,
        /// Its error.
        msg: String,
    },
    /// The hypervisor process could not be spawned.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A hypervisor backend.
pub trait Hypervisor {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// Starts the device backends and boots the guest.
    fn start(&self, config: &VmConfig) -> Result<Box<dyn Vm>, HypervisorError>;
}

/// A running guest.
pub trait Vm: Send + Sync {
    /// Pid of the hypervisor process, if it is a separate process.
    fn pid(&self) -> Option<i32>;
    /// Blocks until the guest has stopped; returns the hypervisor's exit status (shell
    /// convention). Does not reap, so [`Vm::kill`] stays safe against pid reuse.
    fn wait_stopped(&self) -> i32;
    /// Non-blocking: the exit status if the guest has stopped.
    fn try_stopped(&self) -> Option<i32>;
    /// Kills the guest immediately.
    fn kill(&self);
    /// Freezes (`true`) or thaws (`false`) every vCPU and device of the guest.
    fn set_paused(&self, paused: bool) -> std::io::Result<()>;
    /// Waits up to `timeout` for the guest to stop, kills it if it has not, then releases
    /// everything (process, device backends).
    fn finish(&self, timeout: Duration);
}
