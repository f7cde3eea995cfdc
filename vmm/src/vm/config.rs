//! What a VM is built from: [`VmConfig`] and its limits, and where the serial console goes.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::arch::x86_64::mptable;
use crate::error::{Error, Result};

/// Smallest guest RAM we boot (a tiny kernel plus initramfs needs a few MiB of its own).
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest RAM: 256 GiB, whatever the host has. Guest RAM is a sparse memfd, so only
/// what the guest touches costs host memory; at the limit RAM ends at 257 GiB, within the 39
/// physical address bits of current x86_64 server CPUs.
pub const MAX_MEM_MIB: u64 = 256 << 10;
/// Default KVM device.
pub const KVM_PATH: &str = "/dev/kvm";
/// How long [`RunningVm::pause`](super::RunningVm::pause) waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the guest's serial console output goes.
pub enum SerialOutput {
    /// Discarded.
    Sink,
    /// Appended to this file (created if missing).
    File(PathBuf),
    /// Written to the caller's writer.
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialOutput::Sink => f.write_str("Sink"),
            SerialOutput::File(p) => write!(f, "File({})", p.display()),
            SerialOutput::Writer(_) => f.write_str("Writer(..)"),
        }
    }
}

/// Everything needed to boot a VM.
#[derive(Debug)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio, possibly compressed).
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (virtio-mmio device declarations are appended to it).
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Serial console destination.
    pub serial: SerialOutput,
    /// The KVM device node (normally [`KVM_PATH`]).
    pub kvm_path: PathBuf,
    /// Confine each vCPU thread with [`crate::seccomp::vcpu_filter`] (a violation kills the
    /// process). Device activation and reset run on a vCPU thread: the vsock and virtio-fs
    /// devices only hand them to their I/O threads, so they work under it (and
    /// [`crate::builder`] turns it on). Off by default for devices that may need more.
    pub seccomp: bool,
}

impl VmConfig {
    /// A config with 1 vCPU, 128 MiB, no initramfs, console discarded.
    pub fn new(kernel: impl Into<PathBuf>, cmdline: impl Into<String>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initramfs: None,
            cmdline: cmdline.into(),
            mem_mib: 128,
            vcpus: 1,
            serial: SerialOutput::Sink,
            kvm_path: PathBuf::from(KVM_PATH),
            seccomp: false,
        }
    }

    /// Checks the ranges that do not depend on the host.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(Error::MemorySize {
                got_mib: self.mem_mib,
                min_mib: MIN_MEM_MIB,
                max_mib: MAX_MEM_MIB,
            });
        }
        if self.vcpus == 0 || self.vcpus > mptable::MAX_CPUS {
            return Err(Error::VcpuCount {
                got: self.vcpus.into(),
                max: mptable::MAX_CPUS.into(),
            });
        }
        Ok(())
    }
}
