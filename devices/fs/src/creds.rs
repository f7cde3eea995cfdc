//! The guest caller's credentials for the requests that make a new file (MKNOD, MKDIR,
//! SYMLINK, CREATE), so that the new file is the caller's on the host as it is in the guest.
//!
//! The passthrough would do this itself by switching the serving thread's *effective* uid to
//! the caller's and back to 0 afterwards. That assumes a thread whose real uid is 0: on a
//! thread jailed as an unprivileged uid that keeps CAP_SETUID (rootcell's back-end threads),
//! "back to 0" would make it root again. So the device switches the thread's *fs* uid and gid
//! instead (setfsuid/setfsgid: they decide the owner of new files and the permission checks,
//! nothing else, and act on the calling thread only), hands the passthrough a copy of the
//! request whose uid and gid are 0 (it then leaves the credentials alone), and switches back
//! to the thread's own ids afterwards, whatever they are (0 for a back end running as root, the
//! jailed uid otherwise).
//!
//! Capabilities while the request runs, as the passthrough had them: a non-root caller's request
//! runs with no effective capability (the host checks the caller's permission on the parent
//! directory as the kernel would), a root caller's with the thread's own. The effective set is
//! put back as it was afterwards (the kernel also adjusts it when the fs uid moves to or from
//! 0). Needs CAP_SETUID and CAP_SETGID in the effective set (the back ends keep both).

use caps::{CapSet, CapsHashSet};
use std::io;

// Raw FUSE opcodes (include/uapi/linux/fuse.h) of the requests that make a new inode.
const SYMLINK: u32 = 6;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const CREATE: u32 = 35;

/// Whether requests with `opcode` make a file whose owner is the caller.
pub(crate) fn makes_a_file(opcode: u32) -> bool {
    matches!(opcode, SYMLINK | MKNOD | MKDIR | CREATE)
}

/// A `caps` error as an I/O error (the device's requests fail with errnos).
fn caps_err(e: caps::errors::CapsError) -> io::Error {
    io::Error::other(e.to_string())
}

/// setfsuid(2)/setfsgid(2) on the calling thread (raw: these never fail visibly, so the new
/// value is read back with an invalid id, which changes nothing and returns the current one).
fn set_fs_id(nr: libc::c_long, id: u32) -> io::Result<u32> {
    // SAFETY: the call takes an integer and acts on this thread's credentials only.
    let old = unsafe { libc::syscall(nr, id) } as u32;
    // SAFETY: as above; -1 is not a valid id, so this only reads.
    let now = unsafe { libc::syscall(nr, u32::MAX) } as u32;
    if now != id {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(old)
}

/// The thread's own fs ids and effective capabilities, restored when dropped.
pub(crate) struct Caller {
    uid: u32,
    gid: u32,
    effective: CapsHashSet,
}

impl Caller {
    /// Takes on `uid` and `gid` as the calling thread's fs ids (see the module text).
    pub(crate) fn assume(uid: u32, gid: u32) -> io::Result<Caller> {
        // `None`: the calling thread (capget/capset act per thread).
        let effective = caps::read(None, CapSet::Effective).map_err(caps_err)?;
        // The gid first: with the uid changed CAP_SETGID may be gone from the effective set.
        let own_gid = set_fs_id(libc::SYS_setfsgid, gid)?;
        let mut guard = Caller {
            // Not switched yet: read back below.
            uid: u32::MAX,
            gid: own_gid,
            effective,
        };
        // SAFETY: reads this thread's fs uid (an invalid id changes nothing).
        guard.uid = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) } as u32;
        set_fs_id(libc::SYS_setfsuid, uid)?;
        if uid != 0 {
            caps::clear(None, CapSet::Effective).map_err(caps_err)?;
        }
        Ok(guard)
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        // Back to the thread's own ids (its real ids: allowed without a capability), then its
        // effective set as it was.
        let uid = set_fs_id(libc::SYS_setfsuid, self.uid);
        let gid = set_fs_id(libc::SYS_setfsgid, self.gid);
        let caps = caps::set(None, CapSet::Effective, &self.effective).map_err(caps_err);
        if let Err(e) = uid.and(gid).and(caps) {
            // Nothing sensible is left to serve with: a thread stuck with a guest's identity
            // would create files as that user.
            tracing::error!(error = %e, "virtio-fs: cannot restore the thread's credentials");
            std::process::abort();
        }
    }
}
