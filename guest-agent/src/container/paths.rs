//! Path handling inside a container root: symlink-safe resolution and mount target creation.

use super::error::{Context, SetupError};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// Symlink hops allowed while resolving one path (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` as seen from inside `root`: symlinks (absolute or relative) are followed
/// relative to `root` and `..` never leaves it, so a rootfs cannot redirect mounts to the guest.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, SetupError> {
    let mut todo: VecDeque<OsString> = components(path);
    let mut done: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(comp) = todo.pop_front() {
        if comp == ".." {
            done.pop();
            continue;
        }
        let candidate = root.join(done.iter().collect::<PathBuf>()).join(&comp);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(SetupError::other(format!(
                        "too many symlinks resolving {}",
                        path.display()
                    )));
                }
                let target = std::fs::read_link(&candidate)
                    .ctx(|| format!("readlink {}", candidate.display()))?;
                if target.is_absolute() {
                    done.clear();
                }
                for c in components(&target).into_iter().rev() {
                    todo.push_front(c);
                }
            }
            _ => done.push(comp),
        }
    }
    Ok(root.join(done.iter().collect::<PathBuf>()))
}

/// The normal components of a path, with `..` kept and `.`/root dropped.
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// What a mount target must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A directory (created with parents).
    Dir,
    /// A regular file (parents created, file created empty).
    File,
}

/// Creates the mount point `dest` if missing.
pub fn create_mount_target(dest: &Path, kind: TargetKind) -> Result<(), SetupError> {
    match kind {
        TargetKind::Dir => {
            std::fs::create_dir_all(dest).ctx(|| format!("create directory {}", dest.display()))
        }
        TargetKind::File => {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .ctx(|| format!("create directory {}", parent.display()))?;
            }
            if std::fs::symlink_metadata(dest).is_err() {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(dest)
                    .ctx(|| format!("create file {}", dest.display()))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_stay_inside_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("real/dir")).unwrap();
        symlink("/real", root.join("abs")).unwrap();
        symlink("../../../real/dir", root.join("real/up")).unwrap();
        symlink("/etc", root.join("escape")).unwrap();
        assert_eq!(
            resolve_in_root(root, Path::new("/abs/dir")).unwrap(),
            root.join("real/dir")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/real/up/x")).unwrap(),
            root.join("real/dir/x")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/escape/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/../../x/./y")).unwrap(),
            root.join("x/y")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/")).unwrap(),
            root.to_path_buf()
        );
    }

    #[test]
    fn symlink_loops_are_errors() {
        let t = tempfile::tempdir().unwrap();
        symlink("/b", t.path().join("a")).unwrap();
        symlink("/a", t.path().join("b")).unwrap();
        assert!(resolve_in_root(t.path(), Path::new("/a/x")).is_err());
    }

    #[test]
    fn targets_are_created() {
        let t = tempfile::tempdir().unwrap();
        create_mount_target(&t.path().join("a/b/file"), TargetKind::File).unwrap();
        assert!(t.path().join("a/b/file").is_file());
        create_mount_target(&t.path().join("c/d"), TargetKind::Dir).unwrap();
        assert!(t.path().join("c/d").is_dir());
    }
}
