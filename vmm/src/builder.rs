//! The VM builder, in Firecracker's sense: configuration in, running VM out.
//! [`BuiltinVm::start`] takes a [`BuiltinConfig`] (guest kernel and initramfs, RAM, vCPUs, the
//! hybrid vsock socket, the virtio-fs share, one virtio-net card per tap the runtime hands in),
//! opens the devices, builds the [`Vm`] with them attached and starts it, and hands back a
//! [`RunningBuiltinVm`]. That is all the runtime needs to reach the guest agent, and the entry
//! point it calls when it picks the `builtin` hypervisor; [`crate::vm`] is the layer below
//! (one VM, any devices).
//!
//! Every thread the VM adds to the caller's process is confined by seccomp: vCPU threads by
//! their allowlist (device activation and reset only hand work to the devices' I/O threads,
//! spawned here before the first KVM_RUN), and each device I/O thread by its own (see
//! [`crate::seccomp`]), unless the caller's jail turns that off for the thread
//! ([`crate::jail::Confine::Not`]). The caller's threads are left alone: the runtime keeps
//! using its own.
//!
//! ```no_run
//! use std::time::Duration;
//! use rootcell_vmm::builder::{BuiltinConfig, BuiltinVm};
//! let mut config = BuiltinConfig::new("/path/vmlinux", "/run/c1/vsock.sock", "/run/c1/rootfs");
//! config.initramfs = Some("/path/initramfs.cpio.gz".into());
//! config.console_log = Some("/run/c1/console.log".into());
//! let vm = BuiltinVm::start(config)?;
//! // The agent is reached with `CONNECT 1024\n` on /run/c1/vsock.sock.
//! let exit = vm.wait_timeout(Duration::from_secs(30));
//! let report = vm.stop();
//! println!("{exit:?} {report:?}");
//! # Ok::<(), rootcell_vmm::Error>(())
//! ```

use std::path::PathBuf;
use std::time::Duration;

use rootcell_fs::FsConfig;
use rootcell_vsock::VsockConfig;

use crate::devices::virtio::fs::{FsDeviceError, VirtioFs};
use crate::devices::virtio::net::{NetDevice, NetDeviceError};
use crate::devices::virtio::vsock::{VsockDevice, VsockDeviceError};
use crate::error::{Error, Result};
use crate::exit::VmExit;
use crate::vm::{RunningVm, SerialOutput, VirtioSlot, Vm, VmConfig, VmReport};

pub use crate::devices::virtio::net::NetConfig;

/// Kernel parameters every builtin guest gets before the caller's: console on COM1, a reboot
/// that pulses the i8042 (the VMM's clean exit), reboot at once on panic. The i8042 has no
/// keyboard or mouse behind it: the kernel is told so, and does not probe for them.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.nokbd i8042.noaux i8042.nomux";

/// What to boot and share for one container.
#[derive(Debug, Clone)]
pub struct BuiltinConfig {
    /// Guest kernel (ELF vmlinux preferred; bzImage also works).
    pub kernel: PathBuf,
    /// Guest initramfs (the agent as `/init`).
    pub initramfs: Option<PathBuf>,
    /// Extra kernel parameters, appended to [`BASE_CMDLINE`].
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// File the serial console is appended to (`None`: discarded).
    pub console_log: Option<PathBuf>,
    /// Path of the hybrid vsock unix socket (guest connections to host port P go to
    /// `<vsock_uds>_<P>`).
    pub vsock_uds: PathBuf,
    /// The guest's vsock CID.
    pub guest_cid: u64,
    /// Leave the `vsock_uds` socket file in place when the VM is dropped (or fails to start):
    /// for a caller that removes it itself because the thread that drops the VM may not
    /// unlink files (the runtime's jailed VMM process).
    pub leave_vsock_socket: bool,
    /// Host directory exported over virtio-fs.
    pub fs_shared_dir: PathBuf,
    /// The tag the guest mounts the share by.
    pub fs_tag: String,
    /// Refuse guest writes to the share.
    pub fs_read_only: bool,
    /// Serve the share from a mount namespace whose root holds only it and from an fd table
    /// of its own ([`VirtioFs::with_share_root`]).
    pub fs_share_root: bool,
    /// With `fs_share_root`: fds of this process's table the virtio-fs thread's log lines go
    /// to (the log file of the process's log writer), relayed to it through a pipe.
    pub fs_log_relay: Vec<std::os::fd::RawFd>,
    /// One virtio-net card per entry, in order; the guest finds each card by its MAC.
    /// Empty: no network card.
    pub net: Vec<NetConfig>,
}

impl BuiltinConfig {
    /// A config with 1 vCPU, 256 MiB, CID 3, the protocol's share tag, read-write share, no
    /// initramfs and no console log.
    pub fn new(
        kernel: impl Into<PathBuf>,
        vsock_uds: impl Into<PathBuf>,
        fs_shared_dir: impl Into<PathBuf>,
    ) -> Self {
        BuiltinConfig {
            kernel: kernel.into(),
            initramfs: None,
            cmdline: String::new(),
            mem_mib: 256,
            vcpus: 1,
            console_log: None,
            vsock_uds: vsock_uds.into(),
            guest_cid: rootcell_vsock::DEFAULT_GUEST_CID,
            leave_vsock_socket: false,
            fs_shared_dir: fs_shared_dir.into(),
            fs_tag: rootcell_protocol::SHARE_TAG.to_owned(),
            fs_read_only: false,
            fs_share_root: false,
            fs_log_relay: Vec::new(),
            net: Vec::new(),
        }
    }
}

