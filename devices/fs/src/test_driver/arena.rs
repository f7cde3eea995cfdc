//! A place to throw hostile FUSE requests at the device and check that nothing got out.
//!
//! [`Arena::new`] moves the calling thread into a mount namespace of its own (the rest of the
//! process keeps the host's) and mounts a small tmpfs there, `nodev,nosuid,strictatime`:
//!
//! ```text
//! base/                 tmpfs, 64 MiB
//!   share/              what the device serves (refilled by reset())
//!   outside/canary      must never be read, written, renamed or linked into the share
//! ```
//!
//! `nodev` matters: a request stream may create device nodes, and a host-side open of one must
//! never reach a host device however the device behaves. The size bounds what a stream of
//! writes, fallocates and creates can take. Every read updates the canary's atime
//! (`strictatime`), so [`Arena::check`] sees a read as well as a write. The mount goes away
//! with the thread's namespace when the thread ends (and is unmounted on drop).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What the canary holds.
const CANARY: &[u8] = b"host secret: a guest must never see this\n";

/// The tmpfs arena; see the module documentation.
pub struct Arena {
    base: PathBuf,
    share: PathBuf,
    canary: PathBuf,
    /// (ino, atime, atime_nsec, mtime, mtime_nsec, ctime, ctime_nsec, nlink) of the canary.
    canary_stamp: [i64; 8],
    /// Entries of the arena's root besides `share` and `outside` that a test made itself.
    extra_top: Vec<String>,
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in arena paths")
}

