//! seccomp-BPF allowlists for the VMM's own threads (built with seccompiler).
//!
//! - vCPU threads: KVM_RUN (and KVM_GET_REGS, KVM_GET_SREGS and KVM_GET_LAPIC, to report where
//!   a stopped or triple-faulted guest was and which interrupts it had pending), device emulation (writes to the console and eventfds), locking,
//!   the kick signal, memory for messages, and thread exit.
//! - Device I/O threads (one per virtio device, confined by the device before it serves the
//!   guest): epoll on eventfds plus what each device's back end needs — the tap for virtio-net,
//!   unix sockets for virtio-vsock, the file system calls of the passthrough for virtio-fs.
//!   None of them may create processes, execute programs, open network sockets (vsock: unix
//!   sockets only), mount, trace, or load anything.
//! - The VMM control thread (the `rootcell-vmm` binary's main thread once the VM runs): waiting,
//!   kicking and joining vCPU threads, writing its report.
//!
//! Anything else kills the process: a syscall the VMM never makes is a sign of compromise (the
//! kernel's audit log records the offending syscall number). Except opening a file, in a filter
//! that does not list it: that gets EACCES (`refuse_opens`), because glibc opens files on its
//! own, at moments no code of ours chooses (malloc reads /proc/sys/vm/overcommit_memory the
//! first time any thread's arena shrinks), and a jailed thread could not read them anyway.

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
/// `_IOR(KVMIO, 0x83, struct kvm_sregs)` (312-byte argument): a vCPU thread reads it at a
/// triple fault, to report the faulting context.
pub const KVM_GET_SREGS: u64 = 0x8138_ae83;
/// `_IOR(KVMIO, 0x8e, struct kvm_lapic_state)` (1024-byte argument): a vCPU thread reads its
/// local APIC once stopped, to report interrupts in service or pending (issue 12).
pub const KVM_GET_LAPIC: u64 = 0x8400_ae8e;

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

/// What one thread may do beyond [`COMMON`].
#[derive(Default)]
struct Spec<'a> {
    /// Syscalls allowed with any arguments.
    syscalls: &'a [i64],
    /// `ioctl` requests allowed (argument 1).
    ioctls: &'a [u64],
    /// `fcntl` commands allowed (argument 1) besides F_GETFD and F_DUPFD_CLOEXEC.
    fcntls: &'a [i32],
    /// Syscalls allowed only when argument `.1` equals `.2`.
    arg_eq: &'a [(i64, u8, u64)],
}

fn arg_rules(index: u8, values: impl IntoIterator<Item = u64>) -> Result<Vec<SeccompRule>> {
    values
        .into_iter()
        .map(|v| {
            let c = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                .map_err(err)?;
            SeccompRule::new(vec![c]).map_err(err)
        })
        .collect()
}

fn build_spec(spec: &Spec, on_violation: SeccompAction) -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in COMMON.iter().chain(spec.syscalls) {
        rules.insert(nr, Vec::new()); // no conditions: always allowed
    }
    // Rust's std checks a descriptor is still open (F_GETFD) when an owned fd is dropped;
    // virtio activation duplicates the queue eventfds (F_DUPFD_CLOEXEC).
    let fcntls = [libc::F_GETFD, libc::F_DUPFD_CLOEXEC]
        .iter()
        .chain(spec.fcntls)
        .map(|&c| c as u64);
    rules.insert(libc::SYS_fcntl, arg_rules(1, fcntls)?);
    if !spec.ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, arg_rules(1, spec.ioctls.iter().copied())?);
    }
    for &(nr, index, value) in spec.arg_eq {
        rules
            .entry(nr)
            .or_default()
            .extend(arg_rules(index, [value])?);
    }
    let arch = std::env::consts::ARCH.try_into().map_err(err)?;
    let filter =
        SeccompFilter::new(rules, on_violation, SeccompAction::Allow, arch).map_err(err)?;
    let program: BpfProgram = filter.try_into().map_err(err)?;
    Ok(if spec.syscalls.contains(&libc::SYS_openat) {
        program
    } else {
        refuse_opens(program)
    })
}

