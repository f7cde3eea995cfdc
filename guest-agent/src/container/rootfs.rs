//! The container's mount namespace: rootfs bind, spec mounts, /dev, pivot_root, masked and
//! read-only paths, read-only root.

use super::devices::setup_dev;
use super::error::{Context, SetupError};
use super::mounts::{mount_entry, propagation_flags, MountEnv};
use crate::alog;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::Spec;
use std::path::{Path, PathBuf};

/// Gives the pty slave to show as /dev/console, called with the new root once the spec's
/// mounts (the container's devpts among them) are up.
pub type ConsoleFn<'a> = dyn Fn(&Path) -> Result<PathBuf, SetupError> + 'a;

/// Builds the root filesystem and pivots into it. Must run in a fresh mount namespace (and,
/// for a correct /proc, inside the container's pid namespace).
pub fn prepare_rootfs(
    spec: &Spec,
    env: MountEnv,
    console: Option<&ConsoleFn<'_>>,
) -> Result<(), SetupError> {
    let root_cfg = spec
        .root()
        .as_ref()
        .ok_or_else(|| SetupError::other("spec has no root"))?;
    let root = root_cfg.path();
    // Nothing we mount may propagate back to the agent's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .ctx(|| "make / private".into())?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| format!("bind rootfs {}", root.display()))?;
    for m in spec.mounts().iter().flatten() {
        mount_entry(root, m, env)?;
    }
    let linux = spec.linux().as_ref();
    let devices = linux.and_then(|l| l.devices().clone()).unwrap_or_default();
    let console = console.map(|f| f(root)).transpose()?;
    setup_dev(root, &devices, console.as_deref())?;
    pivot(root)?;
    if let Some(p) = linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        let flags = propagation_flags(p)
            .ok_or_else(|| SetupError::other(format!("bad rootfsPropagation {p:?}")))?;
        mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)
            .ctx(|| "set rootfs propagation".into())?;
    }
    // Before readonlyPaths, which usually include /proc/sys.
    apply_sysctl(spec)?;
    for p in linux
        .and_then(|l| l.readonly_paths().clone())
        .unwrap_or_default()
    {
        readonly_path(Path::new(&p))?;
    }
    for p in linux
        .and_then(|l| l.masked_paths().clone())
        .unwrap_or_default()
    {
        mask_path(Path::new(&p))?;
    }
    if root_cfg.readonly() == Some(true) {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .ctx(|| "remount root read-only".into())?;
    }
    Ok(())
}

/// Writes `linux.sysctl` entries through the container's /proc. A key this kernel does not
/// have is logged and skipped: the guest kernel is deliberately small, and Docker sets some
/// network sysctls by default.
fn apply_sysctl(spec: &Spec) -> Result<(), SetupError> {
    let Some(sysctl) = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) else {
        return Ok(());
    };
    for (key, value) in sysctl {
        if key.contains("..") || key.contains('/') {
            return Err(SetupError::other(format!("invalid sysctl name {key}")));
        }
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        match std::fs::write(&path, value) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                alog!("skipping sysctl {key}: not in this kernel");
            }
            Err(e) => return Err(SetupError::other(format!("sysctl {key}={value}: {e}"))),
        }
    }
    Ok(())
}

/// Makes `root` the process's root and detaches the old one (runc's pivot onto itself trick,
/// which needs no put_old directory inside the image).
fn pivot(root: &Path) -> Result<(), SetupError> {
    std::env::set_current_dir(root).ctx(|| format!("chdir {}", root.display()))?;
    nix::unistd::pivot_root(".", ".").ctx(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detach old root".into())?;
    std::env::set_current_dir("/").ctx(|| "chdir /".into())
}

/// Remounts a path read-only (bind onto itself first); missing paths are skipped, like runc.
fn readonly_path(path: &Path) -> Result<(), SetupError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| format!("bind {} read-only", path.display()))?;
    let flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    mount(Some(path), path, None::<&str>, flags, None::<&str>)
        .ctx(|| format!("remount {} read-only", path.display()))
}

/// Hides a path: /dev/null over files, an empty read-only tmpfs over directories.
fn mask_path(path: &Path) -> Result<(), SetupError> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    }
    .ctx(|| format!("mask {}", path.display()))
}
