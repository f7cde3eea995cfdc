//! The sandbox's private mount namespace and the share dir exported to the guest (Kata's
//! model): a tmpfs holding `rootfs`, a bind of the bundle rootfs, and each bind-mount source
//! bound at its own host path (`/var/lib/x` at `share/var/lib/x`), so a bind mount's root in
//! the guest's mountinfo is the source's path, as under runc. The tmpfs and the mounts exist
//! only in the sandbox's namespace, so they vanish when it dies; the host sees an empty dir.

use crate::spec::BindMount;
use nix::mount::{mount, MsFlags};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Component, Path, PathBuf};

/// Share entry holding the bind sources that cannot be laid out at their own path.
pub const FALLBACK_DIR: &str = ".rootcell";

/// Names each bind's entry in the share after its host path (canonical where it exists):
/// `/var/lib/x` becomes `var/lib/x`. A source that cannot have its own path there gets
/// `.rootcell/m<index>`: `/` itself, a path below `rootfs` or [`FALLBACK_DIR`], one with `..`
/// or a name that is not UTF-8, and one equal to, inside or above an earlier bind's source
/// (each bind is its own mount, with its own read-only flag).
pub fn name_entries(binds: &mut [BindMount]) {
    let mut taken: Vec<PathBuf> = Vec::new();
    for b in binds.iter_mut() {
        let real = std::fs::canonicalize(&b.source).unwrap_or_else(|_| b.source.clone());
        let rel = real.strip_prefix("/").unwrap_or(&real).to_path_buf();
        let mut parts = rel.components();
        let first = parts.next();
        let own_path = matches!(first, Some(Component::Normal(c)) if c != "rootfs" && c != FALLBACK_DIR)
            && parts.all(|c| matches!(c, Component::Normal(_)))
            && rel.to_str().is_some()
            && !taken
                .iter()
                .any(|t| t.starts_with(&rel) || rel.starts_with(t));
        b.name = match rel.to_str() {
            Some(name) if own_path => {
                taken.push(rel.clone());
                name.to_string()
            }
            _ => format!("{FALLBACK_DIR}/m{}", b.index),
        };
    }
}

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
    let c = path_cstr(dst, "bind mount onto")?;
    set_mount_attrs(
        libc::AT_FDCWD,
        &c,
        libc::AT_RECURSIVE as libc::c_uint,
        MOUNT_ATTR_NODEV,
    )
    .map_err(|source| ShareError {
        what: "make nodev",
        path: dst.display().to_string(),
        source,
    })?;
    if read_only {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, dst, None::<&str>, flags, None::<&str>)
            .map_err(fail("remount read-only", dst))?;
    }
    Ok(())
}

/// Creates the mount point of bind `b` in `share` (a directory or a file, like its source) and
/// its parents; returns it.
fn mount_point(share: &Path, b: &BindMount) -> Result<PathBuf, ShareError> {
    let io = |what: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| ShareError { what, path, source }
    };
    let dst = share.join(&b.name);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    }
    if b.source.is_dir() {
        std::fs::create_dir(&dst).map_err(io("create", &dst))?;
    } else {
        std::fs::File::create(&dst).map_err(io("create", &dst))?;
    }
    Ok(dst)
}

/// Creates `share` with the rootfs and bind-mount sources mounted in it, on a tmpfs of the
/// sandbox's namespace (so the entries' parent directories never touch the host).
///
/// The rootfs stays writable here even with `root.readonly`: the agent must still create mount
/// points in it (as runc does) before it makes the root read-only inside the guest. Creating
/// them from the host instead would mean resolving container symlinks on the host.
pub fn build(share: &Path, rootfs: &Path, binds: &[BindMount]) -> Result<(), ShareError> {
    let io = |what: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| ShareError { what, path, source }
    };
    build_empty(share)?;
    let root_dst = share.join("rootfs");
    std::fs::create_dir(&root_dst).map_err(io("create", &root_dst))?;
    bind(rootfs, &root_dst, false)?;
    for b in binds {
        let dst = mount_point(share, b)?;
        bind(&b.source, &dst, b.read_only)?;
    }
    make_shared(share)
}

