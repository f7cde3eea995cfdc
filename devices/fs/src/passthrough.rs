//! The host side of the share: fuse-backend-rs' passthrough file system with rootcell's options.
//!
//! Options and why:
//! - `root_dir = shared_dir`, `do_import = true`: the root inode is an `O_PATH` fd of the shared
//!   directory. Every later inode is reached with `openat(parent_fd, name, O_PATH | O_NOFOLLOW)`
//!   relative to an inode the guest already holds; names containing `/` are refused, and `..`
//!   looked up on the root inode is answered with the root itself, so requests cannot climb out
//!   of the share. Symlinks are never followed on the host: the guest reads them with READLINK
//!   and resolves them in its own view, and opening a symlink inode through `/proc/self/fd`
//!   fails with ELOOP. With `do_import` the passthrough validates each new name component
//!   (`validate_path_component`) itself.
//! - `cache_policy = Auto`, 1 s entry/attr timeouts: the guest may cache, but attributes and
//!   dentries are revalidated after 1 s and page-cache data is dropped on open when the file
//!   changed. A container rootfs the host may touch (copying files in for `docker cp`, bind
//!   mounts of live host directories) becomes visible within a second, while exec'ing the same
//!   binaries repeatedly stays fast. `Never` would make every read a round trip through TCG.
//! - `writeback = false`: writes go straight to the host file, so the host sees them at once and
//!   a guest crash loses nothing already written.
//! - `xattr = true`: container images carry file capabilities and other xattrs.
//! - `inode_file_handles = false`: inodes are held as `O_PATH` fds, which needs no extra
//!   capability but costs one fd per inode the guest remembers; see
//!   [`raise_nofile_limit`].
//! - Ownership: each request that makes a file runs with the guest caller's fs uid/gid set on
//!   the serving thread only (`crate::creds`: setfsuid/setfsgid, not the passthrough's own
//!   effective-uid switch, which assumes a thread whose real uid is 0), and SETATTR with a new
//!   owner calls `fchownat` with CAP_CHOWN, so guest `chown` shows on the host. This needs
//!   root or the ownership capabilities (`rootcell_vmm::seccomp::FS_CAPS`), not uid 0.

use std::time::Duration;

use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

use crate::{Error, FsConfig};

/// How long the guest may trust a cached entry or attribute before asking again.
const CACHE_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks that `path` is a directory that can be shared.
pub fn check_shared_dir(path: &std::path::Path) -> Result<(), Error> {
    let meta = std::fs::metadata(path).map_err(|source| Error::SharedDir {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(Error::SharedDir {
            path: path.to_owned(),
            source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    Ok(())
}

/// Opens `config.shared_dir` as a passthrough file system ready to serve requests.
pub fn open_passthrough(config: &FsConfig) -> Result<PassthroughFs, Error> {
    let path = &config.shared_dir;
    check_shared_dir(path)?;
    let root_dir = path
        .to_str()
        .ok_or_else(|| Error::SharedDir {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not UTF-8"),
        })?
        .to_owned();

    let cfg = Config {
        root_dir,
        do_import: true,
        cache_policy: CachePolicy::Auto,
        entry_timeout: CACHE_TIMEOUT,
        attr_timeout: CACHE_TIMEOUT,
        writeback: false,
        xattr: true,
        inode_file_handles: false,
        ..Config::default()
    };
    let passthrough_err = |source| Error::Passthrough {
        path: path.clone(),
        source,
    };
    let fs = PassthroughFs::<()>::new(cfg).map_err(passthrough_err)?;
    fs.import().map_err(passthrough_err)?;
    Ok(fs)
}

/// Raises the soft open-file limit to the hard limit.
///
/// The passthrough keeps one `O_PATH` fd per inode the guest has looked up and not yet
/// forgotten; with the usual soft limit of 1024 a guest walking a container rootfs runs into
/// EMFILE. The limit is per process, so this also affects the calling process (intended: it
/// is the per-container sandbox process that hosts the backend).
pub fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    "virtio-fs: could not raise RLIMIT_NOFILE"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_missing_and_non_directory_shares() {
        let dir = tempfile::tempdir().unwrap();
        let missing = FsConfig {
            shared_dir: dir.path().join("nope"),
            read_only: false,
        };
        assert!(matches!(
            open_passthrough(&missing),
            Err(Error::SharedDir { .. })
        ));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let not_dir = FsConfig {
            shared_dir: file,
            read_only: false,
        };
        assert!(matches!(
            open_passthrough(&not_dir),
            Err(Error::SharedDir { .. })
        ));
    }
}