/// Prefixes `program` with: `openat` and `open` fail with EACCES. glibc opens files by itself
/// (`__open_nocancel`): the first time a thread's malloc arena shrinks, it reads
/// /proc/sys/vm/overcommit_memory, once per process, and treats a failed open as "0". In the
/// built-in VMM that is some confined thread's free() (the vsock thread's after a container's
/// 200 KB of stdin, in the nested lane's Docker 26 test), and killing the process for it
/// ended the container with 159 (128 + SIGSYS). The open is still never made; the thread gets
/// the error its empty root would give.
fn refuse_opens(program: BpfProgram) -> BpfProgram {
    // linux/filter.h: BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K.
    const LD_ABS: u16 = 0x20;
    const JEQ: u16 = 0x15;
    const RET: u16 = 0x06;
    // struct seccomp_data: nr at 0, arch at 4; AUDIT_ARCH_X86_64.
    const ARCH_X86_64: u32 = 0xc000_003e;
    let ins = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    let mut p = vec![
        ins(LD_ABS, 0, 0, 4),
        // Another ABI: straight to the program, whose own check refuses it.
        ins(JEQ, 0, 4, ARCH_X86_64),
        ins(LD_ABS, 0, 0, 0),
        ins(JEQ, 1, 0, libc::SYS_openat as u32),
        ins(JEQ, 0, 1, libc::SYS_open as u32),
        ins(RET, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EACCES as u32),
    ];
    p.extend(program);
    p
}

fn build(extra: &[i64], ioctls: &[u64], on_violation: SeccompAction) -> Result<BpfProgram> {
    build_spec(
        &Spec {
            syscalls: extra,
            ioctls,
            ..Spec::default()
        },
        on_violation,
    )
}

/// What every device I/O thread does: wait on epoll, read and write eventfds and its back
/// end's fds, close fds it drops.
const DEVICE_IO: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
];

fn device_io(extra: &[i64]) -> Vec<i64> {
    DEVICE_IO.iter().chain(extra).copied().collect()
}

/// The allowlist for the virtio-net I/O thread: epoll, the queue eventfds, the tap (read and
/// write only; it was configured before the thread was confined).
pub fn net_io_filter(on_violation: SeccompAction) -> Result<BpfProgram> {
    build(&device_io(&[]), &[], on_violation)
}

/// The allowlist for the virtio-vsock I/O thread: epoll, the queue eventfds, and unix
/// sockets — accepting host clients, connecting to `<uds>_<port>` for guest-initiated
/// connections, moving bytes, shutting them down. It removes no file: the hybrid socket is
/// removed by the thread that drops the device ([`crate::devices::virtio::vsock`]) or by its
/// owner, and `<uds>_<port>` by whoever bound them.
pub fn vsock_io_filter(on_violation: SeccompAction) -> Result<BpfProgram> {
    build_spec(
        &Spec {
            syscalls: &device_io(&[
                libc::SYS_accept4,
                libc::SYS_connect,
                libc::SYS_recvfrom,
                libc::SYS_recvmsg,
                libc::SYS_sendto,
                libc::SYS_sendmsg,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
            ]),
            ioctls: &[libc::FIONBIO],
            fcntls: &[libc::F_GETFL, libc::F_SETFL],
            // Unix sockets only: no network access from this thread.
            arg_eq: &[(libc::SYS_socket, 0, libc::AF_UNIX as u64)],
        },
        on_violation,
    )
}

/// The allowlist for the virtio-fs I/O thread: epoll, the queue eventfds, and the file system
/// calls of the passthrough. No sockets, processes or mounts.
///
/// The file system part is the one list both transports use,
/// [`rootcell_fs::syscalls::PASSTHROUGH_SYSCALLS`] (and its fcntl commands and prlimit rule).
pub fn fs_io_filter(on_violation: SeccompAction) -> Result<BpfProgram> {
    use rootcell_fs::syscalls::{PASSTHROUGH_FCNTLS, PASSTHROUGH_SYSCALLS, PRLIMIT_OWN_PROCESS};
    build_spec(
        &Spec {
            syscalls: &device_io(PASSTHROUGH_SYSCALLS),
            fcntls: PASSTHROUGH_FCNTLS,
            arg_eq: &[(libc::SYS_prlimit64, 0, PRLIMIT_OWN_PROCESS)],
            ..Spec::default()
        },
        on_violation,
    )
}

