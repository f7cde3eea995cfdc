//! Which FUSE requests a read-only share must refuse.
//!
//! The decision is an allowlist: only requests known not to modify the host file system pass,
//! everything else (including opcodes this code does not know) is answered with EROFS. That way a
//! newer guest kernel with new write-class opcodes cannot slip past the read-only setting.

use fuse_backend_rs::abi::fuse_abi::{AccessIn, InHeader, OpenIn};
use vm_memory::ByteValued;

// Raw FUSE opcodes (include/uapi/linux/fuse.h). Matched as numbers because the opcode enum of
// fuse-backend-rs is built with a transmute that is not defined for the gaps in the numbering.
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const READLINK: u32 = 5;
const OPEN: u32 = 14;
const READ: u32 = 15;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const GETXATTR: u32 = 22;
const LISTXATTR: u32 = 23;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const FSYNCDIR: u32 = 30;
const GETLK: u32 = 31;
const SETLK: u32 = 32;
const SETLKW: u32 = 33;
const ACCESS: u32 = 34;
const INTERRUPT: u32 = 36;
const DESTROY: u32 = 38;
const POLL: u32 = 40;
const BATCH_FORGET: u32 = 42;
const READDIRPLUS: u32 = 44;
const LSEEK: u32 = 46;
const SYNCFS: u32 = 50;

/// `access(2)` mask bit asking for write permission.
const W_OK: u32 = libc::W_OK as u32;

/// Open flags that would modify the file or its metadata.
const WRITE_OPEN_FLAGS: u32 =
    (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) as u32;

/// Returns true when a request must be refused with EROFS on a read-only share.
///
/// `body` is the request after the `InHeader` (as many bytes as are available; only OPEN and
/// ACCESS look at it). A body too short to decide is refused, which the server would have
/// rejected anyway.
pub fn is_write_request(header: &InHeader, body: &[u8]) -> bool {
    match header.opcode {
        LOOKUP | FORGET | GETATTR | READLINK | READ | STATFS | RELEASE | FSYNC | GETXATTR
        | LISTXATTR | FLUSH | INIT | OPENDIR | READDIR | RELEASEDIR | FSYNCDIR | GETLK | SETLK
        | SETLKW | INTERRUPT | DESTROY | POLL | BATCH_FORGET | READDIRPLUS | LSEEK | SYNCFS => {
            false
        }
        OPEN => match read_prefix::<OpenIn>(body) {
            Some(open) => open.flags & WRITE_OPEN_FLAGS != 0,
            None => true,
        },
        ACCESS => match read_prefix::<AccessIn>(body) {
            Some(access) => access.mask & W_OK != 0,
            None => true,
        },
        _ => true,
    }
}

/// Reads a `T` from the start of `bytes`, if there are enough of them.
fn read_prefix<T: ByteValued>(bytes: &[u8]) -> Option<T> {
    let size = std::mem::size_of::<T>();
    bytes.get(..size).and_then(T::from_slice).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(opcode: u32) -> InHeader {
        InHeader {
            opcode,
            ..Default::default()
        }
    }

    #[test]
    fn reads_pass_and_writes_are_refused() {
        for op in [LOOKUP, GETATTR, READ, READDIRPLUS, INIT, FORGET, STATFS] {
            assert!(!is_write_request(&header(op), &[]), "opcode {op}");
        }
        // SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE, SETXATTR,
        // REMOVEXATTR, CREATE, IOCTL, FALLOCATE, RENAME2, COPY_FILE_RANGE, SETUPMAPPING.
        for op in [
            4, 6, 8, 9, 10, 11, 12, 13, 16, 21, 24, 35, 39, 43, 45, 47, 48,
        ] {
            assert!(is_write_request(&header(op), &[]), "opcode {op}");
        }
        // Unknown opcodes are refused too.
        assert!(is_write_request(&header(7), &[]));
        assert!(is_write_request(&header(4096), &[]));
    }

    #[test]
    fn open_is_refused_only_for_writing() {
        let open = |flags: i32| {
            let body = OpenIn {
                flags: flags as u32,
                fuse_flags: 0,
            };
            is_write_request(&header(OPEN), body.as_slice())
        };
        assert!(!open(libc::O_RDONLY));
        assert!(!open(libc::O_RDONLY | libc::O_NOFOLLOW));
        assert!(open(libc::O_WRONLY));
        assert!(open(libc::O_RDWR));
        assert!(open(libc::O_RDONLY | libc::O_TRUNC));
        assert!(open(libc::O_WRONLY | libc::O_APPEND));
        // Truncated body: refuse rather than guess.
        assert!(is_write_request(&header(OPEN), &[0u8; 3]));
    }

    #[test]
    fn access_is_refused_only_for_write_permission() {
        let access = |mask: i32| {
            let body = AccessIn {
                mask: mask as u32,
                padding: 0,
            };
            is_write_request(&header(ACCESS), body.as_slice())
        };
        assert!(!access(libc::R_OK | libc::X_OK));
        assert!(access(libc::W_OK));
    }
}
