//! The sandbox's private mount namespace and the share dir exported to the guest (Kata's
//! model): `share/rootfs` is a bind of the bundle rootfs, `share/m<N>` a bind of each bind-mount
//! source. The mounts exist only in the sandbox's namespace, so they vanish when it dies.

use crate::spec::BindMount;
use nix::mount::{mount, MsFlags};
use std::path::Path;

/// Errors building the share dir.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct ShareError {
    /// The step.
    pub what: &'static str,
    /// The path involved.
    pub path: String,
    /// The OS error.
    pub source: std::io::Error,
}

fn fail(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> ShareError {
    let path = path.display().to_string();
    move |e| ShareError {
        what,
        path,
        source: e.into(),
    }
}

/// Moves the calling process into a new mount namespace with `/` made recursively private, so
/// no mount made afterwards propagates to the host. Must run before any thread exists.
pub fn isolate_mounts() -> Result<(), ShareError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(fail("unshare mount namespace", Path::new("/")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(fail("make / rprivate", Path::new("/")))
}

/// Bind-mounts `src` on `dst` (recursively), read-only if asked.
fn bind(src: &Path, dst: &Path, read_only: bool) -> Result<(), ShareError> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(fail("bind mount onto", dst))?;
    if read_only {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, dst, None::<&str>, flags, None::<&str>)
            .map_err(fail("remount read-only", dst))?;
    }
    Ok(())
}

/// Creates `share` with the rootfs and bind-mount sources mounted in it.
///
/// The rootfs stays writable here even with `root.readonly`: the agent must still create mount
/// points in it (as runc does) before it makes the root read-only inside the guest. Creating
/// them from the host instead would mean resolving container symlinks on the host.
pub fn build(share: &Path, rootfs: &Path, binds: &[BindMount]) -> Result<(), ShareError> {
    let io = |what: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| ShareError { what, path, source }
    };
    std::fs::create_dir_all(share).map_err(io("create", share))?;
    let root_dst = share.join("rootfs");
    std::fs::create_dir(&root_dst).map_err(io("create", &root_dst))?;
    bind(rootfs, &root_dst, false)?;
    for b in binds {
        let dst = share.join(&b.name);
        if b.source.is_dir() {
            std::fs::create_dir(&dst).map_err(io("create", &dst))?;
        } else {
            std::fs::File::create(&dst).map_err(io("create", &dst))?;
        }
        bind(&b.source, &dst, b.read_only)?;
    }
    Ok(())
}

/// Removes a run dir without ever recursing into the share dir's entries: in the host's mount
/// namespace they are empty mount points, and a recursive delete that ran where they are still
/// mounted would delete the container's files.
pub fn remove_run_dir(run_dir: &Path) -> std::io::Result<()> {
    let share = run_dir.join(crate::paths::SHARE_DIR);
    if let Ok(entries) = std::fs::read_dir(&share) {
        for e in entries.flatten() {
            let p = e.path();
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let _ = if is_dir {
                std::fs::remove_dir(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
        std::fs::remove_dir(&share)?;
    }
    match std::fs::read_dir(run_dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
            std::fs::remove_dir(run_dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_run_dir_does_not_recurse_into_share() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        std::fs::create_dir_all(run.join("share/rootfs")).unwrap();
        std::fs::create_dir_all(run.join("share/m1")).unwrap();
        std::fs::write(run.join("share/m1/keep"), "x").unwrap();
        std::fs::write(run.join("ctl.sock"), "").unwrap();
        assert!(remove_run_dir(&run).is_err());
        assert!(
            run.join("share/m1/keep").exists(),
            "files below a share entry must survive"
        );
        std::fs::remove_file(run.join("share/m1/keep")).unwrap();
        remove_run_dir(&run).unwrap();
        assert!(!run.exists());
        remove_run_dir(&run).unwrap();
    }
}