/// Creates `share` as an empty tmpfs of this namespace, where containers' entries are attached
/// later (a VM booted ahead of need: see [`member_entry`] and [`attach_member`]).
pub fn build_empty(share: &Path) -> Result<(), ShareError> {
    std::fs::create_dir_all(share).map_err(|source| ShareError {
        what: "create",
        path: share.display().to_string(),
        source,
    })?;
    mount(
        Some("tmpfs"),
        share,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=4m"),
    )
    .map_err(fail("mount tmpfs on", share))?;
    make_shared(share)
}

/// Makes the share shared (within this namespace only: it was made rprivate): the virtio-fs
/// back end's threads serve from a namespace of their own whose copy of the share is a slave of
/// this one, and what is attached here later (containers joining the VM, or claiming it from
/// the pool) must reach them.
fn make_shared(share: &Path) -> Result<(), ShareError> {
    mount(
        None::<&str>,
        share,
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(fail("make shared", share))
}

// mount_setattr(2) (linux/mount.h); libc has the syscall number but not these.
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// `struct mount_attr` (MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Adds `attrs` (MOUNT_ATTR_*) to the mount at `dirfd`/`path`, and with AT_RECURSIVE in
/// `flags` to every mount below it, leaving their other flags as they are. Works on a
/// detached tree too (AT_EMPTY_PATH), before it is attached: a mount propagated from an
/// attached one copies its flags at that moment, so flags must be set before.
fn set_mount_attrs(
    dirfd: libc::c_int,
    path: &std::ffi::CStr,
    flags: libc::c_uint,
    attrs: u64,
) -> std::io::Result<()> {
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) reads `attr` (of the size passed) and the NUL-terminated path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn path_cstr(p: &Path, what: &'static str) -> Result<std::ffi::CString, ShareError> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| ShareError {
        what,
        path: p.display().to_string(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// Where, inside a VM owner's share, a container joining that VM gets its own entries: its
/// rootfs and bind sources under `.rootcell/c/<id>/`, named as in a share of its own.
pub fn member_entry(share: &Path, id: &str) -> PathBuf {
    share.join(FALLBACK_DIR).join("c").join(id)
}

/// A mount tree cloned from the namespace it was made in (`open_tree(OPEN_TREE_CLONE)`), not
/// attached anywhere yet: the way to carry a host path into the VM owner's private mount
/// namespace, which a plain bind mount cannot reach across.
pub struct DetachedTree(std::os::fd::OwnedFd);

// The new mount API's flags (linux/mount.h); libc exports them only for some targets.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// Clones the mount tree at `path` (recursively) as a detached tree.
pub fn clone_tree(path: &Path) -> Result<DetachedTree, ShareError> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| ShareError {
            what: "clone the mount tree of",
            path: path.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
    let flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: open_tree(2) with a valid NUL-terminated path; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(ShareError {
            what: "clone the mount tree of",
            path: path.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the fd was just returned to us and nothing else owns it.
    Ok(DetachedTree(unsafe {
        std::os::fd::OwnedFd::from_raw_fd(fd as i32)
    }))
}

/// Attaches a detached tree on `dst` (an existing file or directory) in this namespace: nodev
/// throughout, read-only at its top if asked, both set before it is attached (so the copies
/// propagated to the virtio-fs back end's namespace have them too).
fn attach_tree(tree: DetachedTree, dst: &Path, read_only: bool) -> Result<(), ShareError> {
    let c = path_cstr(dst, "attach a mount tree on")?;
    let empty = c"";
    let attrs = |flags: libc::c_int, attrs: u64| {
        set_mount_attrs(
            tree.0.as_raw_fd(),
            empty,
            (libc::AT_EMPTY_PATH | flags) as libc::c_uint,
            attrs,
        )
        .map_err(|source| ShareError {
            what: "set nodev/read-only on the mount tree for",
            path: dst.display().to_string(),
            source,
        })
    };
    attrs(libc::AT_RECURSIVE, MOUNT_ATTR_NODEV)?;
    if read_only {
        attrs(0, MOUNT_ATTR_RDONLY)?;
    }
    // SAFETY: move_mount(2) of the tree fd (empty path) onto a valid NUL-terminated path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.0.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(ShareError {
            what: "attach a mount tree on",
            path: dst.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A joining container's rootfs and bind sources, cloned in the host's namespace.
pub struct MemberTrees {
    rootfs: DetachedTree,
    binds: Vec<(BindMount, DetachedTree)>,
}

/// Clones the rootfs and bind sources (call before leaving the host's mount namespace).
pub fn clone_member(rootfs: &Path, binds: &[BindMount]) -> Result<MemberTrees, ShareError> {
    Ok(MemberTrees {
        rootfs: clone_tree(rootfs)?,
        binds: binds
            .iter()
            .map(|b| Ok((b.clone(), clone_tree(&b.source)?)))
            .collect::<Result<_, ShareError>>()?,
    })
}

/// Attaches a joining container's trees at [`member_entry`] of the owner's `share` (we are in
/// the owner's mount namespace); returns the mount points, to detach when it ends.
pub fn attach_member(
    share: &Path,
    id: &str,
    trees: MemberTrees,
) -> Result<Vec<PathBuf>, ShareError> {
    let io = |what: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |source| ShareError { what, path, source }
    };
    // The share is the owner's tmpfs, a mount of its own: anything else means we are not where
    // the owner's back end serves from, and must not write to the host's file system.
    let dev = |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
    let parent = share.parent().unwrap_or(share);
    match (dev(share), dev(parent)) {
        (Ok(a), Ok(b)) if a != b => {}
        (Err(source), _) | (_, Err(source)) => {
            return Err(ShareError {
                what: "find the VM's share",
                path: share.display().to_string(),
                source,
            })
        }
        _ => {
            return Err(ShareError {
                what: "find the VM's share (not mounted in its sandbox's namespace)",
                path: share.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        }
    }
    let entry = member_entry(share, id);
    let root_dst = entry.join("rootfs");
    std::fs::create_dir_all(&root_dst).map_err(io("create", &root_dst))?;
    let mut mounted = Vec::new();
    attach_tree(trees.rootfs, &root_dst, false)?;
    mounted.push(root_dst);
    for (b, tree) in trees.binds {
        let dst = mount_point(&entry, &b)?;
        attach_tree(tree, &dst, b.read_only)?;
        mounted.push(dst.clone());
    }
    Ok(mounted)
}

/// Detaches a joining container's entries (lazily: the guest may still hold files open) and
/// removes the mount points it can. Never recurses into them.
pub fn detach_member(mounted: &[PathBuf]) {
    for m in mounted.iter().rev() {
        if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("cannot detach {}: {e}", m.display());
            continue;
        }
        let _ = std::fs::remove_dir(m).or_else(|_| std::fs::remove_file(m));
    }
}

/// Detaches what is still attached of joining container `id` in the share of the VM owner whose
/// sandbox is `owner_pid` (its own sandbox was killed before it could): the mount points under
/// its entry, as the owner's mount namespace lists them, unmounted there with `nsenter`.
pub fn detach_member_from_outside(owner_pid: i32, owner_share: &Path, id: &str) {
    let entry = member_entry(owner_share, id);
    let Ok(info) = std::fs::read_to_string(format!("/proc/{owner_pid}/mountinfo")) else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(&entry))
        .collect();
    // Deepest first; the kernel escapes spaces in mountinfo, which our entries never contain.
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in points {
        let st = std::process::Command::new("nsenter")
            .arg("--target")
            .arg(owner_pid.to_string())
            // --root: mountinfo's paths are relative to the owner's root (a chroot, if the
            // runtime runs in one), and so must umount's be.
            .args(["--mount", "--root", "--", "umount", "--lazy", m])
            .stderr(std::process::Stdio::null())
            .status();
        if !st.is_ok_and(|s| s.success()) {
            tracing::warn!("cannot detach {m} in the VM owner's namespace (sandbox {owner_pid})");
        }
    }
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
    // Empty on the host (the jail's root is mounted only in the VMM's mount namespace).
    let _ = std::fs::remove_dir(run_dir.join(crate::paths::VMM_ROOT_DIR));
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

    fn bind(index: usize, source: &Path) -> BindMount {
        BindMount {
            index,
            source: source.to_path_buf(),
            name: String::new(),
            read_only: false,
        }
    }

    #[test]
    fn bind_entries_are_named_after_their_host_path() {
        let d = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir_all(real.join("data/sub")).unwrap();
        std::fs::write(real.join("hosts"), "").unwrap();
        std::os::unix::fs::symlink(real.join("data"), real.join("link")).unwrap();
        let rel = |p: &str| {
            real.join(p)
                .strip_prefix("/")
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        };
        let mut binds = vec![
            bind(1, &real.join("data")),
            bind(2, &real.join("hosts")),
            bind(3, &real.join("data/sub")),
            bind(4, &real.join("link")),
            bind(5, Path::new("/")),
            bind(6, Path::new("/rootfs/x")),
            bind(7, Path::new("/a/../b")),
            bind(8, &real.join("missing")),
        ];
        name_entries(&mut binds);
        let names: Vec<&str> = binds.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(
            names,
            [
                rel("data").as_str(),
                rel("hosts").as_str(),
                // Inside an earlier source, or the same directory through a symlink.
                ".rootcell/m3",
                ".rootcell/m4",
                ".rootcell/m5",
                ".rootcell/m6",
                ".rootcell/m7",
                // Missing sources keep their path (the bind fails later with its own error).
                rel("missing").as_str(),
            ]
        );
    }

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

    /// A joining container's trees, attached to a share that a back end serves from its own
    /// namespace (`rootcell_fs::share_root`): the back end sees them, read-only where asked and
    /// nodev throughout (set before attaching: a propagated copy takes the flags of that
    /// moment), and sees them go when they are detached. Needs root.
    #[test]
    fn a_joining_containers_trees_reach_the_back_end_nodev_and_read_only() {
        if !rootcell_test_support::require_root("a_joining_containers_trees_reach_the_back_end") {
            return;
        }
        std::thread::spawn(|| {
            // This thread plays the sandbox: a namespace of its own, the share a shared tmpfs.
            nix::sched::unshare(
                nix::sched::CloneFlags::CLONE_FS | nix::sched::CloneFlags::CLONE_NEWNS,
            )
            .unwrap();
            let flags = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
            mount(None::<&str>, "/", None::<&str>, flags, None::<&str>).unwrap();
            let tmp = tempfile::tempdir().unwrap();
            let (rootfs, data, share) = (
                tmp.path().join("rootfs"),
                tmp.path().join("data"),
                tmp.path().join("share"),
            );
            std::fs::create_dir_all(rootfs.join("bin")).unwrap();
            std::fs::create_dir(&data).unwrap();
            std::fs::write(data.join("f"), b"x").unwrap();
            build(&share, &rootfs, &[]).unwrap();
            // The back end, as the virtio-fs thread sets itself up.
            let (tx, rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            let backend_share = share.clone();
            let backend = std::thread::spawn(move || {
                rootcell_fs::share_root::enter(&backend_share).unwrap();
                rootcell_fs::share_root::pivot().unwrap();
                // SAFETY: gettid has no arguments.
                tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = stop_rx.recv();
            });
            let tid = rx.recv().unwrap();
            let root = PathBuf::from(format!("/proc/self/task/{tid}/root/share"));

            let mut binds = vec![BindMount {
                index: 3,
                source: data.clone(),
                name: String::new(),
                read_only: true,
            }];
            name_entries(&mut binds);
            let trees = clone_member(&rootfs, &binds).unwrap();
            let mounted = attach_member(&share, "m1", trees).unwrap();
            let entry = root.join(".rootcell/c/m1");
            let seen = entry.join(&binds[0].name).join("f");
            assert_eq!(
                std::fs::read(&seen).unwrap(),
                b"x",
                "the back end sees the bind"
            );
            let err = std::fs::write(&seen, b"y").unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EROFS), "read-only there too");
            assert!(entry.join("rootfs/bin").is_dir(), "and the rootfs");
            let info = std::fs::read_to_string(format!("/proc/self/task/{tid}/mountinfo")).unwrap();
            let member: Vec<&str> = info
                .lines()
                .filter(|l| l.contains("/.rootcell/c/m1"))
                .collect();
            assert_eq!(member.len(), 2, "{info}");
            for l in &member {
                let opts = l.split(' ').nth(5).unwrap();
                assert!(opts.split(',').any(|o| o == "nodev"), "not nodev: {l}");
            }
            detach_member(&mounted);
            assert!(!seen.exists(), "detached for the back end too");
            stop_tx.send(()).unwrap();
            backend.join().unwrap();
            nix::mount::umount2(&share, nix::mount::MntFlags::MNT_DETACH).unwrap();
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    }
}
