//! A jail for a child process, entered between fork and exec.
//!
//! [`ProcessJail`] is built in the parent (paths become C strings, host files are looked at
//! there) and [`ProcessJail::enter`] runs in the child from `Command::pre_exec`, where only
//! async-signal-safe system calls are allowed: it allocates nothing. In order:
//!
//! 1. new mount, IPC, UTS and network namespaces (the VMM's network is the tap fds it is
//!    given; it can open no socket to anything);
//! 2. every mount private, a tmpfs on the jail directory, and in it the read-only bind mounts
//!    and symlinks the jail was given; `pivot_root` into it, the old root detached, the new
//!    root remounted read-only;
//! 3. the capability bounding set and ambient set emptied, then the gid, the supplementary
//!    groups and the uid set to the unprivileged ones (which clears the permitted and effective
//!    sets), the inheritable set cleared, no_new_privs set;
//! 4. the parent-death signal set again (a change of uid clears it) and checked against a
//!    parent that died meanwhile.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One thing to put into the jail's root.
#[derive(Debug)]
enum Step {
    /// mkdir (mode 0755).
    Dir(CString),
    /// An empty file to bind a file onto.
    File(CString),
    /// symlink(target, link).
    Symlink(CString, CString),
    /// A character device node owned by the jailed uid and gid, mode 0600.
    OwnDevice(CString, libc::dev_t),
    /// A bind mount; read-only and nosuid unless `writable`.
    Bind {
        src: CString,
        dst: CString,
        writable: bool,
    },
}

/// A jail for one child process; see the module text.
#[derive(Debug)]
pub struct ProcessJail {
    root: CString,
    old_root_in_new: CString,
    steps: Vec<Step>,
    /// Paths inside the jail already created (to make parents once).
    made: Vec<PathBuf>,
    groups: Vec<libc::gid_t>,
    parent: libc::pid_t,
    death_signal: libc::c_int,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has a NUL byte", p.display()),
        )
    })
}

impl ProcessJail {
    /// A jail whose root will be a tmpfs mounted (in the child's own mount namespace) on
    /// `root`, an empty directory the caller made. `death_signal` is sent to the child when
    /// the calling process dies.
    pub fn new(root: &Path, death_signal: libc::c_int) -> io::Result<Self> {
        let old = root.join(".old-root");
        Ok(ProcessJail {
            root: cstr(root)?,
            old_root_in_new: cstr(&old)?,
            steps: Vec::new(),
            made: vec![PathBuf::from("/")],
            groups: Vec::new(),
            parent: std::process::id() as libc::pid_t,
            death_signal,
        })
    }

    /// The host path of `inside` (an absolute path in the jail) before pivot_root.
    fn host(&self, inside: &Path) -> PathBuf {
        let root = Path::new(std::ffi::OsStr::from_bytes(self.root.as_bytes()));
        root.join(inside.strip_prefix("/").unwrap_or(inside))
    }

    fn mkdirs(&mut self, inside: &Path) -> io::Result<()> {
        if self.made.iter().any(|m| m == inside) {
            return Ok(());
        }
        if let Some(parent) = inside.parent() {
            self.mkdirs(parent)?;
        }
        self.steps.push(Step::Dir(cstr(&self.host(inside))?));
        self.made.push(inside.to_path_buf());
        Ok(())
    }

    /// Binds host path `src` (a file, directory or device node) at `inside`, read-only
    /// unless `writable`. Fails if `src` does not exist.
    pub fn bind(&mut self, src: &Path, inside: &Path, writable: bool) -> io::Result<()> {
        let meta = std::fs::metadata(src)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        if let Some(parent) = inside.parent() {
            self.mkdirs(parent)?;
        }
        let dst = cstr(&self.host(inside))?;
        if meta.is_dir() {
            self.steps.push(Step::Dir(dst.clone()));
            self.made.push(inside.to_path_buf());
        } else {
            self.steps.push(Step::File(dst.clone()));
        }
        self.steps.push(Step::Bind {
            src: cstr(src)?,
            dst,
            writable,
        });
        Ok(())
    }

