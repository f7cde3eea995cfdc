//! Guest bring-up as PID 1: leave the initramfs root, mount the pseudo filesystems, bring up
//! `lo`, mount the virtio-fs share.

use crate::alog;
use crate::container::MountEnv;
use nix::mount::{mount, MsFlags};
use rootcell_protocol::{GUEST_SHARE_DIR, SHARE_TAG};
use std::path::{Path, PathBuf};

/// `statfs` magic of cgroup2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// What the rest of the agent needs to know about the prepared system.
#[derive(Debug, Clone, Default)]
pub struct System {
    /// Mount facts for containers.
    pub mount_env: MountEnv,
    /// Where container cgroups go, if there is a cgroup2 hierarchy.
    pub cgroup_root: Option<PathBuf>,
}

/// `fs.nr_open` in the guest: what systemd sets on hosts, the largest value every 64-bit kernel
/// takes.
const NR_OPEN_MAX: &str = "1073741816";

/// Ends the VM from its init: syncs the file systems and reboots (the guest is booted with
/// `reboot=t`/`reboot=k`, QEMU runs with `-no-reboot` and the built-in VMM ends at the reset).
/// Returns only if reboot(2) failed.
pub fn end_vm() {
    nix::unistd::sync();
    // SAFETY: reboot(2) as init; nothing of ours needs to run after it.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
}

/// Prepares the guest. Failures of optional parts are logged, not fatal.
pub fn setup() -> System {
    // The initramfs root ("rootfs") cannot be pivot_root'ed away from, which containers need:
    // move a tmpfs over it first, as switch_root does.
    if let Err(e) = leave_initramfs() {
        alog!("cannot leave the initramfs root: {e} (containers will fail to pivot_root)");
    }
    let _ = mkdir_mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    ensure_std_fds();
    crate::log::log_to_console();
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 6] = [
        ("proc", "/proc", "proc", nosuid_noexec, None),
        ("sysfs", "/sys", "sysfs", nosuid_noexec, None),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_noexec, None),
    ];
    for (src, dst, fstype, flags, data) in mounts {
        if let Err(e) = mkdir_mount(src, dst, fstype, flags, data) {
            alog!("mount {fstype} on {dst}: {e}");
        }
    }
    crate::oom::enable_controllers(Path::new("/sys/fs/cgroup"));
    // Containers inherit the rlimits of the runtime's caller (as under runc), and a host's
    // RLIMIT_NOFILE may exceed this kernel's default ceiling for it (1 MiB files).
    if let Err(e) = std::fs::write("/proc/sys/fs/nr_open", NR_OPEN_MAX) {
        alog!("cannot raise fs.nr_open to {NR_OPEN_MAX}: {e}");
    }
    // The guest's /dev/ptmx must be the one of the devpts instance above.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    if let Err(e) = crate::net::loopback_up() {
        alog!("cannot bring up lo: {e}");
    }
    if let Err(e) = mkdir_mount(
        SHARE_TAG,
        GUEST_SHARE_DIR,
        "virtiofs",
        MsFlags::empty(),
        None,
    ) {
        alog!("no virtio-fs share {SHARE_TAG} at {GUEST_SHARE_DIR}: {e}");
    }
    detect_system()
}

/// Cgroup2 and mount facts of the running system (also used outside the guest).
pub fn detect_system() -> System {
    let cgroup2 = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC);
    System {
        mount_env: MountEnv { cgroup2 },
        cgroup_root: cgroup2.then(|| PathBuf::from("/sys/fs/cgroup")),
    }
}

fn mkdir_mount(
    src: &str,
    dst: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> nix::Result<()> {
    let _ = std::fs::create_dir_all(dst);
    mount(Some(src), dst, Some(fstype), flags, data)
}

/// Moves a tmpfs over the initramfs root and chroots into it.
fn leave_initramfs() -> nix::Result<()> {
    let new = Path::new("/newroot");
    let _ = std::fs::create_dir_all(new);
    mount(
        Some("tmpfs"),
        new,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    for d in ["proc", "sys", "dev", "run", "tmp", "mnt"] {
        let _ = std::fs::create_dir_all(new.join(d));
    }
    // The running binary stays mapped; unlinking it frees its initramfs copy.
    let _ = std::fs::remove_file("/init");
    std::env::set_current_dir(new).map_err(|_| nix::errno::Errno::last())?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    std::env::set_current_dir("/").map_err(|_| nix::errno::Errno::last())
}

/// Makes sure fds 0-2 are open (the kernel leaves them closed without /dev/console in the
/// initramfs), so sockets never land on them.
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the fd.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            let path = if fd == 0 {
                c"/dev/null"
            } else {
                c"/dev/console"
            };
            // SAFETY: opening a device; the lowest free fd is `fd` since lower ones are open.
            let got = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
            if got >= 0 && got != fd {
                // SAFETY: moving our own fd.
                unsafe {
                    libc::dup2(got, fd);
                    libc::close(got);
                }
            }
        }
    }
}
