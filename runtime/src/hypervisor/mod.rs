//! Hypervisor backends: something that boots the guest with a hybrid-vsock socket and a
//! virtio-fs share: QEMU, or rootcell's own VMM (`builtin`); [`select`] decides which.

pub mod builtin;
pub mod joined;
pub mod pooled;
pub mod qemu;
pub mod select;

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
    /// Whose VM this is, named on the hypervisor process's command line (QEMU's `-name`, the
    /// built-in VMM's `--for`) so that `ps`, and the tests' leftover check, tell which container
    /// a VMM serves: the container's state dir (`<root>/<id>`, both names a user gave), or a
    /// pool VM's dir (`<pool dir>/vm-N`) for a VM booted before any container claims it.
    pub owner: PathBuf,
    /// Hybrid vsock unix socket the host connects to (`CONNECT <port>`).
    pub vsock_uds: PathBuf,
    /// Guest CID.
    pub guest_cid: u64,
    /// Host directory exported over virtio-fs.
    pub share_dir: PathBuf,
    /// Virtio-fs tag of that share.
    pub share_tag: String,
    /// Network cards, each backed by a tap device the sandbox keeps open.
    pub nets: Vec<NetCard>,
}

/// A virtio-net card of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetCard {
    /// Open tap device (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), owned by the caller.
    pub tap_fd: std::os::fd::RawFd,
    /// The card's MAC address (the mirrored host interface's).
    pub mac: rootcell_protocol::net::MacAddr,
    /// MTU advertised to the guest.
    pub mtu: u32,
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
    /// The built-in VMM could not start the guest.
    #[error("the built-in VMM cannot boot {kernel}: {cause}")]
    Builtin {
        /// The kernel it was given.
        kernel: PathBuf,
        /// The VMM's error, as its process reported it (in the message, not a `source`, so
        /// it is printed once).
        cause: String,
    },
    /// No backend could be chosen (bad `--hypervisor`/env value or config file).
    #[error(transparent)]
    Select(#[from] select::SelectError),
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
    /// Pid of the hypervisor process (QEMU, the built-in VMM's process), if it is not the
    /// caller's.
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
    /// Ends the guest now, without waiting for it to power off: for a guest whose agent has
    /// answered `Shutdown` (its file systems are synced, nothing of the container's is left in
    /// it). [`Vm::finish`] then releases the rest without waiting. Kills by default.
    fn end(&self) {
        self.kill();
    }
}

/// A chosen backend with the guest images it boots.
pub struct Opened {
    /// The backend.
    pub hypervisor: Box<dyn Hypervisor>,
    /// Kernel (vmlinux for builtin, bzImage for QEMU) and initramfs.
    pub images: crate::assets::GuestImages,
    /// Which backend and why.
    pub selection: select::Selection,
}

/// The boot files `backend` needs; an error names the missing one.
fn images_for(backend: select::Backend) -> Result<crate::assets::GuestImages, HypervisorError> {
    match backend {
        select::Backend::Builtin => crate::assets::locate_builtin(),
        select::Backend::Qemu => crate::assets::locate(),
    }
}

/// Chooses the backend and checks that its files exist, without starting anything (so
/// `create` fails before making state).
pub fn preflight() -> Result<select::Selection, HypervisorError> {
    let selection = select::resolve_from_env()?;
    tracing::debug!(
        hypervisor = selection.backend.as_str(),
        "hypervisor: {} ({})",
        selection.backend.as_str(),
        selection.reason
    );
    images_for(selection.backend)?;
    if selection.backend == select::Backend::Qemu {
        qemu::find_program()?;
    }
    Ok(selection)
}

/// Chooses the backend, logs which and why, and finds its boot files.
pub fn open() -> Result<Opened, HypervisorError> {
    let selection = select::resolve_from_env()?;
    tracing::info!(
        hypervisor = selection.backend.as_str(),
        "hypervisor: {} ({})",
        selection.backend.as_str(),
        selection.reason
    );
    let images = images_for(selection.backend)?;
    let hypervisor: Box<dyn Hypervisor> = match selection.backend {
        select::Backend::Builtin => Box::new(builtin::Builtin),
        select::Backend::Qemu => {
            let program = qemu::find_program()?;
            let (accel, why) = qemu::detect_accel();
            tracing::info!(?accel, "accelerator: {why}");
            Box::new(qemu::Qemu::new(program, accel))
        }
    };
    Ok(Opened {
        hypervisor,
        images,
        selection,
    })
}