/// The allowlist for the thread that copies the virtio-fs I/O thread's log lines from their
/// pipe to the log file ([`rootcell_fs::fd_table::Relay`]): reading one fd, writing another.
pub fn relay_filter(on_violation: SeccompAction) -> Result<BpfProgram> {
    build(&[libc::SYS_read], &[], on_violation)
}

/// The allowlist for vCPU threads.
pub fn vcpu_filter(on_violation: SeccompAction) -> Result<BpfProgram> {
    build(
        &[libc::SYS_read],
        &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_LAPIC],
        on_violation,
    )
}

/// The allowlist for the thread that waits on and stops a running VM (the `rootcell-vmm`
/// binary's main thread), which also removes the vsock device's socket file as it drops it.
pub fn vmm_filter(on_violation: SeccompAction) -> Result<BpfProgram> {
    build(
        &[
            libc::SYS_tgkill,
            libc::SYS_rt_sigaction,
            libc::SYS_openat,
            libc::SYS_read,
            libc::SYS_fstat,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
        ],
        &[],
        on_violation,
    )
}

/// The allowlist for the control threads of a process that holds only a running VM (the
/// runtime's built-in VMM process, once the VM runs): waiting on the VM and on its control
/// socket (poll, reads and writes of sockets it already holds), pausing and resuming
/// (kicking vCPU threads), stopping the VM and joining its threads. Unlike [`vmm_filter`] it
/// opens nothing.
pub fn control_filter(on_violation: SeccompAction) -> Result<BpfProgram> {
    build(
        &[
            libc::SYS_tgkill,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_poll,
            libc::SYS_ppoll,
        ],
        &[],
        on_violation,
    )
}

/// Capabilities a virtio-fs thread keeps, for ownership pass-through: `CHOWN` (guest chown
/// shows on the host), `DAC_OVERRIDE` and `DAC_READ_SEARCH` (root in the guest reads and
/// writes whatever the mode), `FOWNER` (chmod, utimes, xattrs of others' files), `FSETID`
/// (set-id bits kept on write and chown), `SETUID` and `SETGID` (creating files as the guest
/// caller, per request on this thread), `MKNOD` (device nodes in images), `SETFCAP` (file
/// capabilities in images). Every other device thread, and every vCPU thread, keeps none.
pub const FS_CAPS: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_MKNOD,
    caps::Capability::CAP_SETFCAP,
];

/// Restricts the calling thread's capabilities to `keep`: the bounding, effective and
/// permitted sets hold at most `keep`, the inheritable and ambient sets nothing. Threads it
/// starts later inherit that; other threads of the process keep theirs.
pub fn keep_caps(keep: &[caps::Capability]) -> Result<()> {
    use caps::CapSet;
    let fail = |what: &'static str| {
        move |e: caps::errors::CapsError| Error::Host {
            what,
            source: std::io::Error::other(e.to_string()),
        }
    };
    let keep: caps::CapsHashSet = keep.iter().copied().collect();
    for cap in caps::all() {
        // A capability this kernel does not know is not in the bounding set to drop.
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(fail("dropping a bounding capability"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(fail("clearing ambient capabilities"))?;
    caps::clear(None, CapSet::Inheritable).map_err(fail("clearing inheritable capabilities"))?;
    // Effective first: it must stay within the permitted set at every step.
    for set in [CapSet::Effective, CapSet::Permitted] {
        let now = caps::read(None, set).map_err(fail("reading capabilities"))?;
        caps::set(None, set, &now.intersection(&keep).copied().collect())
            .map_err(fail("restricting capabilities"))?;
    }
    Ok(())
}

/// Installs `filter` on the calling thread (sets no_new_privs first, as seccomp requires).
pub fn apply(filter: &BpfProgram) -> Result<()> {
    seccompiler::apply_filter(filter).map_err(|e| Error::Host {
        what: "installing seccomp filter",
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests;
