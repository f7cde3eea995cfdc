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

/// Whether VMMs are jailed and back ends confined: yes unless `ROOTCELL_JAIL=0` (for debugging
/// a VMM with host tools; the log says so). `ROOTCELL_JAIL=qemu` or `=backends` applies only
/// that half, to measure what each costs.
pub fn enabled() -> bool {
    qemu_enabled() || backends_enabled()
}

/// Whether QEMU runs in its jail (see [`enabled`]).
pub fn qemu_enabled() -> bool {
    !matches!(setting().as_deref(), Some("0") | Some("backends"))
}

/// Whether the device back-end threads confine themselves (see [`enabled`]).
pub fn backends_enabled() -> bool {
    !matches!(setting().as_deref(), Some("0") | Some("qemu"))
}

fn setting() -> Option<String> {
    std::env::var("ROOTCELL_JAIL").ok()
}