fn os_err<T>(what: &str, rc: libc::c_int, ok: T) -> io::Result<T> {
    if rc == 0 {
        Ok(ok)
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

impl Arena {
    /// Builds the arena for the calling thread (needs root: CAP_SYS_ADMIN for the namespace).
    pub fn new() -> io::Result<Arena> {
        // SAFETY: unshare changes only the calling thread's fs and mount namespace (CLONE_NEWNS
        // implies CLONE_FS, which a thread may unshare while others run).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        os_err("unshare(CLONE_NEWNS)", rc, ())?;
        let root = cstr(Path::new("/"));
        // SAFETY: plain mount(2) with valid C strings; only this thread's namespace changes.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        os_err("make / private", rc, ())?;
        let base = std::env::temp_dir().join(format!(
            "rootcell-fs-arena-{}-{}",
            std::process::id(),
            // SAFETY: gettid has no arguments and cannot fail.
            unsafe { libc::gettid() }
        ));
        std::fs::create_dir_all(&base)?;
        let (tmpfs, target) = (CString::new("tmpfs").unwrap(), cstr(&base));
        let opts = CString::new("size=64m,mode=0755,nr_inodes=4096").unwrap();
        // SAFETY: as above.
        let rc = unsafe {
            libc::mount(
                tmpfs.as_ptr(),
                target.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NODEV | libc::MS_NOSUID | libc::MS_STRICTATIME,
                opts.as_ptr().cast(),
            )
        };
        if let Err(e) = os_err("mount the arena tmpfs", rc, ()) {
            let _ = std::fs::remove_dir(&base);
            return Err(e);
        }
        let share = base.join("share");
        let outside = base.join("outside");
        std::fs::create_dir(&share)?;
        std::fs::create_dir(&outside)?;
        let canary = outside.join("canary");
        std::fs::write(&canary, CANARY)?;
        let mut arena = Arena {
            base,
            share,
            canary,
            canary_stamp: [0; 8],
            extra_top: Vec::new(),
        };
        arena.canary_stamp = arena.stamp()?;
        arena.reset()?;
        Ok(arena)
    }

    /// The directory the device must serve.
    pub fn share(&self) -> &Path {
        &self.share
    }

    /// The arena's root (the tmpfs; `share` and `outside` are in it).
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Makes `base/<source>` (a directory tree the test fills) appear in the share at
    /// `share/<name>` as a bind mount, the way the runtime lays out a container's volumes;
    /// [`Arena::check`] then allows `source` in the arena's root. Survives [`Arena::reset`]
    /// only if called after it (reset clears the share's mount point, not the mount).
    pub fn bind_into_share(&mut self, source: &str, name: &str) -> io::Result<PathBuf> {
        let src = self.base.join(source);
        std::fs::create_dir_all(&src)?;
        let dst = self.share.join(name);
        std::fs::create_dir_all(&dst)?;
        let (s, d) = (cstr(&src), cstr(&dst));
        // SAFETY: plain mount(2) with valid C strings, in this thread's namespace only.
        let rc = unsafe {
            libc::mount(
                s.as_ptr(),
                d.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        os_err("bind into the share", rc, ())?;
        self.extra_top.push(source.to_string());
        Ok(src)
    }

    /// The file outside the share that must stay untouched.
    pub fn canary(&self) -> &Path {
        &self.canary
    }

    fn stamp(&self) -> io::Result<[i64; 8]> {
        let m = std::fs::symlink_metadata(&self.canary)?;
        Ok([
            m.ino() as i64,
            m.atime(),
            m.atime_nsec(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.nlink() as i64,
        ])
    }

    /// Empties the share and lays out its fixtures: a file, nested directories, a FIFO, and
    /// symlinks that point at the canary (absolute and relative) and up out of the share.
    pub fn reset(&self) -> io::Result<()> {
        clear_dir(&self.share)?;
        let s = &self.share;
        std::fs::write(s.join("hello.txt"), b"hello from the share\n")?;
        std::fs::create_dir_all(s.join("dir/sub"))?;
        std::fs::write(s.join("dir/inner.txt"), b"inner\n")?;
        std::os::unix::fs::symlink(&self.canary, s.join("abs-link"))?;
        std::os::unix::fs::symlink("../outside/canary", s.join("rel-link"))?;
        std::os::unix::fs::symlink("../../outside", s.join("dir/up-link"))?;
        std::os::unix::fs::symlink("..", s.join("dotdot-link"))?;
        let fifo = cstr(&s.join("fifo"));
        // SAFETY: mkfifo with a valid path.
        let rc = unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) };
        os_err("mkfifo", rc, ())
    }

    /// Fails if anything outside the share changed: the canary's content, inode, times or link
    /// count, or an entry other than `share` and `outside` in the arena's root or other than
    /// `canary` in `outside`.
    pub fn check(&self) -> Result<(), String> {
        let names = |p: &Path| -> Result<Vec<String>, String> {
            let mut v: Vec<String> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            v.sort();
            Ok(v)
        };
        let top = names(&self.base)?;
        let mut expected: Vec<String> = ["outside", "share"].map(String::from).to_vec();
        expected.extend(self.extra_top.iter().cloned());
        expected.sort();
        if top != expected {
            return Err(format!("the arena's root now holds {top:?}"));
        }
        let outside = names(&self.base.join("outside"))?;
        if outside != ["canary"] {
            return Err(format!("outside/ now holds {outside:?}"));
        }
        // The stamp first: reading the content below updates the atime.
        let stamp = self.stamp().map_err(|e| format!("canary: {e}"))?;
        if stamp != self.canary_stamp {
            return Err(format!(
                "the canary was touched: (ino, atime, mtime, ctime, nlink) {:?} -> {stamp:?}",
                self.canary_stamp
            ));
        }
        Ok(())
    }

    /// Checks the canary's content too (this reads it, so the atime baseline is taken again).
    pub fn check_content(&mut self) -> Result<(), String> {
        self.check()?;
        let content = std::fs::read(&self.canary).map_err(|e| format!("canary: {e}"))?;
        if content != CANARY {
            return Err("the canary's content changed".into());
        }
        self.canary_stamp = self.stamp().map_err(|e| format!("canary: {e}"))?;
        Ok(())
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let target = cstr(&self.base);
        // SAFETY: umount2 with a valid path; a failure leaves the mount to the namespace's end.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.base);
    }
}

/// Removes everything in `dir`, making entries writable first (a request stream may have
/// chmod'ed directories to 0 or set attributes that stop a plain remove).
fn clear_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let ty = entry.file_type()?;
        if ty.is_dir() {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700));
            clear_dir(&path)?;
            std::fs::remove_dir(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}
