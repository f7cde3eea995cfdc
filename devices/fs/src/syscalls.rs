//! The system calls serving the share takes, for the seccomp allow-lists of the threads that
//! do it: one list for every transport (the vhost-user back end's threads and the built-in
//! VMM's virtio-fs I/O thread), so the two cannot drift apart. The filters themselves (and
//! what each thread needs besides: epoll, eventfds, the vhost-user socket) are built by the
//! callers.
//!
//! Deliberately absent: `open_by_handle_at` and `name_to_handle_at` (the passthrough holds
//! inodes as `O_PATH` fds, `inode_file_handles` is off; with CAP_DAC_READ_SEARCH a forged
//! handle would open any file of a file system the share shares with the host), path-based
//! calls without a directory fd (`open`, `unlink`, `rename`...: glibc's wrappers use the `*at`
//! forms), sockets, processes, mounts.

/// Syscalls allowed with any arguments.
pub const PASSTHROUGH_SYSCALLS: &[i64] = &[
    // open, stat, list (each relative to an inode's fd, or /proc/self/fd to reopen one)
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_lseek,
    libc::SYS_dup,
    libc::SYS_flock,
    // data
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_copy_file_range,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // namespace changes
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    // attributes
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_umask,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    // the guest caller's fs uid and gid, taken per file-making request by the serving thread
    // only (`creds`); setresuid and setresgid are not here: a thread jailed as an
    // unprivileged uid that keeps CAP_SETUID could make itself root again with them
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    // no effective capabilities while a non-root caller's file is made (`creds`), and
    // dropping CAP_FSETID around a write that must clear set-id bits (the passthrough's
    // killpriv handling), within the capabilities the thread kept
    libc::SYS_capget,
    libc::SYS_capset,
    // std's HashMap seeds
    libc::SYS_getrandom,
];

/// `fcntl` commands (argument 1): descriptor flags, and the guest's POSIX, OFD and BSD-style
/// locks on its files.
pub const PASSTHROUGH_FCNTLS: &[i32] = &[
    libc::F_GETFD,
    libc::F_SETFD,
    libc::F_GETFL,
    libc::F_SETFL,
    libc::F_DUPFD_CLOEXEC,
    libc::F_GETLK,
    libc::F_SETLK,
    libc::F_SETLKW,
    libc::F_OFD_GETLK,
    libc::F_OFD_SETLK,
    libc::F_OFD_SETLKW,
];

/// `prlimit64` is allowed with this first argument only (0: the calling process): raising its
/// own RLIMIT_NOFILE when the share is opened again after a device reset.
pub const PRLIMIT_OWN_PROCESS: u64 = 0;
