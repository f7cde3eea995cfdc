//! Handles on network namespaces, so a [`crate::Mirror`] made on one thread can be torn
//! down from another.

use crate::netlink::Netlink;
use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

/// Opens the calling thread's network namespace.
pub(crate) fn current() -> io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

fn same(a: &File, b: &File) -> io::Result<bool> {
    let (ma, mb) = (a.metadata()?, b.metadata()?);
    Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino())
}

/// A netlink socket in namespace `ns`: opened right here if the calling thread is in it,
/// otherwise by a short-lived thread that joins it (a socket stays in the namespace it was
/// made in, whoever uses it later).
pub(crate) fn netlink_in(ns: &File) -> io::Result<Netlink> {
    if same(&current()?, ns)? {
        return Netlink::open();
    }
    let ns = ns.try_clone()?;
    std::thread::spawn(move || {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Netlink::open()
    })
    .join()
    .map_err(|_| io::Error::other("netns helper thread panicked"))?
}