/// The builder of the `builtin` backend: [`BuiltinVm::start`] turns a [`BuiltinConfig`] into a
/// [`RunningBuiltinVm`].
#[derive(Debug)]
pub struct BuiltinVm;

impl BuiltinVm {
    /// Opens the devices, builds the VM, attaches vsock and virtio-fs, and starts the vCPUs.
    /// On error nothing is left behind: no thread, no socket file, no console file.
    pub fn start(config: BuiltinConfig) -> Result<RunningBuiltinVm> {
        let mut cmdline = BASE_CMDLINE.to_owned();
        if !config.cmdline.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(config.cmdline.trim());
        }
        let mut vm_config = VmConfig::new(&config.kernel, cmdline);
        vm_config.initramfs = config.initramfs.clone();
        vm_config.mem_mib = config.mem_mib;
        vm_config.vcpus = config.vcpus;
        vm_config.seccomp = true;
        vm_config.serial = match &config.console_log {
            Some(p) => SerialOutput::File(p.clone()),
            None => SerialOutput::Sink,
        };
        let mut vsock = VsockDevice::new(&VsockConfig {
            guest_cid: config.guest_cid,
            uds_path: config.vsock_uds.clone(),
        })
        .map_err(vsock_err)?;
        if config.leave_vsock_socket {
            vsock.leave_socket_file();
        }
        let fs_config = FsConfig {
            shared_dir: config.fs_shared_dir.clone(),
            read_only: config.fs_read_only,
        };
        let fs = if config.fs_share_root {
            VirtioFs::with_share_root(&fs_config, &config.fs_tag, &config.fs_log_relay)
        } else {
            VirtioFs::new(&fs_config, &config.fs_tag)
        }
        .map_err(fs_err)?;
        let nets = config
            .net
            .iter()
            .enumerate()
            .map(|(i, n)| NetDevice::new(n).map_err(|e| net_err(i, e)))
            .collect::<Result<Vec<_>>>()?;
        // Last, because it creates the console file: a device that failed above leaves none.
        let mut vm = Vm::create(vm_config)?;
        let vsock_slot = vm.add_virtio_device(Box::new(vsock))?;
        let fs_slot = vm.add_virtio_device(Box::new(fs))?;
        let net_slots = nets
            .into_iter()
            .map(|n| vm.add_virtio_device(Box::new(n)))
            .collect::<Result<Vec<_>>>()?;
        let cmdline = vm.cmdline().to_owned();
        let vm = vm.start()?;
        Ok(RunningBuiltinVm {
            vm,
            cmdline,
            vsock_slot,
            fs_slot,
            net_slots,
            vsock_uds: config.vsock_uds,
        })
    }
}

fn vsock_err(e: VsockDeviceError) -> Error {
    Error::Device(format!("virtio-vsock: {e}"))
}

fn fs_err(e: FsDeviceError) -> Error {
    Error::Device(format!("virtio-fs: {e}"))
}

fn net_err(index: usize, e: NetDeviceError) -> Error {
    Error::Device(format!("virtio-net #{index}: {e}"))
}

/// A running builtin VM; dropping it stops the vCPUs and the devices (the vsock socket file is
/// removed, unless [`BuiltinConfig::leave_vsock_socket`]).
pub struct RunningBuiltinVm {
    vm: RunningVm,
    cmdline: String,
    vsock_slot: VirtioSlot,
    fs_slot: VirtioSlot,
    net_slots: Vec<VirtioSlot>,
    vsock_uds: PathBuf,
}

impl std::fmt::Debug for RunningBuiltinVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningBuiltinVm")
            .field("cmdline", &self.cmdline)
            .field("vsock_slot", &self.vsock_slot)
            .field("fs_slot", &self.fs_slot)
            .field("net_slots", &self.net_slots)
            .field("vsock_uds", &self.vsock_uds)
            .finish()
    }
}

impl RunningBuiltinVm {
    /// Waits up to `timeout` for the guest to end the VM (reboot, shutdown, or a vCPU error).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.vm.wait_timeout(timeout)
    }

    /// The VM's exit latch (see [`RunningVm::exit_latch`]).
    pub fn exit_latch(&self) -> std::sync::Arc<crate::exit::ExitLatch> {
        self.vm.exit_latch()
    }

    /// Snapshots of every vCPU's status (see [`crate::vcpu::VcpuStatus`]).
    pub fn vcpu_status(&self) -> Vec<crate::vcpu::VcpuStatus> {
        self.vm.vcpu_status()
    }

    /// Stops the vCPUs (bounded), then the devices; reports where the guest got to.
    pub fn stop(self) -> VmReport {
        self.vm.stop()
    }

    /// Pauses the guest: no vCPU runs and no device serves its queues until [`Self::resume`]
    /// (see [`RunningVm::pause`]).
    pub fn pause(&self) -> Result<()> {
        self.vm.pause()
    }

    /// Resumes a paused guest.
    pub fn resume(&self) {
        self.vm.resume()
    }

    /// Whether the guest is paused.
    pub fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }

    /// The kernel command line the guest was given (with the virtio-mmio declarations).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Where the vsock and virtio-fs devices sit (register window and IRQ).
    pub fn slots(&self) -> (VirtioSlot, VirtioSlot) {
        (self.vsock_slot, self.fs_slot)
    }

    /// Where the virtio-net cards sit, in [`BuiltinConfig::net`] order.
    pub fn net_slots(&self) -> &[VirtioSlot] {
        &self.net_slots
    }

    /// The hybrid vsock socket host clients connect to.
    pub fn vsock_uds(&self) -> &std::path::Path {
        &self.vsock_uds
    }
}
