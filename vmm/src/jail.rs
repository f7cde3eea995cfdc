//! A hook through which the program embedding the VMM jails the VMM's own threads (issue 16).
//!
//! Each vCPU and device I/O thread enters the installed jail once, on itself, after any set-up
//! of its own (the virtio-fs thread's share root) and before it restricts its capabilities
//! and installs its seccomp filter, so the hook still has the capabilities it needs to move the
//! thread into a root of its own and give it an unprivileged identity. The jail itself lives
//! with the runtime's other jail code (`rootcell::jail::vmm`), where the reserved uid range
//! is; this crate only says which thread is asking. The jail also says whether the thread
//! goes on to restrict its capabilities and install its seccomp allow-list ([`Confine`]): the
//! runtime's `ROOTCELL_JAIL` turns the whole confinement of a kind of thread off, filters
//! included. Without a hook (the `rootcell-vmm` binary, unit tests) threads are confined by
//! capabilities and seccomp only.

use std::path::Path;
use std::sync::OnceLock;

/// Which of the VMM's threads is entering its jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: runs KVM_RUN and emulates MMIO and port I/O on fds it already holds.
    Vcpu,
    /// The vsock device's I/O thread: connects guest connections to host Unix sockets by
    /// path in the hybrid socket's directory (passed as the `dir` argument).
    Vsock,
    /// A virtio-net I/O thread: moves frames between the queues and its tap fd.
    Net,
    /// The virtio-fs I/O thread: already serving from its share root when it gets here.
    Fs,
    /// The thread that copies the virtio-fs I/O thread's log lines (written to a pipe in that
    /// thread's own fd table) to the log file: holds both fds already.
    LogRelay,
}

/// What a thread does once through the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confine {
    /// Restricts its capabilities and installs its seccomp allow-list, as its kind has them.
    Fully,
    /// Neither: the embedding program turned confinement off for this kind of thread (to debug
    /// the VMM with host tools, or a seccomp kill).
    Not,
}

/// The jail: called on the thread itself with its kind and, for [`ThreadKind::Vsock`], the
/// directory of its hybrid socket; says whether the thread then confines itself. An error
/// stops the thread (and fails the VM's start).
pub type ThreadJail = fn(ThreadKind, Option<&Path>) -> Result<Confine, String>;

static HOOK: OnceLock<ThreadJail> = OnceLock::new();

/// Installs the jail every VMM thread of this process enters from now on. The first one
/// installed stays; returns whether `jail` is it.
pub fn set_thread_jail(jail: ThreadJail) -> bool {
    let installed = *HOOK.get_or_init(|| jail);
    std::ptr::fn_addr_eq(installed, jail)
}

/// Runs the installed jail (if any) on the calling thread; without one the thread confines
/// itself fully.
pub(crate) fn enter(kind: ThreadKind, dir: Option<&Path>) -> Result<Confine, String> {
    match HOOK.get() {
        Some(jail) => jail(kind, dir).map_err(|e| format!("jailing the {kind:?} thread: {e}")),
        None => Ok(Confine::Fully),
    }
}
