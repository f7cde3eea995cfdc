//! The container's /dev: standard device nodes, spec devices, the usual symlinks, the console.

use super::error::{Context, SetupError};
use super::paths::{create_mount_target, resolve_in_root, TargetKind};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Device nodes every container gets, bind-mounted from the guest's /dev (as runc does when it
/// cannot mknod; binding keeps the guest devtmpfs the single source of truth).
pub const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Symlinks every container's /dev gets.
const DEV_LINKS: [(&str, &str); 5] = [
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
];

/// Populates `<root>/dev` (before pivot_root). `console` is the pty slave to show as /dev/console.
pub fn setup_dev(
    root: &Path,
    extra: &[LinuxDevice],
    console: Option<&Path>,
) -> Result<(), SetupError> {
    let dev = resolve_in_root(root, Path::new("/dev"))?;
    create_mount_target(&dev, TargetKind::Dir)?;
    for name in DEFAULT_DEVICES {
        bind_device(&Path::new("/dev").join(name), &dev.join(name))?;
    }
    for d in extra {
        // `--privileged` lists every host device, the defaults among them: those stay bound to
        // the guest's own nodes.
        if DEFAULT_DEVICES
            .iter()
            .any(|n| d.path() == &Path::new("/dev").join(n))
        {
            continue;
        }
        make_node(root, d)?;
    }
    for (target, name) in DEV_LINKS {
        let link = dev.join(name);
        if name == "ptmx" || std::fs::read_link(&link).is_err() {
            // /dev/ptmx must point into the container's devpts instance, whatever the image had.
            let _ = std::fs::remove_file(&link);
        }
        if let Err(e) = std::os::unix::fs::symlink(target, &link) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(SetupError::other(format!("symlink /dev/{name}: {e}")));
            }
        }
    }
    if let Some(console) = console {
        bind_device(console, &dev.join("console"))?;
    }
    Ok(())
}

/// Bind-mounts one guest device node onto a file in the container's /dev.
fn bind_device(source: &Path, dest: &Path) -> Result<(), SetupError> {
    create_mount_target(dest, TargetKind::File)?;
    mount(
        Some(source),
        dest,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .ctx(|| format!("bind device {} on {}", source.display(), dest.display()))
}

/// Creates a device node from `linux.devices`.
fn make_node(root: &Path, d: &LinuxDevice) -> Result<(), SetupError> {
    let dest = resolve_in_root(root, d.path())?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).ctx(|| format!("create {}", parent.display()))?;
    }
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(SetupError::unsupported(
                "device type 'a' is only valid in cgroup rules",
            ))
        }
    };
    let perm = d.file_mode().unwrap_or(0o666) & 0o7777;
    let mode = Mode::from_bits_truncate(perm);
    let _ = std::fs::remove_file(&dest);
    match mknod(
        &dest,
        kind,
        mode,
        makedev(d.major() as u64, d.minor() as u64),
    ) {
        // Something mounted there already (runc keeps an existing node too).
        Err(nix::errno::Errno::EEXIST) => return Ok(()),
        r => r.ctx(|| format!("mknod {}", d.path().display()))?,
    }
    nix::unistd::chown(
        &dest,
        Some(nix::unistd::Uid::from_raw(d.uid().unwrap_or(0))),
        Some(nix::unistd::Gid::from_raw(d.gid().unwrap_or(0))),
    )
    .ctx(|| format!("chown {}", d.path().display()))?;
    // mknod applies the umask (the agent's is 022); the node must have exactly the spec's
    // mode, as with runc (which clears the umask around mknod). Set after chown, which may
    // clear set-id bits.
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(perm))
        .ctx(|| format!("chmod {:o} {}", perm, d.path().display()))
}
