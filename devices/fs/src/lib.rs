//! virtio-fs device: FUSE requests from virtqueue descriptor chains served by fuse-backend-rs'
//! passthrough file system, plus a vhost-user front end so QEMU can use it.
//!
//! - [`FsDevice`] is the transport-neutral device logic (virtio-queue + vm-memory).
//! - [`bridge`] lets a VMM on other rust-vmm versions hand over its guest RAM and queues.
//! - [`serve_vhost_user`] serves it to QEMU's `vhost-user-fs-device` from background threads
//!   of the calling process (no fork); with [`Jail::share_root`] its threads get a mount
//!   namespace whose root is the share ([`share_root`]), otherwise they see the caller's;
//!   with [`Jail::own_fd_table`] also an fd table of their own ([`fd_table`]), so through
//!   `/proc/self/fd` they reach only what they hold.
//!
//! QEMU side (what the backend needs from the VMM command line):
//! - guest RAM must be shareable: `-object memory-backend-memfd,id=mem,size=..,share=on` and
//!   `-M microvm,...,memory-backend=mem` (otherwise QEMU refuses the vhost-user device);
//! - `-chardev socket,id=fs,path=SOCKET -device vhost-user-fs-device,chardev=fs,tag=TAG`; start
//!   QEMU only after [`serve_vhost_user`] returned (the socket is listening by then);
//! - one backend serves one QEMU connection: a new VM needs a new `serve_vhost_user` call;
//! - in the guest: `mount -t virtiofs TAG /mnt`.
//!
//! Host requirements: runs as root, or as any uid with the ownership capabilities (files are
//! made with the guest caller's fs uid/gid, chown needs CAP_CHOWN), `/proc` mounted in the
//! caller's mount namespace (the passthrough opens `/proc/self/fd`, through which it reopens
//! inodes, before any pivot into the share; with an fd table of its own, the thread's own
//! `/proc/thread-self/fd`, bound into the share root, after the pivot). The soft RLIMIT_NOFILE of the process is raised
//! to its hard limit (one fd per guest-known inode). Capabilities and seccomp are the
//! caller's to add through [`Jail::confine`].

pub mod bridge;
mod creds;
mod device;
mod error;
pub mod fd_table;
mod passthrough;
mod readonly;
pub mod share_root;
pub mod syscalls;
#[cfg(any(test, feature = "test-driver"))]
pub mod test_driver;
mod vhost_user;

use std::path::PathBuf;

pub use device::{FsDevice, HIPRIO_QUEUE, NUM_QUEUES};
pub use error::Error;
pub use passthrough::check_shared_dir;
pub use vhost_user::{serve_vhost_user, serve_vhost_user_confined, BackendHandle, Confine, Jail};
/// The virtio-queue version the device's queue types come from.
pub use virtio_queue;
/// The vm-memory version the device's memory types come from (pinned by fuse-backend-rs).
pub use vm_memory;

/// Configuration of one virtio-fs device.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Host directory the guest sees as the root of the share.
    pub shared_dir: PathBuf,
    /// Refuse every write-class request with EROFS.
    pub read_only: bool,
}
