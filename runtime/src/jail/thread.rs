//! Per-thread confinement of the vhost-user device back ends (virtio-fs, vsock), which run as
//! threads of the sandbox process: capabilities, no_new_privs and seccomp are properties of a
//! thread, and threads a confined thread starts inherit them, so the back end's serving thread
//! confines itself before it starts the vhost-user daemon's request and vring threads (see
//! `serve_vhost_user_confined` in the device crates).
//!
//! * virtio-fs keeps exactly the capabilities ownership pass-through needs ([`FS_CAPS`]): in
//!   effective, permitted and bounding sets; nothing inheritable or ambient.
//! * vsock keeps none.
//! * seccomp, three filters: an allow-list per role (installed last) (anything else fails with EPERM, which the
//!   back end reports to the guest as an I/O error), a deny-list of what only an attacker would
//!   call (exec, ptrace, mounts and namespaces, module and BPF loading, keyrings, new
//!   processes), which kills the process, and clone3 answered with ENOSYS so thread creation
//!   falls back to clone, whose flags the allow-list can check (threads only).
//!
//! Neither keeps uid 0: each runs as an unprivileged uid of the reserved range of its own
//! ([`super::vmm::fs_thread`], [`super::vmm::vsock_thread`]): uid = gid = `UID_BASE` + the
//! serving thread's id, which the threads it starts inherit. The fs one keeps [`FS_CAPS`]
//! across the change (it makes each new file with the guest caller's fs uid and gid).

use caps::{Capability, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;
use std::io;

/// Which back end a thread serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// virtio-fs (fuse-backend-rs passthrough over vhost-user).
    Fs,
    /// The vsock muxer over vhost-user.
    Vsock,
}

/// Capabilities the virtio-fs thread keeps (the built-in VMM's virtio-fs thread keeps the same;
/// the list and the reasons are in [`rootcell_vmm::seccomp::FS_CAPS`]): CHOWN, DAC_OVERRIDE,
/// DAC_READ_SEARCH, FOWNER, FSETID, SETUID, SETGID, MKNOD, SETFCAP.
pub const FS_CAPS: &[Capability] = rootcell_vmm::seccomp::FS_CAPS;

/// Any thread of a back end: memory, locks, time, signals' return, its own exit, epoll,
/// eventfds, moving bytes on the fds it holds (the vhost-user socket with its SCM_RIGHTS,
/// queues' eventfds), mapping the guest's memory the VMM hands over.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_accept4,
];

/// The vsock muxer's own: unix sockets (connecting to `<uds>_<port>` for guest-initiated
/// connections), nothing on the file system.
const VSOCK: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// Calls that only an attacker would make from a back end: they kill the process.
const FORBIDDEN: &[i64] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_bpf,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
];

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("seccomp filter: {e}"))
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> io::Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(err)
}

fn rule(conds: Vec<SeccompCondition>) -> io::Result<SeccompRule> {
    SeccompRule::new(conds).map_err(err)
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> io::Result<BpfProgram> {
    let arch = std::env::consts::ARCH.try_into().map_err(err)?;
    SeccompFilter::new(rules, mismatch, matched, arch)
        .map_err(err)?
        .try_into()
        .map_err(err)
}

/// The three filters of `role`, in the order they must be installed.
pub fn filters(role: Role) -> io::Result<Vec<BpfProgram>> {
    let mut allow: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // virtio-fs: the passthrough's calls, the one list the built-in VMM's fs thread uses too.
    let extra = match role {
        Role::Fs => rootcell_fs::syscalls::PASSTHROUGH_SYSCALLS,
        Role::Vsock => VSOCK,
    };
    for &nr in COMMON.iter().chain(extra) {
        allow.insert(nr, Vec::new());
    }
    // Answered with ENOSYS by the clone3 filter (see below).
    allow.insert(libc::SYS_clone3, Vec::new());
    // New threads only (the daemon's request and vring threads).
    let thread = libc::CLONE_THREAD as u64;
    allow.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    // Naming those threads.
    allow.insert(
        libc::SYS_prctl,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::Eq,
            libc::PR_SET_NAME as u64,
        )?])?],
    );
    let mut fcntls = vec![
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
    ];
    if role == Role::Fs {
        // Finding the VMM's connection among its fds by the listener's name, so a stop can
        // shut it down (`rootcell_fs`' vhost-user `conn`).
        allow.insert(libc::SYS_getsockname, Vec::new());
        fcntls.extend(rootcell_fs::syscalls::PASSTHROUGH_FCNTLS);
        fcntls.sort_unstable();
        fcntls.dedup();
        // Its own RLIMIT_NOFILE only.
        allow.insert(
            libc::SYS_prlimit64,
            vec![rule(vec![cond(
                0,
                SeccompCmpOp::Eq,
                rootcell_fs::syscalls::PRLIMIT_OWN_PROCESS,
            )?])?],
        );
    } else {
        // Unix sockets only: no network from this thread.
        allow.insert(
            libc::SYS_socket,
            vec![rule(vec![cond(
                0,
                SeccompCmpOp::Eq,
                libc::AF_UNIX as u64,
            )?])?],
        );
    }
    allow.insert(
        libc::SYS_fcntl,
        fcntls
            .into_iter()
            .map(|c| rule(vec![cond(1, SeccompCmpOp::Eq, c as u64)?]))
            .collect::<io::Result<_>>()?,
    );
    allow.insert(
        libc::SYS_ioctl,
        [libc::FIONBIO, libc::FIOCLEX]
            .into_iter()
            .map(|c| rule(vec![cond(1, SeccompCmpOp::Eq, c)?]))
            .collect::<io::Result<_>>()?,
    );
    let allow = compile(
        allow,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )?;

    let mut deny: BTreeMap<i64, Vec<SeccompRule>> =
        FORBIDDEN.iter().map(|&nr| (nr, Vec::new())).collect();
    // A clone that makes a process, not a thread.
    deny.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(0, SeccompCmpOp::MaskedEq(thread), 0)?])?],
    );
    let deny = compile(deny, SeccompAction::Allow, SeccompAction::KillProcess)?;

    let clone3 = compile(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    // The allow-list goes last: once it is in, installing another filter is no longer
    // allowed. Of two errno answers the last installed filter's wins, so it allows clone3
    // and leaves the ENOSYS to the filter before it.
    Ok(vec![deny, clone3, allow])
}

/// The capabilities `role` keeps.
pub fn kept_caps(role: Role) -> CapsHashSet {
    match role {
        Role::Fs => FS_CAPS.iter().copied().collect(),
        Role::Vsock => CapsHashSet::new(),
    }
}

/// Confines the calling thread as `role`: capabilities, then seccomp (which sets
/// no_new_privs). Irreversible for this thread and every thread it starts later.
/// The fs role also takes its unprivileged uid here ([`super::vmm::fs_thread`]); the vsock
/// role's is taken before, with its root ([`super::vmm::vsock_thread`]).
pub fn confine(role: Role) -> io::Result<()> {
    let filters = filters(role)?;
    if role == Role::Fs {
        super::vmm::fs_thread()?;
    }
    restrict_caps(role)?;
    for f in &filters {
        seccompiler::apply_filter(f).map_err(|e| err(format!("installing: {e}")))?;
    }
    tracing::debug!(?role, "back-end thread confined");
    Ok(())
}

fn restrict_caps(role: Role) -> io::Result<()> {
    let keep: Vec<Capability> = kept_caps(role).into_iter().collect();
    rootcell_vmm::seccomp::keep_caps(&keep).map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests;