    /// Makes the host's `path` (e.g. `/lib`) appear at the same place: the same symlink if
    /// it is one (merged-/usr systems), a read-only bind if it is a directory, nothing if it
    /// does not exist.
    pub fn mirror(&mut self, path: &Path) -> io::Result<()> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(path)?;
                if let Some(parent) = path.parent() {
                    self.mkdirs(parent)?;
                }
                let link = cstr(&self.host(path))?;
                self.steps.push(Step::Symlink(cstr(&target)?, link));
                Ok(())
            }
            Ok(_) => self.bind(path, path, false),
        }
    }

    /// Makes at `inside` a character device node like the host's `dev` (e.g. /dev/kvm),
    /// owned by the jailed uid and gid with mode 0600: only the jailed process can open it,
    /// and only inside its jail.
    pub fn own_device(&mut self, dev: &Path, inside: &Path) -> io::Result<()> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(dev)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dev.display())))?;
        if !meta.file_type().is_char_device() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a character device", dev.display()),
            ));
        }
        if let Some(parent) = inside.parent() {
            self.mkdirs(parent)?;
        }
        self.steps
            .push(Step::OwnDevice(cstr(&self.host(inside))?, meta.rdev()));
        Ok(())
    }

    /// Supplementary groups the jailed process keeps (e.g. the group of /dev/kvm).
    pub fn add_group(&mut self, gid: libc::gid_t) {
        if !self.groups.contains(&gid) {
            self.groups.push(gid);
        }
    }

    /// Enters the jail; call only in a forked child before exec (it allocates nothing and
    /// makes only async-signal-safe calls). On failure, a line naming the step goes to
    /// stderr and the error is returned (and `spawn` fails with it).
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: every call below is a plain system call on C strings and arrays this
        // struct owns and keeps alive; none allocates or takes a lock.
        unsafe {
            let id = crate::jail::UID_BASE + libc::getpid() as u32;
            check(
                libc::unshare(
                    libc::CLONE_NEWNS
                        | libc::CLONE_NEWIPC
                        | libc::CLONE_NEWUTS
                        | libc::CLONE_NEWNET,
                ),
                b"unshare",
            )?;
            check(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
                b"making mounts private",
            )?;
            check(
                libc::mount(
                    c"rootcell-jail".as_ptr(),
                    self.root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    // Not nodev: a device node of the jail's own (see own_device) lives here.
                    libc::MS_NOSUID | libc::MS_NOEXEC,
                    c"mode=0755,size=64k,nr_inodes=256".as_ptr().cast(),
                ),
                b"mounting the jail's tmpfs",
            )?;
            for step in &self.steps {
                match step {
                    Step::Dir(p) => {
                        if libc::mkdir(p.as_ptr(), 0o755) != 0
                            && *libc::__errno_location() != libc::EEXIST
                        {
                            return Err(fail(b"mkdir in the jail"));
                        }
                    }
                    Step::File(p) => {
                        let fd = libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        check(fd, b"creating a bind target in the jail")?;
                        libc::close(fd);
                    }
                    Step::OwnDevice(p, dev) => {
                        check(
                            libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o600, *dev),
                            b"mknod in the jail",
                        )?;
                        check(libc::chown(p.as_ptr(), id, id), b"chown of a jail device")?;
                    }
                    Step::Symlink(target, link) => {
                        check(
                            libc::symlink(target.as_ptr(), link.as_ptr()),
                            b"symlink in the jail",
                        )?;
                    }
                    Step::Bind { src, dst, writable } => {
                        check(
                            libc::mount(
                                src.as_ptr(),
                                dst.as_ptr(),
                                std::ptr::null(),
                                libc::MS_BIND,
                                std::ptr::null(),
                            ),
                            b"bind mount into the jail",
                        )?;
                        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
                        if !writable {
                            flags |= libc::MS_RDONLY;
                        }
                        check(
                            libc::mount(
                                std::ptr::null(),
                                dst.as_ptr(),
                                std::ptr::null(),
                                flags,
                                std::ptr::null(),
                            ),
                            b"remounting a bind read-only",
                        )?;
                    }
                }
            }
            check(
                libc::mkdir(self.old_root_in_new.as_ptr(), 0o700),
                b"mkdir old root",
            )?;
            check(
                libc::syscall(
                    libc::SYS_pivot_root,
                    self.root.as_ptr(),
                    self.old_root_in_new.as_ptr(),
                ) as libc::c_int,
                b"pivot_root",
            )?;
            check(libc::chdir(c"/".as_ptr()), b"chdir /")?;
            check(
                libc::umount2(c"/.old-root".as_ptr(), libc::MNT_DETACH),
                b"detaching the old root",
            )?;
            check(libc::rmdir(c"/.old-root".as_ptr()), b"rmdir old root")?;
            check(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
                    std::ptr::null(),
                ),
                b"remounting the jail's root read-only",
            )?;

            // Capabilities: nothing to keep, nothing to regain.
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                    && *libc::__errno_location() != libc::EINVAL
                {
                    return Err(fail(b"dropping the bounding set"));
                }
            }
            check(
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                ),
                b"clearing ambient capabilities",
            )?;
            check(
                libc::setgroups(self.groups.len(), self.groups.as_ptr()),
                b"setgroups",
            )?;
            check(libc::setresgid(id, id, id), b"setresgid")?;
            check(libc::setresuid(id, id, id), b"setresuid")?;
            // The uid change emptied the permitted and effective sets; the inheritable one
            // is cleared by hand.
            let mut header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let data = [CapData::default(); 2];
            check(
                libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int,
                b"capset",
            )?;
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                b"no_new_privs",
            )?;
            check(
                libc::prctl(libc::PR_SET_PDEATHSIG, self.death_signal, 0, 0, 0),
                b"parent-death signal",
            )?;
            if libc::getppid() != self.parent {
                *libc::__errno_location() = libc::ESRCH;
                return Err(fail(b"parent gone"));
            }
        }
        Ok(())
    }
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `Ok` for a non-negative return, else [`fail`].
fn check(rc: libc::c_int, step: &'static [u8]) -> io::Result<()> {
    if rc < 0 {
        Err(fail(step))
    } else {
        Ok(())
    }
}

/// The current errno as an error, after a line naming `step` on stderr (async-signal-safe).
fn fail(step: &'static [u8]) -> io::Error {
    // SAFETY: errno read and write(2) of static bytes.
    unsafe {
        let errno = *libc::__errno_location();
        let prefix = b"rootcell: entering the VMM jail failed at: ";
        libc::write(2, prefix.as_ptr().cast(), prefix.len());
        libc::write(2, step.as_ptr().cast(), step.len());
        libc::write(2, b"\n".as_ptr().cast(), 1);
        io::Error::from_raw_os_error(errno)
    }
}
