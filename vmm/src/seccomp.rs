//! seccomp-BPF allowlists for the VMM's own threads (built with seccompiler).
//!
//! - vCPU threads: KVM_RUN (and KVM_GET_REGS, to report where a stopped guest was), device
//!   emulation (writes to the console and eventfds), locking, the kick signal, memory for
//!   messages, and thread exit.
//! - The VMM control thread (the `rootcell-vmm` binary's main thread once the VM runs): waiting,
//!   kicking and joining vCPU threads, writing its report.
//!
//! Anything else kills the process: a syscall the VMM never makes is a sign of compromise.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::error::{Error, Result};

/// `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = 0xae80;
/// `_IOR(KVMIO, 0x81, struct kvm_regs)` (144-byte argument).
pub const KVM_GET_REGS: u64 = 0x8090_ae81;

/// Syscalls any Rust thread of ours needs: memory, locks, signal return, time, exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
];

fn err(e: impl std::fmt::Display) -> Error {
    Error::Host {
        what: "building seccomp filter",
        source: std::io::Error::other(e.to_string()),
    }
}

fn ioctl_rules(cmds: &[u64]) -> Result<Vec<SeccompRule>> {
    cmds.iter()
        .map(|&cmd| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd)
                .map_err(err)?;
            SeccompRule::new(vec![cond]).map_err(err)
        })
        .collect()
}

fn build(extra: &[i64], ioctls: &[u64], on_violation: SeccompAction) -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in COMMON.iter().chain(extra) {
        rules.insert(nr, Vec::new()); // no conditions: always allowed
    }
    // Rust's std checks a descriptor is still open (F_GETFD) when an owned fd is dropped;
    // virtio activation duplicates the queue eventfds (F_DUPFD_CLOEXEC).
    let fcntl = [libc::F_GETFD, libc::F_DUPFD_CLOEXEC]
        .iter()
        .map(|&cmd| {
            let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd as u64)
                .map_err(err)?;
            SeccompRule::new(vec![c]).map_err(err)
        })
        .collect::<Result<Vec<_>>>()?;
    rules.insert(libc::SYS_fcntl, fcntl);
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rules(ioctls)?);
    }
    let arch = std::env::consts::ARCH.try_into().map_err(err)?;
    let filter =
        SeccompFilter::new(rules, on_violation, SeccompAction::Allow, arch).map_err(err)?;
    filter.try_into().map_err(err)
}

/// The allowlist for vCPU threads.
pub fn vcpu_filter(on_violation: SeccompAction) -> Result<BpfProgram> {
    build(&[libc::SYS_read], &[KVM_RUN, KVM_GET_REGS], on_violation)
}

/// The allowlist for the thread that waits on and stops a running VM.
pub fn vmm_filter(on_violation: SeccompAction) -> Result<BpfProgram> {
    build(
        &[
            libc::SYS_tgkill,
            libc::SYS_rt_sigaction,
            libc::SYS_openat,
            libc::SYS_read,
            libc::SYS_fstat,
        ],
        &[],
        on_violation,
    )
}

/// Installs `filter` on the calling thread (sets no_new_privs first, as seccomp requires).
pub fn apply(filter: &BpfProgram) -> Result<()> {
    seccompiler::apply_filter(filter).map_err(|e| Error::Host {
        what: "installing seccomp filter",
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        assert!(vcpu_filter(SeccompAction::KillProcess).unwrap().len() > COMMON.len());
        assert!(vmm_filter(SeccompAction::KillProcess).unwrap().len() > COMMON.len());
    }

    #[test]
    fn vcpu_filter_denies_what_it_does_not_list() {
        // Run in a throwaway thread: filters cannot be removed once installed.
        let t = std::thread::spawn(|| {
            apply(&vcpu_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap()).unwrap();
            // SAFETY: plain syscalls with no pointers that outlive the call.
            let (open_rc, errno) = unsafe {
                let rc = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                (rc, *libc::__errno_location())
            };
            // A listed syscall still works.
            let pid = unsafe { libc::getpid() };
            (open_rc, errno, pid)
        });
        let (rc, errno, pid) = t.join().unwrap();
        assert_eq!((rc, errno), (-1, libc::EPERM), "socket(2) must be refused");
        assert_eq!(pid, std::process::id() as i32);
    }

    #[test]
    fn unlisted_ioctl_is_denied() {
        let t = std::thread::spawn(|| {
            apply(&vcpu_filter(SeccompAction::Errno(libc::EPERM as u32)).unwrap()).unwrap();
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ writes a winsize into `ws`.
            let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
            (rc, std::io::Error::last_os_error().raw_os_error())
        });
        assert_eq!(t.join().unwrap(), (-1, Some(libc::EPERM)));
    }
}
