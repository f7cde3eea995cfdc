//! Confinement of what the guest can drive (issue 16): a VMM escape should land in a jail.
//!
//! * [`process`]: the VMM process (QEMU) runs as an unprivileged uid/gid of its own, without
//!   capabilities and unable to regain any (empty bounding set, no_new_privs), in mount, IPC,
//!   UTS and network namespaces of its own whose root is a small read-only tmpfs holding only
//!   what QEMU needs to start; what root must open is opened before and passed in.
//! * [`thread`]: the vhost-user device back ends, threads of the sandbox process, confine
//!   themselves: capabilities (virtio-fs keeps what ownership pass-through needs, vsock
//!   none) and seccomp allow-lists; the vsock one serves from a root holding only its socket
//!   directory.
//! * [`vmm`]: the built-in VMM's vCPU and device threads, threads of the sandbox process, each
//!   in a root of its own, the vCPU and virtio-net ones as unprivileged uids of the same range.
//!
//! The uid and gid of a jailed VMM are [`UID_BASE`] + its pid: unique among the processes
//! alive at any moment (a pid is below 2^22), so no two VMMs share an identity that would let
//! one signal or ptrace the other, and nothing needs allocating or releasing. The range
//! `UID_BASE .. UID_BASE + 2^22` is reserved for this.

pub mod process;
pub mod thread;
pub mod vmm;

/// First uid (and gid) of the range reserved for jailed VMMs: 2113929216.
pub const UID_BASE: u32 = 0x7e00_0000;
/// Size of the reserved range: the kernel's largest pid_max (2^22).
pub const UID_RANGE: u32 = 1 << 22;

/// Which halves of the confinement apply, from `ROOTCELL_JAIL`. Each half is whole: identity,
/// root, capabilities and seccomp filters go together, so that turning a half off (to debug a
/// VMM with host tools, or a seccomp kill) leaves none of it on.
///
/// * The VMM's: QEMU's jail and its own seccomp sandbox (`-sandbox on`); the built-in VMM's
///   vCPU and virtio-net threads and its process's control threads.
/// * The device back ends': the vhost-user virtio-fs and vsock threads of the QEMU path; the
///   built-in VMM's virtio-fs, vsock and fs log relay threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Halves {
    /// The VMM's half.
    pub vmm: bool,
    /// The device back ends' half.
    pub backends: bool,
}

impl Halves {
    /// From `ROOTCELL_JAIL`'s value: `0`, neither half; `qemu`, only the VMM's; `backends`,
    /// only the back ends' (the two to measure what each costs); unset or anything else, both.
    pub fn from_setting(value: Option<&str>) -> Self {
        Halves {
            vmm: !matches!(value, Some("0") | Some("backends")),
            backends: !matches!(value, Some("0") | Some("qemu")),
        }
    }

    /// The halves this process applies.
    pub fn current() -> Self {
        Self::from_setting(std::env::var("ROOTCELL_JAIL").ok().as_deref())
    }
}

/// Whether VMMs are jailed or back ends confined (see [`Halves`]; the log says when not).
pub fn enabled() -> bool {
    qemu_enabled() || backends_enabled()
}

/// Whether the VMM's half applies (see [`Halves`]).
pub fn qemu_enabled() -> bool {
    Halves::current().vmm
}

/// Whether the device back ends' half applies (see [`Halves`]).
pub fn backends_enabled() -> bool {
    Halves::current().backends
}
