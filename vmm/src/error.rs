//! The VMM's error type: one variant per thing that can go wrong, each with the context a user
//! needs to act on it (which file, which limit, which ioctl).

use std::path::PathBuf;

/// Everything the VMM can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` does not exist on this host.
    #[error(
        "/dev/kvm not found: this host has no KVM (load kvm_intel/kvm_amd or use the qemu backend)"
    )]
    KvmAbsent,
    /// `/dev/kvm` exists but could not be opened (usually permissions).
    #[error("cannot open /dev/kvm: {0} (is the user in the kvm group?)")]
    KvmAccess(#[source] std::io::Error),
    /// The KVM API version is not the stable one (12).
    #[error("unsupported KVM API version {0}, expected 12")]
    KvmApiVersion(i32),
    /// The host KVM lacks a capability the VMM relies on.
    #[error("KVM lacks required capability {0}")]
    KvmCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// Which operation failed.
        op: &'static str,
        /// The errno from the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Requested memory size outside the supported range.
    #[error("memory size {got_mib} MiB out of range ({min_mib}..={max_mib} MiB)")]
    MemorySize {
        /// What was asked for.
        got_mib: u64,
        /// Smallest supported size.
        min_mib: u64,
        /// Largest supported size.
        max_mib: u64,
    },
    /// Requested vCPU count outside the supported range.
    #[error("vCPU count {got} out of range (1..={max})")]
    VcpuCount {
        /// What was asked for.
        got: u64,
        /// The largest supported count (ours or KVM's, whichever is lower).
        max: u64,
    },
    /// Guest memory could not be created or mapped.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A guest image (kernel or initramfs) could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    ImageIo {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither an ELF vmlinux nor a bzImage.
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage (first bytes {magic:02x?})")]
    KernelFormat {
        /// The path given.
        path: PathBuf,
        /// The first bytes of the file, for diagnosis.
        magic: Vec<u8>,
    },
    /// The kernel does not fit in (or is not loadable into) guest memory.
    #[error("kernel {path} cannot be loaded into {mem_mib} MiB of guest memory: {reason}")]
    KernelLoad {
        /// The path given.
        path: PathBuf,
        /// Guest memory size.
        mem_mib: u64,
        /// What linux-loader or our checks said.
        reason: String,
    },
    /// The initramfs file is empty.
    #[error("initramfs {path} is empty")]
    InitramfsEmpty {
        /// The path given.
        path: PathBuf,
    },
    /// The initramfs does not fit between the kernel and the top of guest memory.
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory: {avail} bytes free above the kernel")]
    InitramfsTooLarge {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// How much room there was.
        avail: u64,
    },
    /// The kernel command line is invalid or too long.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("writing {what} into guest memory: {reason}")]
    BootSetup {
        /// Which structure.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The serial console output could not be opened.
    #[error("serial console output {path}: {source}")]
    SerialOutput {
        /// The path given.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A host-side resource (eventfd, thread, signal handler) could not be created.
    #[error("{what}: {source}")]
    Host {
        /// Which resource.
        what: &'static str,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A device could not be attached.
    #[error("device: {0}")]
    Device(String),
    /// Pausing the VM failed (it was resumed again).
    #[error("pausing the VM: {0}")]
    Pause(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps a kvm-ioctls error with the name of the operation that failed.
pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
